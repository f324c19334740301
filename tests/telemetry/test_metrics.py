"""The Prometheus endpoint, scraped over HTTP and parsed; the alert rules file checked against it."""
from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from obs_chain import start_gateway, start_worker
from prometheus_client.parser import text_string_to_metric_families

from privlm.base.telemetry import TelemetryConfig, setup_telemetry
from privlm.base.telemetry.canary import ALERT_THRESHOLD
from privlm.base.telemetry.instruments import CpuUtilization, Instruments
from privlm.v1 import inference_pb2, inference_pb2_grpc

ALERTS = Path(__file__).resolve().parents[2] / "docs" / "prometheus" / "alerts.yml"


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


@pytest.fixture
def telemetry():
    tel = setup_telemetry(TelemetryConfig(service_name="privlm-test", metrics_port=0), set_global=False)
    yield tel
    tel.shutdown()


def _run_chain(instruments: Instruments, tracer_provider) -> list[str]:
    """Two good streams and one that fails inside the gateway; returns the client-side codes."""
    async def go():
        worker, wport = await start_worker(tracer_provider, instruments)
        gw, gport = await start_gateway(f"127.0.0.1:{wport}", tracer_provider, instruments)
        codes = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            for prompt in ("hello", "world", "FAIL: boom"):
                req = inference_pb2.GenerateRequest(prompt=prompt, sampling=inference_pb2.SamplingParams(
                    max_new_tokens=4))
                try:
                    [m async for m in stub.GenerateStream(req)]
                    codes.append("OK")
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code().name)
        await gw.stop(0.5)
        await worker.stop(0.5)
        return codes
    return asyncio.run(go())


def test_metrics_endpoint_counts_requests_by_status(telemetry):
    inst = Instruments(telemetry.meter_provider)
    codes = _run_chain(inst, telemetry.tracer_provider)
    assert codes == ["OK", "OK", "INTERNAL"]
    m = scrape(telemetry.metrics_port)
    req = {(s.labels["rpc_method"], s.labels["rpc_grpc_status_code"]): s.value for s in m["privlm_requests_total"]}
    assert req[("/privlm.v1.Inference/GenerateStream", "OK")] == 2
    assert req[("/privlm.v1.Inference/GenerateStream", "INTERNAL")] == 1
    assert req[("/privlm.internal.v1.Worker/Generate", "OK")] == 2
    outcome = {s.labels["rpc_grpc_status_code"]: s.labels["privlm_outcome"] for s in m["privlm_requests_total"]}
    assert outcome == {"OK": "ok", "INTERNAL": "server_error"}
    assert not any("grpc.health" in s.labels.get("rpc_method", "") for s in m["privlm_requests_total"])
    # latency histograms: cumulative buckets ending in +Inf == count
    for name in ("gen_ai_server_request_duration_seconds", "gen_ai_server_time_to_first_token_seconds",
                 "gen_ai_server_time_per_output_token_seconds", "privlm_queue_wait_seconds",
                 "privlm_rpc_server_duration_seconds", "privlm_engine_batch_size"):
        buckets = m[f"{name}_bucket"]
        count = sum(s.value for s in m[f"{name}_count"])
        assert count > 0, name
        inf = sum(s.value for s in buckets if s.labels["le"] == "+Inf")
        assert inf == count, name
    out = [s for s in m["privlm_tokens_total"] if s.labels["gen_ai_token_type"] == "output"
           and s.labels["gen_ai_operation_name"] == "chat"]
    assert sum(s.value for s in out) == 8  # two streams x 4 tokens, counted by the gateway span


def test_observed_gauges_and_alert_names(telemetry):
    inst = Instruments(telemetry.meter_provider)
    inst.record_rpc("/x.Y/Z", "UNAVAILABLE", 0.01)
    inst.observe_kv_cache(lambda: (30, 120))
    util = CpuUtilization()
    sum(i * i for i in range(200_000))  # some CPU time to observe
    inst.observe_utilization(util)
    inst.set_canary(12.0, 10.0)
    inst.record_he_op("ckks.dot", 0.019)
    m = scrape(telemetry.metrics_port)
    assert m["privlm_kv_cache_usage"][0].value == pytest.approx(0.25)
    assert m["privlm_kv_cache_blocks_used"][0].value == 30
    assert 0.0 <= m["privlm_accelerator_utilization"][0].value <= 1.0
    assert m["privlm_he_operation_duration_seconds_count"][0].labels["privlm_he_operation"] == "ckks.dot"

    rules = yaml.safe_load(ALERTS.read_text())
    names = set()
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) >= {"alert", "expr", "for", "labels", "annotations"}, rule.get("alert")
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("page", "warning")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            names.add(rule["alert"])
            for metric, matchers in re.findall(r"\b(privlm_[a-z_]+)\b(?!\s*[=!])(?:\{([^}]*)\})?", rule["expr"]):
                assert metric in m, f"{rule['alert']} uses {metric}, which no privlm process exports"
                for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                    assert any(label in s.labels for s in m[metric]), f"{metric} has no label {label}"
    assert names == {"PrivlmServerErrorRate", "PrivlmCanaryPerplexityUp", "PrivlmAcceleratorUtilizationSwing"}
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert by_name["PrivlmServerErrorRate"]["for"] == "15m" and "> 0.001" in by_name["PrivlmServerErrorRate"]["expr"]
    canary = re.search(r"> ([0-9.]+)", by_name["PrivlmCanaryPerplexityUp"]["expr"])
    assert float(canary.group(1)) == pytest.approx(1 + ALERT_THRESHOLD)
    assert "> 0.30" in by_name["PrivlmAcceleratorUtilizationSwing"]["expr"]
    assert by_name["PrivlmAcceleratorUtilizationSwing"]["for"] == "5m"


def test_entrypoint_path_in_a_fresh_process():
    """init_service() installs the globals; instruments obtained before it still export."""
    import json
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, str(here / "global_process.py")], capture_output=True, text=True,
                         timeout=60, check=True)
    text = json.loads(out.stdout.strip().splitlines()[-1])["text"]
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["privlm_requests_total"].labels["rpc_method"] == "/a.B/C"
    assert samples["privlm_engine_batch_size_sum"].value == 3
    assert 0.0 <= samples["privlm_accelerator_utilization"].value <= 1.0
    assert samples["target_info"].labels["service_name"] == "privlm-global-test"
