"""The public gRPC server (privlm.v1.Inference): a thin adapter over GatewayService."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import grpc

from gateway.config import GatewayConfig
from gateway.service import Chunk, GatewayService, GenerateInput
from gateway.tenants import TenantInterceptor, current_tenant
from privlm.base.errors import InvalidArgument
from privlm.base.grpcserver import NOT_SERVING, SERVING, add_health_and_reflection, bind, new_server, wait_for_stop
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("privlm.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
# Health names that follow the worker groups: what needs generation. Audit and the risk stream
# (HE scoring; explanations are skipped without a model) stay SERVING while no worker answers.
GENERATION_SERVICES = ("", SERVICE_NAME, "privlm.v1.Confidential")
FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP,
          "eos": pb.FINISH_REASON_END_OF_SEQUENCE, "cancelled": pb.FINISH_REASON_CANCELLED}


def input_from_pb(req: pb.GenerateRequest | pb.TokenizeRequest, config: GatewayConfig) -> GenerateInput:
    """Counts are checked before the repeated fields become tuples: that copy is per element."""
    tenant = current_tenant.get()
    which = req.WhichOneof("input")
    if which == "chat" and len(req.chat.messages) > config.max_chat_messages:
        raise InvalidArgument(f"chat.messages: at most {config.max_chat_messages} messages")
    if isinstance(req, pb.GenerateRequest) and len(req.sampling.stop) > config.max_stop_sequences:
        raise InvalidArgument(f"sampling.stop: at most {config.max_stop_sequences} stop sequences")
    messages = tuple((m.role, m.content) for m in req.chat.messages) if which == "chat" else None
    prompt = req.prompt if which == "prompt" else None
    if not isinstance(req, pb.GenerateRequest):
        return GenerateInput(model=req.model, prompt=prompt, messages=messages, tenant=tenant)
    s = req.sampling
    return GenerateInput(
        model=req.model, prompt=prompt, messages=messages,
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), request_id=req.request_id, tenant=tenant)


def _usage(c: Chunk) -> pb.Usage:
    return pb.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, service: GatewayService):
        self.service = service

    async def GenerateStream(self, request, context):
        inp = input_from_pb(request, self.service.config)
        model = inp.model or self.service.default_model
        async for c in self.service.generate(inp, timeout=context.time_remaining()):
            msg = pb.GenerateStreamResponse(text=c.text, token_ids=c.token_ids)
            if c.finish:
                msg.finish_reason = FINISH[c.finish]
                msg.usage.CopyFrom(_usage(c))
                msg.model = model
                msg.request_id = request.request_id
            yield msg

    async def Generate(self, request, context):
        inp = input_from_pb(request, self.service.config)
        texts, ids, last = [], [], None
        async for c in self.service.generate(inp, timeout=context.time_remaining()):
            texts.append(c.text)
            ids.extend(c.token_ids)
            last = c
        return pb.GenerateResponse(text="".join(texts), token_ids=ids, finish_reason=FINISH[last.finish],
                                   usage=_usage(last), model=inp.model or self.service.default_model,
                                   request_id=request.request_id)

    async def Tokenize(self, request, context):
        handle, ids = await self.service.tokenize(input_from_pb(request, self.service.config))
        return pb.TokenizeResponse(token_ids=ids, tokens=handle.tokenizer.tokens(ids), count=len(ids),
                                   context_window=handle.info.context_window)

    async def ListModels(self, request, context):
        out = pb.ListModelsResponse()
        for mid, h in self.service.models.items():
            i = h.info
            out.models.add(id=mid, architecture=i.architecture, context_window=i.context_window, dtype=i.dtype,
                           tensor_parallel=i.tensor_parallel, parameters=i.parameters,
                           is_default=(mid == self.service.default_model), backend=i.backend)
        return out


class Mount(Protocol):
    """More services on the gateway's server (the application mounts the confidential layer so):
    called once with the server, the GatewayService and the Inference servicer's GenerateStream,
    returns the full names of the services it added; closed after the server stopped."""

    def __call__(self, server: grpc.aio.Server, service: GatewayService, generate_stream) -> list[str]: ...

    async def close(self) -> None: ...


async def create_server(config: GatewayConfig, server_interceptors=(), client_interceptors=(),
                        mounts: Sequence[Mount] = ()):
    """Build (not start) the gateway: returns (server, port, service, health).

    Connects to every worker group first (Describe), so a started gateway knows each model's
    context window, then follows their health: the GENERATION_SERVICES names are NOT_SERVING while
    no worker group answers. Each of `mounts` adds more services (the confidential layer) to the
    same server.
    """
    service = GatewayService(config, client_interceptors)
    await service.connect()
    inner = []
    if config.tenants:
        inner.append(TenantInterceptor(service.tenants))
    else:
        log.warning("AUTHENTICATION DISABLED (allow_anonymous): development only, never in production")
    server = new_server(server_interceptors, config.max_message_bytes, inner_interceptors=inner)
    servicer = InferenceServicer(service)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    names = [SERVICE_NAME]
    for m in mounts:
        names += m(server, service, servicer.GenerateStream)
    health = add_health_and_reflection(server, names)
    port = bind(server, config.host, config.port, config.transport.server_credentials("gateway"))
    for name in ["", *names]:
        await health.set(name, SERVING)
    following = [n for n in ["", *names] if n in GENERATION_SERVICES]

    async def follow(serving: bool) -> None:
        for name in following:
            await health.set(name, SERVING if serving else NOT_SERVING)
        log.log(logging.INFO if serving else logging.ERROR, "gateway health: %s %s",
                following, "SERVING" if serving else "NOT_SERVING (no worker group answers)")
    service.watch_workers(follow)
    return server, port, service, health


async def serve(config: GatewayConfig, mounts: Sequence[Mount] = (), ready_file: Path | None = None,
                telemetry=None) -> None:
    """Run until SIGTERM/SIGINT, then drain for the grace period and close the mounts."""
    from privlm.base.telemetry import client_interceptors, server_interceptors

    server, port, service, health = await create_server(config, server_interceptors(), client_interceptors(), mounts)
    await server.start()
    log.info("gateway serving on %s:%d, models %s", config.host, port, list(service.models))
    await wait_for_stop(port, ready_file)
    log.info("gateway draining (grace %.1fs)", config.grace_seconds)
    await health.enter_graceful_shutdown()
    await server.stop(config.grace_seconds)
    for m in mounts:
        await m.close()
    await service.close()
    if telemetry is not None:
        telemetry.shutdown()
