"""`privlm up` as a user runs it: real processes, a real answer, and a clean stop on SIGTERM."""
import signal
import time

import grpc
import pytest

from privlm.base.transport import TransportConfig
from privlm.client_cli import auth_metadata
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc
from tests.up_support import gone, processes_where, service_pids, start_up, stop_up

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_up_serves_then_stops_cleanly(tmp_path, default_model):
    proc, info = start_up(tmp_path)
    try:
        assert {"otlp-receiver", "worker", "he", "gateway"} <= set(service_pids(info))
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
        assert "all services exited" in proc.stdout.read()
        for name, pid in service_pids(info).items():
            assert gone(pid), f"{name} (pid {pid}) still running"
            assert processes_where("pgid", pid) == [], f"{name}'s process group left processes behind"
    finally:
        stop_up(proc)


def test_services_stop_when_up_is_killed(tmp_path, default_model):
    """Even a SIGKILLed `privlm up` leaves no service behind (parent-death signal)."""
    proc, info = start_up(tmp_path, "--no-he", "--attestation", "none")
    proc.kill()
    proc.wait()
    pids = list(service_pids(info).values())
    deadline = time.monotonic() + 30
    while not all(gone(p) for p in pids):
        assert time.monotonic() < deadline, f"services outlived a killed privlm up: {pids}"
        time.sleep(0.5)
