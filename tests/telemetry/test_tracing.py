"""Spans cross real gRPC client/server and process boundaries and land in the real OTLP receiver."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
from obs_chain import start_gateway

from privlm.base.telemetry import TelemetryConfig, client_interceptors, setup_telemetry
from privlm.base.telemetry.instruments import Instruments
from privlm.base.telemetry.receiver import create_receiver
from privlm.base.telemetry.spanstore import read_store
from privlm.v1 import inference_pb2, inference_pb2_grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GEN = "/privlm.v1.Inference/GenerateStream"
WGEN = "/privlm.internal.v1.Worker/Generate"


def _tel(name: str, endpoint: str | None, **kw):
    return setup_telemetry(TelemetryConfig(service_name=name, otlp_endpoint=endpoint, export_delay_ms=50, **kw),
                           set_global=False)


async def _call(port: int, tracer_provider, prompt: str, request_id: str, max_new: int = 3):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         interceptors=client_interceptors(tracer_provider)) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        req = inference_pb2.GenerateRequest(prompt=prompt, request_id=request_id,
                                            sampling=inference_pb2.SamplingParams(max_new_tokens=max_new))
        return [m async for m in stub.GenerateStream(req)]


def _by_name(spans, name, kind=None):
    found = [s for s in spans if s["name"] == name and (kind is None or s["kind"] == kind)]
    assert found, f"no span {name} ({kind}); have {sorted({(s['name'], s['kind']) for s in spans})}"
    return found


def test_one_trace_across_process_boundary(tmp_path):
    store = tmp_path / "spans.jsonl"

    async def scenario():
        receiver, rport = await create_receiver(store)
        endpoint = f"127.0.0.1:{rport}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "obs_chain.py"), "worker", endpoint, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, cwd=str(ROOT))
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            wport = json.loads(line)["port"]
            gw_tel, cl_tel = _tel("privlm-test-gateway", endpoint), _tel("privlm-test-client", endpoint)
            gw, gport = await start_gateway(f"127.0.0.1:{wport}", gw_tel.tracer_provider,
                                            Instruments(gw_tel.meter_provider))
            msgs = await _call(gport, cl_tel.tracer_provider, "How large is my exposure?", "req-1")
            assert msgs[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
            await gw.stop(1.0)
            # the receiver shares this loop: flush from a thread so it can answer
            await asyncio.to_thread(gw_tel.shutdown)
            await asyncio.to_thread(cl_tel.shutdown)
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0
        await receiver.stop(1.0)

    asyncio.run(scenario())
    spans = read_store(store)
    assert len({s["trace_id"] for s in spans}) == 1, "every hop must share the client's trace id"
    by_id = {s["span_id"]: s for s in spans}

    client = _by_name(spans, GEN, "CLIENT")[0]
    assert client["parent_span_id"] == "" and client["service"] == "privlm-test-client"
    gw_server = _by_name(spans, GEN, "SERVER")[0]
    assert gw_server["parent_span_id"] == client["span_id"]
    gen = _by_name(spans, "chat test-model")[0]
    assert gen["parent_span_id"] == gw_server["span_id"]
    assert gen["attributes"]["gen_ai.request.model"] == "test-model"
    assert gen["attributes"]["gen_ai.usage.output_tokens"] == 3
    assert gen["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    assert any(e["name"] == "gen_ai.first_token" for e in gen["events"])
    w_client = _by_name(spans, WGEN, "CLIENT")[0]
    assert w_client["parent_span_id"] == gen["span_id"] and w_client["service"] == "privlm-test-gateway"
    w_server = _by_name(spans, WGEN, "SERVER")[0]
    assert w_server["parent_span_id"] == w_client["span_id"]
    assert w_server["service"] == "privlm-test-worker", "the worker hop ran in another process"
    for phase in ("privlm.queue", "privlm.prefill", "privlm.decode"):
        span = _by_name(spans, phase)[0]
        assert span["parent_span_id"] == w_server["span_id"]
        assert span["service"] == "privlm-test-worker"
        assert span["start_ns"] <= span["end_ns"]
    # phases are ordered and contained in the worker's RPC span
    q, p, d = (_by_name(spans, n)[0] for n in ("privlm.queue", "privlm.prefill", "privlm.decode"))
    assert w_server["start_ns"] <= q["start_ns"] <= q["end_ns"] <= p["start_ns"] + 1
    assert p["end_ns"] <= d["start_ns"] + 1 and d["end_ns"] <= w_server["end_ns"]
    assert not any("grpc.health" in s["name"] for s in spans), "health checks are not traced"
    assert all(s["parent_span_id"] == "" or s["parent_span_id"] in by_id for s in spans)


def test_receiver_store_survives_torn_line(tmp_path):
    store = tmp_path / "s.jsonl"
    store.write_text('{"trace_id": "a", "name": "x"}\n{"trace_id": "b", "na')
    assert [r["trace_id"] for r in read_store(store)] == ["a"]


def test_standalone_receiver_process(tmp_path):
    """`python -m privlm.base.telemetry.receiver` (what `privlm up` runs): stores spans, stops on SIGTERM."""
    import signal

    store = tmp_path / "traces" / "spans.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "privlm.base.telemetry.receiver", "--store", str(store), "--port", "0"],
                            stdout=subprocess.PIPE, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        info = json.loads(proc.stdout.readline())
        tel = _tel("privlm-test", f"127.0.0.1:{info['port']}")
        with tel.tracer().start_as_current_span("outer"):
            with tel.tracer().start_as_current_span("inner", attributes={"gen_ai.usage.output_tokens": 7}):
                pass
        tel.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    spans = {s["name"]: s for s in read_store(store)}
    assert spans["inner"]["parent_span_id"] == spans["outer"]["span_id"]
    assert spans["inner"]["attributes"]["gen_ai.usage.output_tokens"] == 7
    assert spans["outer"]["service"] == "privlm-test"


def test_bidi_stream_spans_end_with_the_call():
    """Stream-stream calls (the risk-alert stream's shape): client span ends when the call does, even
    if the caller stops reading early, and the server span is its child."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from privlm.base.grpcserver import new_server
    from privlm.base.telemetry import server_interceptors

    memory = InMemorySpanExporter()
    tel = setup_telemetry(TelemetryConfig(service_name="privlm-test", export_delay_ms=10), set_global=False,
                          extra_exporters=[memory])

    async def echo(request_iterator, context):
        async for item in request_iterator:
            yield item.upper()

    async def scenario():
        server = new_server(server_interceptors(tel.tracer_provider, Instruments(tel.meter_provider)))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(echo)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             interceptors=client_interceptors(tel.tracer_provider)) as ch:
            chat = ch.stream_stream("/test.Echo/Chat")

            async def requests():
                for x in (b"a", b"b", b"c"):
                    yield x
            full = [m async for m in chat(requests())]
            call = chat(requests())
            first = await call.read()          # read one answer, then walk away
            call.cancel()
        await server.stop(0.5)
        return full, first

    full, first = asyncio.run(scenario())
    tel.shutdown()
    assert full == [b"A", b"B", b"C"] and first == b"A"
    spans = memory.get_finished_spans()
    clients = [s for s in spans if s.name == "/test.Echo/Chat" and s.kind.name == "CLIENT"]
    servers = [s for s in spans if s.name == "/test.Echo/Chat" and s.kind.name == "SERVER"]
    assert len(clients) == 2 and len(servers) == 2, "both calls' spans ended and were exported"
    client_ids = {c.context.span_id for c in clients}
    assert {s.parent.span_id for s in servers} == client_ids
    assert all(s.context.trace_id in {c.context.trace_id for c in clients} for s in servers)
