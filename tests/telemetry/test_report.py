"""`privlm trace-report` from the receiver's store and from a Jaeger query API (served locally)."""
from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import grpc
import numpy as np
import pytest
from obs_chain import start_gateway, start_worker

from privlm.base.telemetry import TelemetryConfig, client_interceptors, setup_telemetry
from privlm.base.telemetry.instruments import Instruments
from privlm.base.telemetry.receiver import create_receiver
from privlm.base.telemetry.report import critical_path, main, percentile
from privlm.base.telemetry.spanstore import read_store
from privlm.v1 import inference_pb2, inference_pb2_grpc

N_REQUESTS = 6


def _span(sid, parent, name, start, end, service="svc"):
    return {"trace_id": "t1", "span_id": sid, "parent_span_id": parent, "name": name, "kind": "INTERNAL",
            "service": service, "start_ns": start, "end_ns": end, "status": "UNSET", "status_message": "",
            "attributes": {}, "events": []}


def test_critical_path_of_overlapping_children():
    spans = [_span("r", "", "root", 0, 100), _span("a", "r", "A", 10, 40), _span("b", "r", "B", 30, 90),
             _span("c", "b", "C", 50, 80)]
    self_time = defaultdict(int)
    for span, a, b in critical_path(spans):
        assert b > a
        self_time[span["name"]] += b - a
    # root 0-10 and 90-100; A 10-30 (its tail is hidden behind B); B 30-50 and 80-90; C 50-80
    assert dict(self_time) == {"root": 20, "A": 20, "B": 30, "C": 30}


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    xs = list(rng.exponential(10.0, 257))
    for q in (0, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "spans.jsonl"

    async def scenario():
        receiver, rport = await create_receiver(path)
        tel = setup_telemetry(TelemetryConfig(service_name="privlm-test", otlp_endpoint=f"127.0.0.1:{rport}",
                                              export_delay_ms=50), set_global=False)
        inst = Instruments(tel.meter_provider)
        worker, wport = await start_worker(tel.tracer_provider, inst)
        gw, gport = await start_gateway(f"127.0.0.1:{wport}", tel.tracer_provider, inst)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}",
                                             interceptors=client_interceptors(tel.tracer_provider)) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            for i in range(N_REQUESTS):
                req = inference_pb2.GenerateRequest(prompt="hi", request_id=f"r{i}",
                                                    sampling=inference_pb2.SamplingParams(max_new_tokens=3 + i))
                [m async for m in stub.GenerateStream(req)]
        await gw.stop(0.5)
        await worker.stop(0.5)
        await asyncio.to_thread(tel.shutdown)
        await receiver.stop(1.0)

    asyncio.run(scenario())
    return path


def _report(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_report_from_store(store, capsys):
    r = _report(capsys, ["--store", str(store)])
    assert r["traces"] == N_REQUESTS
    rpcs = {(x["rpc"], x["kind"]): x for x in r["by_rpc"]}
    gen = rpcs[("/privlm.v1.Inference/GenerateStream", "SERVER")]
    assert gen["count"] == N_REQUESTS and gen["errors"] == 0
    assert gen["p50"] <= gen["p95"] <= gen["p99"] <= gen["max"]
    assert rpcs[("/privlm.internal.v1.Worker/Generate", "CLIENT")]["count"] == N_REQUESTS
    assert r["time_to_first_token_ms"]["gateway"]["count"] == N_REQUESTS
    assert r["time_to_first_token_ms"]["worker"]["count"] == N_REQUESTS
    assert r["time_per_output_token_ms"]["worker"]["count"] == N_REQUESTS
    # the test worker sleeps >= 2 ms per token
    assert r["time_per_output_token_ms"]["worker"]["p50"] >= 1.5
    slow = r["slowest"]
    assert len(slow) == 3 and slow[0]["duration_ms"] >= slow[-1]["duration_ms"]
    for t in slow:   # the critical path accounts for the whole request
        assert sum(p["ms"] for p in t["critical_path"]) == pytest.approx(t["duration_ms"], rel=1e-6)
        assert any("privlm.decode" in p["span"] for p in t["critical_path"])
    assert main(["--store", str(store)]) == 0
    text = capsys.readouterr().out
    assert "per RPC" in text and "critical path" in text and "time to first token (gateway)" in text


def _to_jaeger(records: list[dict]) -> dict:
    """Jaeger's query API shape: microsecond times, CHILD_OF references, tags, processes."""
    traces: dict[str, dict] = {}
    for r in records:
        tr = traces.setdefault(r["trace_id"], {"traceID": r["trace_id"], "spans": [], "processes": {}})
        pid = next((k for k, v in tr["processes"].items() if v["serviceName"] == r["service"]), None)
        if pid is None:
            pid = f"p{len(tr['processes']) + 1}"
            tr["processes"][pid] = {"serviceName": r["service"], "tags": []}
        tags = [{"key": k, "type": "string", "value": v} for k, v in r["attributes"].items()]
        tags.append({"key": "span.kind", "type": "string", "value": r["kind"].lower()})
        if r["status"] == "ERROR":
            tags += [{"key": "otel.status_code", "type": "string", "value": "ERROR"},
                     {"key": "error", "type": "bool", "value": True}]
        start_us = r["start_ns"] // 1000
        tr["spans"].append({
            "traceID": r["trace_id"], "spanID": r["span_id"], "operationName": r["name"],
            "references": ([{"refType": "CHILD_OF", "traceID": r["trace_id"], "spanID": r["parent_span_id"]}]
                           if r["parent_span_id"] else []),
            "startTime": start_us, "duration": r["end_ns"] // 1000 - start_us, "tags": tags, "processID": pid,
            "logs": [{"timestamp": e["time_ns"] // 1000, "fields": [{"key": "event", "value": e["name"]}]}
                     for e in r["events"]]})
    return {"data": list(traces.values())}


def test_report_from_jaeger_query_api(store, capsys):
    records = read_store(store)
    payload = _to_jaeger(records)
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            seen.append(url.path)
            if url.path == "/api/services":
                body = {"data": sorted({r["service"] for r in records})}
            elif url.path == "/api/traces" and parse_qs(url.query).get("service"):
                body = payload
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = _report(capsys, ["--jaeger", f"http://127.0.0.1:{httpd.server_port}"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "/api/services" in seen and "/api/traces" in seen
    direct = _report(capsys, ["--store", str(store)])
    assert r["traces"] == direct["traces"] and r["spans"] == direct["spans"]
    for a, b in zip(r["by_rpc"], direct["by_rpc"]):
        assert (a["rpc"], a["kind"], a["count"]) == (b["rpc"], b["kind"], b["count"])
        assert a["p99"] == pytest.approx(b["p99"], abs=0.01)   # Jaeger keeps microseconds
    assert r["time_to_first_token_ms"]["gateway"]["count"] == N_REQUESTS
