"""A secret planted in requests never reaches an exported span, event, log line or metric."""
from __future__ import annotations

import asyncio
import io
import logging
import urllib.request

import grpc
from obs_chain import start_gateway, start_worker
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from privlm.base.telemetry import TelemetryConfig, client_interceptors, setup_telemetry
from privlm.base.telemetry.instruments import Instruments
from privlm.base.telemetry.receiver import create_receiver
from privlm.base.telemetry.redact import REDACTED, install_log_redaction, scrub_traceback
from privlm.v1 import inference_pb2, inference_pb2_grpc

SECRET = "IBAN-DE89370400440532013000-acct-balance-918273.55"


def test_secret_never_exported(tmp_path):
    store = tmp_path / "spans.jsonl"
    memory = InMemorySpanExporter()
    log_buffer = io.StringIO()
    handler = logging.StreamHandler(log_buffer)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    install_log_redaction(root)

    async def scenario():
        receiver, rport = await create_receiver(store)
        tel = setup_telemetry(TelemetryConfig(service_name="privlm-test", otlp_endpoint=f"127.0.0.1:{rport}",
                                              metrics_port=0, export_delay_ms=50),
                              set_global=False, extra_exporters=[memory])
        inst = Instruments(tel.meter_provider)
        worker, wport = await start_worker(tel.tracer_provider, inst)
        gw, gport = await start_gateway(f"127.0.0.1:{wport}", tel.tracer_provider, inst)
        codes = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}",
                                             interceptors=client_interceptors(tel.tracer_provider)) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            requests = [
                inference_pb2.GenerateRequest(prompt=f"My account {SECRET}: what is my balance?", request_id="r1"),
                inference_pb2.GenerateRequest(chat=inference_pb2.Chat(messages=[
                    inference_pb2.ChatMessage(role="user", content=f"Summarise {SECRET}")]), request_id="r2"),
                inference_pb2.GenerateRequest(prompt=f"FAIL: {SECRET}", request_id="r3"),
            ]
            for req in requests:
                try:
                    [m async for m in stub.GenerateStream(req)]
                    codes.append("OK")
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code().name)
                    assert SECRET not in (e.details() or "")
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{tel.metrics_port}/metrics").read().decode()
        await gw.stop(0.5)
        await worker.stop(0.5)
        await asyncio.to_thread(tel.shutdown)
        await receiver.stop(1.0)
        return codes, metrics_text

    try:
        codes, metrics_text = asyncio.run(scenario())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert codes == ["OK", "OK", "INTERNAL"]

    stored = store.read_text()
    spans = memory.get_finished_spans()
    exported = "\n".join(s.to_json() for s in spans)
    logs = log_buffer.getvalue()
    # The scan is meaningful: the spans, logs and events the secret could have reached do exist.
    assert '"privlm.request_id":"r2"' in stored.replace(" ", "")
    assert any(s.status.status_code.name == "ERROR" and s.name.endswith("GenerateStream") for s in spans)
    exc_events = [e for s in spans for e in s.events if e.name == "exception"
                  and e.attributes["exception.type"] == "KeyError"]
    assert exc_events and exc_events[0].attributes["exception.message"] == REDACTED
    assert "obs_chain.py" in exc_events[0].attributes["exception.stacktrace"]
    assert "unhandled error in /privlm.v1.Inference/GenerateStream" in logs and "KeyError" in logs
    for where, text in (("span store", stored), ("exported spans", exported), ("log lines", logs),
                        ("metrics", metrics_text)):
        assert SECRET not in text, f"secret leaked into {where}"
        assert "918273.55" not in text, f"part of the secret leaked into {where}"


def test_scrub_traceback_keeps_frames_drops_messages():
    try:
        {}[SECRET]
    except KeyError:
        import traceback

        text = traceback.format_exc()
    assert SECRET in text
    scrubbed = scrub_traceback(text)
    assert SECRET not in scrubbed
    assert "test_privacy.py" in scrubbed and scrubbed.startswith("Traceback")
