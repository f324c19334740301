"""`privlm up` as a user runs it: real processes, a real answer, and a clean stop on SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.model]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it holds no resources and is reaped by its parent
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _group_members(pgid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_up_serves_then_stops_cleanly(tmp_path, default_model):
    state = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "privlm.cli", "up", "--port", "0", "--state-file", str(state),
                             "--log-dir", str(tmp_path / "logs")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not state.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "privlm up did not come up in time"
            time.sleep(0.5)
        info = json.loads(state.read_text())
        assert {"worker", "gateway"} <= set(info)
        from privlm.client_cli import auth_metadata

        from privlm.transport import TransportConfig

        target = f"127.0.0.1:{info['gateway']['port']}"
        req = pb.GenerateRequest(prompt="The capital of France is", sampling=pb.SamplingParams(max_new_tokens=5))
        with grpc.insecure_channel(target) as ch:   # mTLS by default: plaintext clients get nowhere
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.InferenceStub(ch).Generate(req, timeout=10, metadata=auth_metadata(None))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with TransportConfig(tls_dir=info["tls_dir"]).channel(target, "client") as ch:
            stub = pb_grpc.InferenceStub(ch)
            with pytest.raises(grpc.RpcError) as err:       # the dev gateway requires the dev token
                stub.Generate(req, timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            resp = stub.Generate(req, timeout=60, metadata=auth_metadata(None))
        assert resp.usage.completion_tokens >= 1 and resp.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        assert "all services exited" in out
        for name, svc in info.items():
            if not isinstance(svc, dict) or "pid" not in svc:
                continue
            assert _gone(svc["pid"]), f"{name} (pid {svc['pid']}) still running"
            assert _group_members(svc["pid"]) == [], f"{name}'s process group left processes behind"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_services_stop_when_up_is_killed(tmp_path, default_model):
    """Even a SIGKILLed `privlm up` leaves no service behind (parent-death signal)."""
    state = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "privlm.cli", "up", "--port", "0", "--no-he", "--attestation",
                             "none", "--state-file", str(state), "--log-dir", str(tmp_path / "logs")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not state.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    info = json.loads(state.read_text())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    pids = [svc["pid"] for svc in info.values() if isinstance(svc, dict) and "pid" in svc]
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"services outlived a killed privlm up: {pids}"
        time.sleep(0.5)
