"""The gateway's health follows its worker group, and a worker failure reaches the caller as a
public message (what happened, what to do, a trace id) while the details stay in the gateway's log."""
import logging
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from privlm.base.transport import PLAINTEXT_DEV
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FOLLOWING = ("", "privlm.v1.Inference")


class Worker:
    """A real worker server over the stack's engine, on a port of its own: stopped and started again
    on the same port like a restarted worker group."""

    def __init__(self, stack, port: int = 0):
        from services.inference.config import EngineConfig, WorkerServerConfig
        from services.inference.server import create_server

        model = stack.service.models[stack.service.default_model].route.model_dir
        cfg = WorkerServerConfig(engine=EngineConfig(model=model), transport=PLAINTEXT_DEV, port=port)
        self.stack = stack
        self.server, self.port, self.health = stack.lt.run(create_server(cfg, stack.engine))
        stack.lt.run(self.server.start())
        self.set("", SERVING)

    def set(self, name: str, status: int) -> None:
        self.stack.lt.run(self.health.set(name, status))

    def stop(self) -> None:
        self.stack.lt.run(self.server.stop(0))


@pytest.fixture
def worker_and_gateway(stack):
    from gateway.config import GatewayConfig, ModelRoute
    from gateway.server import create_server

    worker = Worker(stack)
    model = stack.service.models[stack.service.default_model].route.model_dir
    cfg = GatewayConfig(transport=PLAINTEXT_DEV, allow_anonymous=True, worker_health_period_s=0.2,
                        models=(ModelRoute(model, f"127.0.0.1:{worker.port}"),))
    server, port, service, _ = stack.lt.run(create_server(cfg))
    stack.lt.run(server.start())
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    holder = {"worker": worker}
    yield holder, ch
    ch.close()
    stack.lt.run(server.stop(1))
    stack.lt.run(service.close())
    holder["worker"].stop()


def _statuses(ch) -> dict[str, int]:
    h = health_pb2_grpc.HealthStub(ch)
    return {n: h.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status for n in FOLLOWING}


def _wait_for(ch, status: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if set(_statuses(ch).values()) == {status}:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"gateway health still {_statuses(ch)} after {timeout}s, expected {status}")


def _generate(ch, n=4):
    return pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(
        max_new_tokens=n)), timeout=60)


def _assert_public(err: grpc.RpcError, worker_port: int) -> str:
    details = err.details()
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), details)
    assert "unavailable; retry later" in details and "SmolLM2-135M-Instruct" in details, details
    for internal in ("127.0.0.1", str(worker_port), "connect", "Socket", "ipv4", "Error", "Traceback"):
        assert internal not in details, f"{internal!r} leaked in {details!r}"
    trace = re.search(r"\(trace ([0-9a-f]{32})\)$", details)
    assert trace, details
    return trace.group(1)


def test_health_follows_worker_stopped_and_restarted(worker_and_gateway, caplog):
    caplog.set_level(logging.INFO)
    holder, ch = worker_and_gateway
    port = holder["worker"].port
    assert _statuses(ch) == dict.fromkeys(FOLLOWING, SERVING)
    assert _generate(ch).usage.completion_tokens >= 1

    holder["worker"].stop()
    assert _wait_for(ch, NOT_SERVING, timeout=10) < 5
    with pytest.raises(grpc.RpcError) as err:
        _generate(ch)
    trace = _assert_public(err.value, port)
    logged = [r.getMessage() for r in caplog.records if trace in r.getMessage()]
    assert logged and "UNAVAILABLE" in logged[0], "the worker's own error is logged under the trace id"

    holder["worker"] = Worker(holder["worker"].stack, port=port)     # the group restarted, same port
    assert holder["worker"].port == port
    _wait_for(ch, SERVING, timeout=30)
    assert _generate(ch).usage.completion_tokens >= 1


def test_health_follows_worker_reporting_not_serving(worker_and_gateway):
    """An unhealthy engine (a rank died) makes the worker say NOT_SERVING while it still answers."""
    holder, ch = worker_and_gateway
    holder["worker"].set("", NOT_SERVING)
    _wait_for(ch, NOT_SERVING, timeout=10)
    holder["worker"].set("", SERVING)
    _wait_for(ch, SERVING, timeout=10)
    assert _generate(ch).usage.completion_tokens >= 1


def test_worker_stopped_mid_stream_ends_with_public_unavailable(worker_and_gateway, stack):
    holder, ch = worker_and_gateway
    req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Write a long essay about "
                                                                    "interest rates.")]),
                             sampling=pb.SamplingParams(max_new_tokens=2000))
    call = pb_grpc.InferenceStub(ch).GenerateStream(req, timeout=120)
    with pytest.raises(grpc.RpcError) as err:
        for i, _ in enumerate(call):
            if i == 2:
                holder["worker"].stop()
    _assert_public(err.value, holder["worker"].port)
