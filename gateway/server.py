"""The public gRPC server (privlm.v1.Inference): a thin adapter over GatewayService."""
from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from gateway.config import GatewayConfig, ModelRoute
from gateway.service import Chunk, GatewayService, GenerateInput
from gateway.tenants import TenantInterceptor, current_tenant, load_tenants
from privlm.errors import InvalidArgument
from privlm.grpcserver import NOT_SERVING, SERVING, add_health_and_reflection, bind, new_server, wait_for_stop
from privlm.transport import add_transport_args, transport_from_args
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


def config_mounts(config: GatewayConfig, service: GatewayService):
    """The services the configuration asks for on the gateway's server: Confidential + Audit (with the
    tenant the gateway authenticated), then the risk stream sharing the same attested runtime."""
    if config.enclave is None:
        return None

    def extra(server, generate_stream) -> list[str]:
        from enclave.gateway_mount import mount

        mounted = mount(server, generate_stream, config.enclave, tenant_of=lambda ctx: current_tenant.get() or None)
        names = list(mounted.names)
        if config.risk is not None:
            from gateway.scenarios.risk import mount_risk_service

            names += mount_risk_service(server, service, config.risk, runtime=mounted.runtime)
        return names
    return extra


async def create_server(config: GatewayConfig, server_interceptors=(), client_interceptors=(),
                        extra_services=None):
    """Build (not start) the gateway: returns (server, port, service, health).

    Connects to every worker group first (Describe), so a started gateway knows each model's
    context window, then follows their health: the GENERATION_SERVICES names are NOT_SERVING while
    no worker group answers. `extra_services(server, generate_stream) -> [service names]` mounts more
    servicers (the confidential-compute layer) on the same server.
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
    extra_services = extra_services or config_mounts(config, service)
    if extra_services is not None:
        names += extra_services(server, servicer.GenerateStream)
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


async def serve(config: GatewayConfig, ready_file: Path | None = None, telemetry=None) -> None:
    from privlm.telemetry import client_interceptors, server_interceptors

    server, port, service, health = await create_server(config, server_interceptors(), client_interceptors())
    await server.start()
    log.info("gateway serving on %s:%d, models %s", config.host, port, list(service.models))
    await wait_for_stop(port, ready_file)
    log.info("gateway draining (grace %.1fs)", config.grace_seconds)
    await health.enter_graceful_shutdown()
    await server.stop(config.grace_seconds)
    await service.close()
    if telemetry is not None:
        telemetry.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm gateway", description="Run the public gRPC gateway.")
    ap.add_argument("--model", default=None, help="model folder (tokenizer); default: the embedded model")
    ap.add_argument("--model-id", default="")
    ap.add_argument("--worker", required=True, help="host:port of the worker group's rank 0")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path, default=None)
    add_transport_args(ap)
    ap.add_argument("--attestation", default="none", choices=["none", "simulated", "sev-snp", "tdx", "sgx-gramine"],
                    help="TEE backend for privlm.v1.Confidential (sealed generation) and the audit log")
    ap.add_argument("--allow-simulated", action="store_true",
                    help="DEVELOPMENT ONLY: permit --attestation simulated (no TEE hardware; said everywhere)")
    ap.add_argument("--enclave-dir", type=Path, default=None, help="keys and audit log (default .cache/enclave)")
    ap.add_argument("--he-target", default=None, help="HE service host:port: mounts privlm.v1.RiskAlerts")
    from privlm.telemetry.config import add_arguments as add_telemetry_args

    add_telemetry_args(ap)
    auth = ap.add_mutually_exclusive_group(required=True)
    auth.add_argument("--tenants", type=Path, help="JSON list of tenants (tenant, token_sha256, limits)")
    auth.add_argument("--allow-anonymous", action="store_true",
                      help="DEVELOPMENT ONLY: serve without authentication (logged as a warning)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = args.model
    if model is None:
        from privlm.model_prep import default_model_dir

        model = str(default_model_dir())
    tenants = load_tenants(args.tenants) if args.tenants else ()
    enclave = risk = None
    if args.attestation != "none":
        from enclave.config import EnclaveConfig
        from privlm.config import cache_dir

        edir = args.enclave_dir or cache_dir() / "enclave"
        enclave = EnclaveConfig(attestation=args.attestation, allow_simulated=args.allow_simulated,
                                key_dir=str(edir / "keys"), audit_dir=str(edir / "audit"), model_path=model)
        if args.he_target:
            from gateway.scenarios.risk_config import RiskConfig

            risk = RiskConfig(he_target=args.he_target, enclave=enclave)
    cfg = GatewayConfig(models=(ModelRoute(model, args.worker, args.model_id),), transport=transport_from_args(args),
                        host=args.host, port=args.port,
                        tenants=tenants, allow_anonymous=args.allow_anonymous, enclave=enclave, risk=risk)
    from privlm.telemetry.config import from_args
    from privlm.telemetry.setup import init_service

    telemetry = init_service(from_args(args, "privlm-gateway"))
    asyncio.run(serve(cfg, args.ready_file, telemetry))
    return 0
