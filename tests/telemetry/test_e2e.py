"""One trace id across the real gateway and worker servers, received by the real OTLP receiver.

Uses the shared session stack's engine (tests/conftest.py) behind a second worker server and a
second gateway, both built by their own create_server() with privlm.base.telemetry interceptors, each
with its own tracer provider (service name), as `privlm up` will run them.
"""
from __future__ import annotations

import secrets

import grpc
import pytest

from privlm.base.telemetry import TelemetryConfig, client_interceptors, server_interceptors, setup_telemetry
from privlm.base.telemetry.instruments import Instruments
from privlm.base.telemetry.receiver import create_receiver
from privlm.base.telemetry.spanstore import read_store
from privlm.base.transport import PLAINTEXT_DEV
from privlm.v1 import inference_pb2, inference_pb2_grpc

SECRET = "acct-7781-2231-balance-5520193.17"


def dev_config(cls, **kwargs):
    """cls(**kwargs) with plaintext development transport where the config has a transport field."""
    import dataclasses

    if "transport" in {f.name for f in dataclasses.fields(cls)}:
        from privlm.base.transport import PLAINTEXT_DEV

        kwargs.setdefault("transport", PLAINTEXT_DEV)
    return cls(**kwargs)


@pytest.mark.slow
@pytest.mark.model
def test_one_trace_across_gateway_and_worker(stack, loop_thread, default_model, tmp_path):
    from gateway.config import GatewayConfig, ModelRoute
    from gateway.server import create_server as create_gateway
    from privlm.base.grpcserver import SERVING
    from services.inference.config import EngineConfig, WorkerServerConfig
    from services.inference.server import create_server as create_worker

    store = tmp_path / "spans.jsonl"
    run = loop_thread.run
    receiver, rport = run(create_receiver(store))
    endpoint = f"127.0.0.1:{rport}"
    tels = {name: setup_telemetry(TelemetryConfig(service_name=name, otlp_endpoint=endpoint, export_delay_ms=50),
                                  set_global=False) for name in ("privlm-worker", "privlm-gateway")}
    wt, gt = tels["privlm-worker"], tels["privlm-gateway"]
    worker, wport, whealth = run(create_worker(
        WorkerServerConfig(engine=EngineConfig(model=str(default_model), dtype="float32"), transport=PLAINTEXT_DEV), stack.engine,
        server_interceptors(wt.tracer_provider, Instruments(wt.meter_provider))))
    run(worker.start())
    run(whealth.set("", SERVING))
    gateway, gport, service, _ = run(create_gateway(
        GatewayConfig(transport=PLAINTEXT_DEV, models=(ModelRoute(str(default_model), f"127.0.0.1:{wport}"),), allow_anonymous=True),
        server_interceptors=server_interceptors(gt.tracer_provider, Instruments(gt.meter_provider)),
        client_interceptors=client_interceptors(gt.tracer_provider)))
    run(gateway.start())
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)

    async def call():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            req = inference_pb2.GenerateRequest(
                chat=inference_pb2.Chat(messages=[inference_pb2.ChatMessage(role="user", content=f"Is {SECRET} ok?")]),
                sampling=inference_pb2.SamplingParams(max_new_tokens=4), request_id="e2e-1")
            return [m async for m in stub.GenerateStream(req, metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),))]
    try:
        msgs = run(call())
        assert msgs[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    finally:
        run(gateway.stop(1))
        run(service.close())
        run(worker.stop(1))
        for t in tels.values():
            t.shutdown()   # the receiver runs on the loop thread, so flushing from here is fine
        run(receiver.stop(1))

    spans = [s for s in read_store(store) if s["trace_id"] == trace_id]
    assert SECRET not in store.read_text()
    by_key = {(s["service"], s["name"], s["kind"]): s for s in spans}
    gw_server = by_key[("privlm-gateway", "/privlm.v1.Inference/GenerateStream", "SERVER")]
    assert gw_server["parent_span_id"] == parent
    gw_client = by_key[("privlm-gateway", "/privlm.internal.v1.Worker/Generate", "CLIENT")]
    w_server = by_key[("privlm-worker", "/privlm.internal.v1.Worker/Generate", "SERVER")]
    assert w_server["parent_span_id"] == gw_client["span_id"]
    # the gateway's client span hangs under its server span (directly, or via business spans)
    ids = {s["span_id"]: s for s in spans}
    node, hops = gw_client, 0
    while node["span_id"] != gw_server["span_id"] and hops < 10:
        node, hops = ids[node["parent_span_id"]], hops + 1
    assert node is gw_server
