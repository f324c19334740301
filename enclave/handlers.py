"""Register a servicer whose requests are parsed after every interceptor, not before.

gRPC applies a method handler's request_deserializer before any interceptor's wrapper runs, and
privlm's StatusInterceptor (outermost, so it can map errors) parses the bytes before calling the
inner interceptors. Either way an unauthenticated caller would learn whether its bytes parse
(INVALID_ARGUMENT) before the tenant interceptor refuses it. Registering the handlers with no
deserializer hands the raw bytes through every interceptor; the servicer side parses them last.
"""
from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from privlm.base.errors import InvalidArgument


def _parser(method: str, request_class):
    def parse(raw: bytes):
        try:
            return request_class.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
            raise InvalidArgument(f"malformed request message for {method}: {type(exc).__name__}") from None
    return parse


def _unary(fn, parse):
    async def call(raw, context):
        return await fn(parse(raw), context)
    return call


def _streaming(fn, parse):
    async def call(raw, context):
        async for item in fn(parse(raw), context):
            yield item
    return call


def add_servicer_parsing_last(server: grpc.aio.Server, service: ServiceDescriptor, servicer) -> None:
    """Like the generated add_*Servicer_to_server, for unary-request methods, parsing innermost."""
    handlers = {}
    for m in service.methods:
        if m.client_streaming:
            raise ValueError(f"{service.full_name}/{m.name}: streaming requests are not supported here")
        parse = _parser(f"/{service.full_name}/{m.name}", GetMessageClass(m.input_type))
        serialize = GetMessageClass(m.output_type).SerializeToString
        fn = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(_streaming(fn, parse), None, serialize)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(_unary(fn, parse), None, serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
