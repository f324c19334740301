"""Faults under `privlm up`: a worker rank killed mid-stream, automatic restart, SIGTERM drain."""
import os
import signal
import threading
import time

import grpc
import pytest

from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc
from tests.up_support import processes_where, start_up, stop_up

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def suite(tmp_path_factory, default_model):
    """One suite for the module: the restart test runs first, the SIGTERM test stops it last."""
    proc, info = start_up(tmp_path_factory.mktemp("up"), "--tp", "2", "--no-he", "--grace", "20")
    from privlm.base.transport import TransportConfig
    from privlm.client_cli import auth_metadata

    channel = TransportConfig(tls_dir=info["tls_dir"]).channel(f"127.0.0.1:{info['gateway']['port']}", "client")
    yield proc, info, pb_grpc.InferenceStub(channel), auth_metadata(None)
    channel.close()
    stop_up(proc)


def _long(n):
    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=n))
    req.chat.messages.add(role="user", content="Write a long report about the history of central banking.")
    return req


def test_rank_killed_mid_stream_then_group_restarts(suite):
    proc, info, stub, md = suite
    followers = processes_where("ppid", info["worker"]["pid"])
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
