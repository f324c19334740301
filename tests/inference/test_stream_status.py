"""What a Worker/Generate stream ends with, on both sides, through a real gateway and worker.

A stream that delivered its final message is OK for the worker's RPC metrics and for the gateway's
client span (the gateway reads it to its end). A worker group that fails mid-request tells the
caller what happened and what to do, never the exception, a path or an address; the details go to
the worker's log with the request id. Real gRPC servers on 127.0.0.1, the default model.
"""
from __future__ import annotations

import gc
import logging
import re
import time

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from privlm.base.transport import PLAINTEXT_DEV
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model

WGEN = "/privlm.internal.v1.Worker/Generate"
LEAKS = re.compile(r"Error\b|Exception\b|\.(cc|cpp|h|py)\b|/|\d+\.\d+\.\d+\.\d+|:\d{2,5}\b|gloo|Traceback")


class Observed:
    """Worker + gateway with their own in-memory telemetry (worker metrics, gateway client spans)."""

    def __init__(self, lt, model, **engine):
        from gateway.config import GatewayConfig, ModelRoute
        from gateway.server import create_server as create_gateway
        from privlm.base.grpcserver import SERVING
        from privlm.base.telemetry import client_interceptors, server_interceptors
        from privlm.base.telemetry.instruments import Instruments
        from services.inference.config import EngineConfig, WorkerServerConfig
        from services.inference.server import build_engine
        from services.inference.server import create_server as create_worker

        self.lt = lt
        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        worker_tp, gateway_tp = TracerProvider(), TracerProvider()
        gateway_tp.add_span_processor(SimpleSpanProcessor(self.spans))
        cfg = EngineConfig(model=str(model), dtype="float32", **engine)
        self.engine = build_engine(cfg)
        interceptors = server_interceptors(worker_tp, Instruments(MeterProvider(metric_readers=[self.reader])))
        self.worker, self.worker_port, health = lt.run(create_worker(
            WorkerServerConfig(engine=cfg, transport=PLAINTEXT_DEV), self.engine, interceptors))
        lt.run(self.worker.start())
        lt.run(health.set("", SERVING))
        gcfg = GatewayConfig(transport=PLAINTEXT_DEV, models=(ModelRoute(str(model), f"127.0.0.1:{self.worker_port}"),),
                             allow_anonymous=True)
        self.gateway, port, self.service, _ = lt.run(create_gateway(gcfg, client_interceptors=client_interceptors(gateway_tp)))
        lt.run(self.gateway.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.worker_channel = grpc.insecure_channel(f"127.0.0.1:{self.worker_port}")   # the gateway's view

    def settle(self) -> None:
        """Let late finalizers (closed streams, done-callbacks) run before reading telemetry."""
        for _ in range(3):
            self.lt.run(_collect())
            time.sleep(0.3)

    def worker_generate_codes(self) -> dict[str, int]:
        data = self.reader.get_metrics_data()
        codes: dict[str, int] = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != "privlm.requests":
                        continue
                    for p in m.data.data_points:
                        if p.attributes.get("rpc.method") == WGEN:
                            key = f"{p.attributes['rpc.grpc.status_code']}/{p.attributes['privlm.outcome']}"
                            codes[key] = codes.get(key, 0) + p.value
        return codes

    def close(self) -> None:
        self.channel.close()
        self.worker_channel.close()
        self.lt.run(self.gateway.stop(1))
        self.lt.run(self.service.close())
        self.lt.run(self.worker.stop(1))
        self.engine.shutdown()


async def _collect() -> None:
    gc.collect()


def _chat(text: str, n: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=n))
    req.chat.messages.add(role="user", content=text)
    return req


def test_finished_streams_are_ok_on_both_sides(loop_thread, default_model, caplog):
    caplog.set_level(logging.INFO)
    obs = Observed(loop_thread, default_model)
    try:
        calls = 0
        for i in range(3):
            assert obs.stub.Generate(_chat(f"Name a colour ({i}).", 6), timeout=120).usage.completion_tokens
            msgs = list(obs.stub.GenerateStream(_chat(f"Name a city ({i}).", 6), timeout=120))
            assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            calls += 2
        obs.settle()
        assert obs.worker_generate_codes() == {"OK/ok": calls}
        spans = [s for s in obs.spans.get_finished_spans() if s.name == WGEN and s.kind == SpanKind.CLIENT]
        assert len(spans) == calls
        assert {s.status.status_code for s in spans} <= {StatusCode.UNSET, StatusCode.OK}
        assert {s.attributes.get("rpc.grpc.status_code") for s in spans} == {grpc.StatusCode.OK.value[0]}
    finally:
        obs.close()
    assert "Failed to detach context" not in caplog.text



def test_group_failure_message_names_no_internals(loop_thread, default_model, caplog):
    """A follower rank killed mid-stream (the step's all-reduce fails or the monitor sees the exit):
    the worker's caller (the gateway) and the gateway's caller learn what happened and to retry;
    the worker's log has the details with the request id and trace id."""
    from privlm.internal.v1 import worker_pb2, worker_pb2_grpc

    caplog.set_level(logging.INFO)
    obs = Observed(loop_thread, default_model, tp=2, threads=1)
    try:
        worker = worker_pb2_grpc.WorkerStub(obs.worker_channel)

        def direct(rid: str, n: int):
            return worker.Generate(worker_pb2.WorkerGenerateRequest(
                request_id=rid, prompt_token_ids=[1, 504, 3210, 28, 422], sampling=worker_pb2.WorkerSampling(
                    max_new_tokens=n, top_p=1.0)), timeout=120)

        got = 0
        with pytest.raises(grpc.RpcError) as err:
            for msg in direct("victim-1", 400):
                got += len(msg.token_ids)
                if got >= 3 and obs.engine.group.procs[0].poll() is None:
                    obs.engine.group.procs[0].kill()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = err.value.details()
        assert "failed while serving this request" in details and "retry" in details, details
        assert not LEAKS.search(details), details
        with pytest.raises(grpc.RpcError) as late:          # the group is down now: refused at once
            list(direct("late-1", 4))
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in late.value.details() and not LEAKS.search(late.value.details()), late.value.details()
        with pytest.raises(grpc.RpcError) as public:        # through the gateway
            obs.stub.Generate(_chat("Name a colour.", 4), timeout=60)
        assert public.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in public.value.details() and not LEAKS.search(public.value.details()), public.value.details()
    finally:
        obs.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "privlm.worker"]
    failed = [m for m in logged if "victim-1" in m and "failed in the worker group" in m]
    assert failed and re.search(r"trace [0-9a-f]{32}", failed[0]), logged
    assert any("late-1" in m and "refused" in m for m in logged), logged
