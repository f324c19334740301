"""Building blocks every privlm gRPC server uses: status mapping, health, reflection, bind.

Every service exposes `create_server(config) -> (server, port)`; tests bind port 0.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from privlm.base.errors import InvalidArgument, status_for

log = logging.getLogger("privlm.grpc")
# A status message travels in the trailer (16 KiB by default, else the caller sees RESOURCE_EXHAUSTED
# instead of the real code); messages quote client strings through errors.echo, this caps the rest.
MAX_STATUS_CHARS = 1024


_KEEP = object()
_KINDS = (("unary_unary", False, grpc.unary_unary_rpc_method_handler),
          ("unary_stream", True, grpc.unary_stream_rpc_method_handler),
          ("stream_unary", False, grpc.stream_unary_rpc_method_handler),
          ("stream_stream", True, grpc.stream_stream_rpc_method_handler))


def rewrap(handler, wrap_unary, wrap_stream, request_deserializer=_KEEP):
    """Rebuild an RPC method handler with its behaviour wrapped: `wrap_unary(fn)` for single
    responses, `wrap_stream(fn)` for streamed ones (the shape every server interceptor here needs)."""
    des = handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
    for attr, streams, make in _KINDS:
        fn = getattr(handler, attr)
        if fn:
            return make((wrap_stream if streams else wrap_unary)(fn), des, handler.response_serializer)
    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Map exceptions escaping a servicer to gRPC status codes, by type (privlm.base.errors)."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        parse = handler.request_deserializer

        def decode(raw):
            """Parse inside the mapping: a malformed message is INVALID_ARGUMENT, not INTERNAL."""
            if parse is None:
                return raw
            try:
                return parse(raw)
            except Exception as exc:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
                raise InvalidArgument(f"malformed request message for {method}: {type(exc).__name__}") from None

        async def decode_stream(raw_iterator):
            async for raw in raw_iterator:
                yield decode(raw)

        streaming_request = bool(handler.stream_unary or handler.stream_stream)

        def wrap_unary(fn):
            async def call(request, context):
                try:
                    req = decode_stream(request) if streaming_request else decode(request)
                    return await fn(req, context)
                except Exception as exc:  # noqa: BLE001 - mapped, never leaked raw
                    await _abort(context, exc, method)
            return call

        def wrap_stream(fn):
            async def call(request, context):
                try:
                    req = decode_stream(request) if streaming_request else decode(request)
                    async for item in fn(req, context):
                        yield item
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method)
            return call

        # Requests reach us as bytes (deserializer None) so that decoding errors are mapped too.
        return rewrap(handler, wrap_unary, wrap_stream, request_deserializer=None)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    # context.abort raises an AbortError itself; let that one through untouched.
    if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
        raise exc
    code, message = status_for(exc)
    if len(message) > MAX_STATUS_CHARS:
        message = message[:MAX_STATUS_CHARS] + "..."
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", method)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register grpc.health.v1 and reflection; returns the health servicer (set statuses on it)."""
    names = list(service_names)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def new_server(interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
               max_message_bytes: int = 8 * 1024 * 1024,
               inner_interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """An aio server: `interceptors` (e.g. tracing) see the final status; the status mapping comes
    next, so exceptions raised by `inner_interceptors` (e.g. authentication) and by servicers are
    mapped to gRPC codes. The first interceptor in the list is the outermost."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    return grpc.aio.server(interceptors=[*interceptors, StatusInterceptor(), *inner_interceptors],
                           options=options)


async def wait_for_stop(port: int, ready_file=None) -> None:
    """Announce readiness (`{"port": N}` in ready_file, for supervisors) and block until SIGTERM/SIGINT."""
    import asyncio
    import json
    import signal

    if ready_file:
        ready_file.write_text(json.dumps({"port": port}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def bind(server: grpc.aio.Server, host: str, port: int,
         credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind host:port (0 picks a free port) and return the bound port; fail loudly if it can't."""
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    return bound
