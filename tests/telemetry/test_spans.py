"""Business spans: attributes, TTFT/TPOT, cancellation and errors, and the metrics they record."""
from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from privlm.base.telemetry.instruments import Instruments
from privlm.base.telemetry.spans import GenerationSpan, RequestTimeline


@pytest.fixture
def env():
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    inst = Instruments(MeterProvider(metric_readers=[reader]))
    return tp.get_tracer("t"), exporter, reader, inst


def _points(reader, name):
    data = reader.get_metrics_data()
    return [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == name
            for p in m.data.data_points]


def test_generation_span_attributes_and_metrics(env):
    tracer, exporter, reader, inst = env
    with GenerationSpan(tracer, model="m", request_id="r-9", instruments=inst, max_tokens=8, temperature=0.0) as g:
        g.tokens(1)
        g.tokens(2)
        g.tokens(0)
        g.finish("stop", prompt_tokens=11)
    (span,) = exporter.get_finished_spans()
    a = span.attributes
    assert span.name == "chat m"
    assert a["gen_ai.request.model"] == "m" and a["privlm.request_id"] == "r-9"
    assert a["gen_ai.request.max_tokens"] == 8 and a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.usage.input_tokens"] == 11 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["privlm.time_to_first_token_ms"] >= 0 and a["privlm.time_per_output_token_ms"] >= 0
    assert [e.name for e in span.events] == ["gen_ai.first_token"]
    assert _points(reader, "gen_ai.server.request.duration")[0].count == 1
    tokens = {p.attributes["gen_ai.token.type"]: p.value for p in _points(reader, "privlm.tokens")}
    assert tokens == {"input": 11, "output": 3}


def test_cancelled_and_failed_generation(env):
    tracer, exporter, reader, inst = env

    async def cancelled():
        with GenerationSpan(tracer, model="m", instruments=inst) as g:
            g.tokens(1)
            raise asyncio.CancelledError
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled())
    with pytest.raises(KeyError):
        with GenerationSpan(tracer, model="m", instruments=inst):
            raise KeyError("user text")
    c, f = exporter.get_finished_spans()
    assert c.attributes["gen_ai.response.finish_reasons"] == ("cancelled",)
    assert c.status.status_code != StatusCode.ERROR
    assert f.status.status_code == StatusCode.ERROR and f.status.description == "KeyError"
    assert f.attributes["error.type"] == "KeyError"
    reasons = {p.attributes["gen_ai.response.finish_reasons"] for p in _points(reader, "gen_ai.server.request.duration")}
    assert reasons == {"cancelled", "error"}


def test_request_timeline_spans_are_ordered(env):
    tracer, exporter, reader, inst = env
    tl = RequestTimeline(prompt_tokens=5)
    tl.admitted()
    for _ in range(4):
        tl.token()
    tl.finished("length")
    with tracer.start_as_current_span("rpc") as rpc:
        from opentelemetry import context

        tl.emit_spans(tracer, context.get_current(), model="m", instruments=inst)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    q, p, d = spans["privlm.queue"], spans["privlm.prefill"], spans["privlm.decode"]
    for s in (q, p, d):
        assert s.parent.span_id == rpc.get_span_context().span_id
    assert q.start_time <= q.end_time == p.start_time <= p.end_time == d.start_time <= d.end_time
    assert d.attributes["gen_ai.usage.output_tokens"] == 4
    assert _points(reader, "privlm.queue.wait")[0].count == 1
    assert _points(reader, "gen_ai.server.time_per_output_token")[0].count == 1


def test_he_operation_span_and_histogram(env):
    from privlm.base.telemetry.spans import he_operation

    tracer, exporter, reader, inst = env
    with he_operation("ckks.dot", tracer, inst, vector_size=4096):
        pass
    with pytest.raises(ValueError):
        with he_operation("ckks.polyval", tracer, inst):
            raise ValueError("scale out of bounds")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["privlm.he.ckks.dot"].attributes["vector_size"] == 4096
    assert spans["privlm.he.ckks.polyval"].status.status_code == StatusCode.ERROR
    ops = {p.attributes["privlm.he.operation"]: p.count for p in _points(reader, "privlm.he.operation.duration")}
    assert ops == {"ckks.dot": 1, "ckks.polyval": 1}


def test_engine_extra_becomes_moe_and_fp8_gauges(env):
    _, _, reader, inst = env
    inst.observe_engine_extra(lambda: {"expert_max_over_mean": 2.5, "rank_max_over_mean": 1.25,
                                       "tokens_routed": 798.0, "fp8_tensor_core_fraction": 1.0, "preemptions": 0.0})
    inst.observe_engine_extra(lambda: {"preemptions": 3.0})                  # a dense model: no MoE gauges
    imb = {p.attributes["privlm.moe.scope"]: p.value for p in _points(reader, "privlm.moe.imbalance")}
    assert imb == {"expert": 2.5, "rank": 1.25}
    assert [p.value for p in _points(reader, "privlm.moe.tokens_routed")] == [798.0]
    assert [p.value for p in _points(reader, "privlm.fp8.tensor_core_fraction")] == [1.0]
