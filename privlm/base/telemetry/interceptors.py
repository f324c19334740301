"""gRPC aio interceptors: W3C trace context across every hop, RPC metrics by status code.

Pass `server_interceptors()` to privlm.base.grpcserver.new_server(...) and `client_interceptors()` to
grpc.aio.insecure_channel/secure_channel(..., interceptors=...). Health checks and reflection are
neither traced nor counted (`privlm up` polls health; those spans would drown the real ones).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import grpc
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters

from privlm.base.telemetry import instruments as _instruments

_UNTRACED = ("grpc.health.v1.Health", "grpc.reflection.")


def _traced() -> Callable[[Any], bool]:
    return filters.negate(filters.any_of(*(filters.service_prefix(s) for s in _UNTRACED)))


def _untraced_method(method: str) -> bool:
    return method.lstrip("/").startswith(_UNTRACED)


def _code_name(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    """The RPC's final code. A response stream closed from outside (GeneratorExit: grpc dropped it
    once the call ended from the client's side) is CANCELLED, or DEADLINE_EXCEEDED, unless the
    servicer set a code first (the worker sets OK before its final message)."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc without ServicerContext.code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for sc in grpc.StatusCode:
            if sc.value[0] == code:
                return sc.name
    if isinstance(exc, GeneratorExit):
        left = context.time_remaining()
        return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
    if exc is not None:
        return "UNKNOWN"
    return "OK"


class MetricsServerInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, and records its server-side latency."""

    def __init__(self, instruments: _instruments.Instruments | None = None):
        self._instruments = instruments

    @property
    def instruments(self) -> _instruments.Instruments:
        return self._instruments or _instruments.get()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details):
        handler = await continuation(details)
        if handler is None or _untraced_method(details.method):
            return handler
        method = details.method
        record = self.instruments.record_rpc

        def wrap_unary(fn):
            async def call(request, context):
                t0 = time.perf_counter()
                exc = None
                try:
                    return await fn(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(method, _code_name(context, exc), time.perf_counter() - t0)
            return call

        def wrap_stream(fn):
            async def call(request_or_iterator, context):
                t0 = time.perf_counter()
                exc = None
                try:
                    async for item in fn(request_or_iterator, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(method, _code_name(context, exc), time.perf_counter() - t0)
            return call

        from privlm.base.grpcserver import rewrap

        return rewrap(handler, wrap_unary, wrap_stream)


def server_interceptors(tracer_provider: trace.TracerProvider | None = None,
                        instruments: _instruments.Instruments | None = None) -> list[grpc.aio.ServerInterceptor]:
    """[OpenTelemetry server span (extracts traceparent), RPC metrics]; None -> the global providers."""
    return [aio_server_interceptor(tracer_provider=tracer_provider, filter_=_traced()),
            MetricsServerInterceptor(instruments)]


class _StreamingClientSpan:
    """Client span for response-streaming calls that ends when the call ends, however it ends.

    opentelemetry-instrumentation-grpc ends a streaming client span only when the response iterator
    is exhausted; a caller that stops reading early and cancels leaves the span open until garbage
    collection, so it is exported late or never. Ending it from the call's done-callback gives the
    right duration and status either way.
    """

    def __init__(self, tracer: trace.Tracer, traced: Callable[[Any], bool]):
        self._tracer, self._traced = tracer, traced
        self._pending: set[asyncio.Task] = set()

    async def _start(self, continuation, details, request):
        if not self._traced(details):
            return await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(method, kind=trace.SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        propagate.inject(metadata, context=trace.set_span_in_context(span), setter=_MetadataSetter())
        new_details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                                 details.wait_for_ready)
        try:
            call = await continuation(new_details, request)
        except BaseException as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        call.add_done_callback(lambda c: self._finish_soon(c, span))
        return call

    def _finish_soon(self, call, span) -> None:
        task = asyncio.ensure_future(self._finish(call, span))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @staticmethod
    async def _finish(call, span) -> None:
        try:
            code = await call.code()
            span.set_attribute(RPC_GRPC_STATUS_CODE_ATTR, code.value[0])
            # CANCELLED here is the caller's own decision (e.g. its client went away), not a failure
            # of the call; a finished stream is read to its end and ends OK (gateway/worker_client.py).
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {await call.details()}"))
        finally:
            span.end()


class _MetadataSetter:
    def set(self, carrier, key, value):
        carrier[key] = value


RPC_GRPC_STATUS_CODE_ATTR = "rpc.grpc.status_code"


class _UnaryStreamSpan(_StreamingClientSpan, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._start(continuation, client_call_details, request)


class _StreamStreamSpan(_StreamingClientSpan, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._start(continuation, client_call_details, request_iterator)


def client_interceptors(tracer_provider: trace.TracerProvider | None = None) -> list[grpc.aio.ClientInterceptor]:
    """Client spans that inject W3C traceparent into each call's metadata.

    Unary-response calls use opentelemetry-instrumentation-grpc's aio interceptors; response-streaming
    calls use _StreamingClientSpan (see its docstring for why).
    """
    traced = _traced()
    otel = aio_client_interceptors(tracer_provider=tracer_provider, filter_=traced)
    unary = [i for i in otel if not isinstance(i, (grpc.aio.UnaryStreamClientInterceptor,
                                                     grpc.aio.StreamStreamClientInterceptor))]
    tracer = trace.get_tracer("privlm.base.telemetry.grpc", tracer_provider=tracer_provider)
    return [*unary, _UnaryStreamSpan(tracer, traced), _StreamStreamSpan(tracer, traced)]
