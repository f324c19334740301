"""Faults under `privlm up`: a worker rank killed mid-stream, automatic restart, SIGTERM drain."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.model]


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.fixture
def suite(tmp_path, default_model):
    state = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "privlm.cli", "up", "--tp", "2", "--no-he", "--port", "0",
                             "--state-file", str(state), "--log-dir", str(tmp_path / "logs"), "--grace", "20"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "privlm up did not come up in time"
        time.sleep(0.5)
    info = json.loads(state.read_text())
    from privlm.client_cli import auth_metadata
    from privlm.transport import TransportConfig

    channel = TransportConfig(tls_dir=info["tls_dir"]).channel(f"127.0.0.1:{info['gateway']['port']}", "client")
    yield proc, info, pb_grpc.InferenceStub(channel), auth_metadata(None)
    channel.close()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _long(n):
    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=n))
    req.chat.messages.add(role="user", content="Write a long report about the history of central banking.")
    return req


def test_rank_killed_mid_stream_then_group_restarts(suite):
    proc, info, stub, md = suite
    followers = _children(info["worker"]["pid"])
    assert followers, "premise: tp=2 runs a follower rank process under the worker"
    got, t0 = 0, time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for msg in stub.GenerateStream(_long(2000), timeout=60, metadata=md):
            got += len(msg.token_ids)
            if got >= 3 and followers:
                os.kill(followers.pop(), signal.SIGKILL)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert time.monotonic() - t0 < 60
    # privlm up notices NOT_SERVING and restarts the group on the same port; the gateway reconnects.
    deadline = time.monotonic() + 180
    while True:
        try:
            resp = stub.Generate(_long(3), timeout=30, metadata=md)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            assert time.monotonic() < deadline, "worker group was not restarted"
            time.sleep(1)
    assert resp.usage.completion_tokens == 3


def test_sigterm_drains_in_flight_stream(suite):
    proc, info, stub, md = suite
    result = {}

    def consume():
        try:
            msgs = list(stub.GenerateStream(_long(40), timeout=120, metadata=md))
            result["finish"] = msgs[-1].finish_reason
            result["tokens"] = sum(len(m.token_ids) for m in msgs)
        except grpc.RpcError as e:
            result["error"] = e.code()

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(1.0)                      # the stream is in flight
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert result.get("finish") in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_END_OF_SEQUENCE), result
    assert proc.wait(60) == 0
