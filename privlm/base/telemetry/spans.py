"""Named business spans: one per generation request, plus queue/prefill/decode phases in the worker.

Gateway: wrap the request in `GenerationSpan` (a live span, current while the worker is called, so
the worker's RPC span is its child). Worker: the engine thread stamps a `RequestTimeline` (integer
timestamps only, nothing else on the hot path); when the request ends the servicer calls
`emit_spans()` with the RPC's context, which writes privlm.queue / privlm.prefill / privlm.decode as
children of the worker's RPC span and records the latency histograms.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from privlm.base.telemetry import instruments as I


def _sampling_attrs(max_tokens, temperature, top_p, top_k) -> dict:
    attrs = {}
    if max_tokens is not None:
        attrs[I.GEN_AI_REQUEST_MAX_TOKENS] = int(max_tokens)
    if temperature is not None:
        attrs[I.GEN_AI_REQUEST_TEMPERATURE] = float(temperature)
    if top_p is not None:
        attrs[I.GEN_AI_REQUEST_TOP_P] = float(top_p)
    if top_k:
        attrs[I.GEN_AI_REQUEST_TOP_K] = int(top_k)
    return attrs


class GenerationSpan:
    """Context manager for one generation request's business span (`gen_ai.*` attributes).

        with GenerationSpan(tracer, model="smollm2", request_id=rid, operation="chat") as g:
            async for ids in worker_stream:  # the worker call is a child of this span
                g.tokens(len(ids))
            g.finish("stop", prompt_tokens=n_in, completion_tokens=n_out)
    """

    def __init__(self, tracer: trace.Tracer, *, model: str, request_id: str = "", operation: str = "chat",
                 name: str | None = None, instruments: I.Instruments | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None):
        attrs = {I.GEN_AI_OPERATION_NAME: operation, I.GEN_AI_REQUEST_MODEL: model,
                 **_sampling_attrs(max_tokens, temperature, top_p, top_k)}
        if request_id:
            attrs[I.PRIVLM_REQUEST_ID] = request_id
        self.model = model
        self.operation = operation
        self.instruments = instruments
        self.span = tracer.start_span(name or f"{operation} {model}", kind=SpanKind.INTERNAL, attributes=attrs)
        self._start_ns = time.monotonic_ns()
        self._first_ns = 0
        self._last_ns = 0
        self._out = 0
        self._prompt = 0
        self._reason = ""
        self._token = None

    def __enter__(self) -> "GenerationSpan":
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def tokens(self, n: int = 1) -> None:
        """Count n output tokens that just arrived (the first call marks time to first token)."""
        if n <= 0:
            return
        now = time.monotonic_ns()
        if not self._first_ns:
            self._first_ns = now
            self.span.add_event(I.EVENT_FIRST_TOKEN)
        self._last_ns = now
        self._out += n

    def finish(self, finish_reason: str, *, prompt_tokens: int, completion_tokens: int | None = None) -> None:
        self._reason = finish_reason
        self._prompt = prompt_tokens
        if completion_tokens is not None:
            self._out = completion_tokens

    def __exit__(self, exc_type, exc, tb) -> None:
        import asyncio

        if exc_type is not None:
            if issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
                self._reason = self._reason or "cancelled"
            else:
                self.span.set_status(Status(StatusCode.ERROR, exc_type.__name__))
                self.span.set_attribute("error.type", exc_type.__name__)
        end = time.monotonic_ns()
        duration_s = (end - self._start_ns) / 1e9
        ttft_s = (self._first_ns - self._start_ns) / 1e9 if self._first_ns else None
        tpot_s = ((self._last_ns - self._first_ns) / 1e9 / (self._out - 1)) if self._out > 1 else None
        attrs = {I.GEN_AI_USAGE_INPUT_TOKENS: self._prompt, I.GEN_AI_USAGE_OUTPUT_TOKENS: self._out}
        if self._reason:
            attrs[I.GEN_AI_RESPONSE_FINISH_REASONS] = (self._reason,)
        if ttft_s is not None:
            attrs[I.PRIVLM_TTFT_MS] = ttft_s * 1e3
        if tpot_s is not None:
            attrs[I.PRIVLM_TPOT_MS] = tpot_s * 1e3
        self.span.set_attributes(attrs)
        try:
            self.span.end()
        finally:
            if self._token is not None:
                otel_context.detach(self._token)
        if self.instruments is not None:
            self.instruments.record_generation(
                model=self.model, finish_reason=self._reason or "error", prompt_tokens=self._prompt,
                completion_tokens=self._out, duration_s=duration_s, ttft_s=ttft_s, tpot_s=tpot_s,
                operation=self.operation)


@dataclass(slots=True)
class RequestTimeline:
    """Wall-clock stamps (time.time_ns) of one request inside the worker; set from any thread."""
    prompt_tokens: int = 0
    submitted_ns: int = field(default_factory=time.time_ns)
    admitted_ns: int = 0
    first_token_ns: int = 0
    finished_ns: int = 0
    output_tokens: int = 0
    finish_reason: str = ""

    def admitted(self) -> None:
        if not self.admitted_ns:
            self.admitted_ns = time.time_ns()

    def token(self, n: int = 1) -> None:
        """n output tokens produced; the first call ends prefill (time to first token)."""
        if not self.first_token_ns:
            self.first_token_ns = time.time_ns()
        self.output_tokens += n

    def finished(self, reason: str) -> None:
        self.finished_ns = time.time_ns()
        self.finish_reason = reason

    def emit_spans(self, tracer: trace.Tracer, parent: otel_context.Context | None = None, *, model: str = "",
                   instruments: I.Instruments | None = None) -> None:
        """Write queue/prefill/decode spans under `parent` (the RPC's context) and record histograms."""
        end = self.finished_ns or time.time_ns()
        admitted = self.admitted_ns or self.first_token_ns or end
        first = self.first_token_ns
        base = {I.GEN_AI_REQUEST_MODEL: model} if model else {}
        tracer.start_span(I.SPAN_QUEUE, context=parent, start_time=self.submitted_ns,
                          attributes=base).end(end_time=admitted)
        prefill = tracer.start_span(I.SPAN_PREFILL, context=parent, start_time=admitted,
                                    attributes={**base, I.GEN_AI_USAGE_INPUT_TOKENS: self.prompt_tokens})
        prefill.end(end_time=first or end)
        if first:
            decode = tracer.start_span(I.SPAN_DECODE, context=parent, start_time=first, attributes={
                **base, I.GEN_AI_USAGE_OUTPUT_TOKENS: self.output_tokens,
                I.GEN_AI_RESPONSE_FINISH_REASONS: (self.finish_reason or "unknown",)})
            decode.end(end_time=end)
        if instruments is not None:
            ttft = (first - self.submitted_ns) / 1e9 if first else None
            tpot = (end - first) / 1e9 / (self.output_tokens - 1) if first and self.output_tokens > 1 else None
            instruments.record_queue_wait((admitted - self.submitted_ns) / 1e9, model)
            instruments.record_generation(model=model, finish_reason=self.finish_reason or "unknown",
                                          prompt_tokens=self.prompt_tokens, completion_tokens=self.output_tokens,
                                          duration_s=(end - self.submitted_ns) / 1e9, ttft_s=ttft, tpot_s=tpot,
                                          operation="generate")


@contextmanager
def he_operation(op: str, tracer: trace.Tracer | None = None, instruments: I.Instruments | None = None,
                 **attributes) -> Iterator[trace.Span]:
    """Span `privlm.he.<op>` and the privlm.he.operation.duration histogram around one HE operation.

    attributes: sizes and counts only (e.g. vector_size=4096, ciphertexts=8), never values or keys.
    """
    tracer = tracer or trace.get_tracer("privlm.he")
    start = time.perf_counter()
    with tracer.start_as_current_span(f"privlm.he.{op}", attributes={I.PRIVLM_HE_OP: op, **attributes}) as span:
        try:
            yield span
        finally:
            (instruments or I.get()).record_he_op(op, time.perf_counter() - start)
