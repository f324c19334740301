"""gRPC front of the HE service: a thin servicer (protobuf <-> engine), create_server, and `privlm he`.

`create_server` is async and returns the server bound but NOT started (call `await server.start()`),
with health already set to SERVING for the service. TenSEAL work runs on a thread pool, never on the
asyncio loop; at most `max_pending` requests are queued or running, more get RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from privlm.base.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from privlm.base.grpcserver import SERVING, add_health_and_reflection, bind, new_server
from privlm.v1 import he_pb2 as pb
from privlm.v1 import he_pb2_grpc as pb_grpc
from services.he.config import HEServiceConfig
from services.he.engine import HEEngine, ScoreJob
from services.he.model import load_model

log = logging.getLogger("privlm.he")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HomomorphicPreprocessor"].full_name
TENANT_KEY = "x-privlm-tenant"

_PACKING = {pb.PACKING_FEATURE_MAJOR: "feature_major", pb.PACKING_RECORD_PER_CIPHERTEXT: "record_per_ciphertext"}
_PACKING_PB = {v: k for k, v in _PACKING.items()}
_ACTIVATION = {pb.ACTIVATION_AUTO: "auto", pb.ACTIVATION_NONE: "none", pb.ACTIVATION_SIGMOID: "sigmoid"}
_ACTIVATION_PB = {v: k for k, v in _ACTIVATION.items()}
_STAT = {pb.STATISTIC_SUM: "sum", pb.STATISTIC_MEAN: "mean", pb.STATISTIC_VARIANCE: "variance"}
_STAT_PB = {v: k for k, v in _STAT.items()}
_AXIS = {pb.AXIS_CIPHERTEXTS: "ciphertexts", pb.AXIS_SLOTS: "slots"}


def _tenant(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_KEY and value:
            return str(value)
    return "default"


def _parameters(info) -> pb.CkksParameters:
    return pb.CkksParameters(poly_modulus_degree=info.poly_modulus_degree, coeff_modulus_bits=info.coeff_modulus_bits,
                             scale_bits=info.scale_bits, slots=info.slots, multiplicative_depth=info.depth,
                             has_galois_keys=info.has_galois_keys, has_relin_keys=info.has_relin_keys,
                             context_bytes=info.context_bytes)


class HomomorphicPreprocessorServicer(pb_grpc.HomomorphicPreprocessorServicer):
    def __init__(self, engine: HEEngine, config: HEServiceConfig, tracer: trace.Tracer | None = None):
        self.engine = engine
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="privlm-he")
        self.tracer = tracer or trace.get_tracer("privlm.he")
        self._pending = 0
        self.dropped_expired = 0          # requests whose deadline passed before a worker got to them
        self.jobs_run = 0                 # engine calls actually executed

    async def _run(self, context, span_name: str, attrs: dict, fn, *args):
        """Run engine work on the pool inside a business span (sizes and ids only: never values/keys).

        Over max_pending: RESOURCE_EXHAUSTED at once. A request cancelled or past its deadline while it
        waits for a worker is dropped instead of computed for nobody (gRPC cancels the handler, which
        cancels the queued job; the deadline check covers a job dequeued in the same instant)."""
        if self._pending >= self.config.max_pending:
            raise ResourceExhausted(f"{self._pending} HE requests in progress (limit {self.config.max_pending}); "
                                    "retry with backoff")
        remaining = context.time_remaining() if context is not None else None
        deadline = None if remaining is None else time.monotonic() + remaining

        def job():
            if deadline is not None and time.monotonic() > deadline:
                self.dropped_expired += 1
                raise DeadlineExceeded("the deadline expired while the request waited for an HE worker")
            self.jobs_run += 1
            return fn(*args)

        self._pending += 1
        with self.tracer.start_as_current_span(span_name, attributes=attrs, record_exception=False,
                                               set_status_on_exception=False) as span:
            try:
                return await asyncio.get_running_loop().run_in_executor(self.executor, job)
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            finally:
                self._pending -= 1

    async def RegisterContext(self, request, context):
        cid, info, already = await self._run(context, "privlm.he.register_context",
                                             {"privlm.he.context_bytes": len(request.public_context)},
                                             self.engine.register_context, _tenant(context), request.public_context)
        return pb.RegisterContextResponse(context_id=cid, parameters=_parameters(info), already_registered=already)

    async def DeleteContext(self, request, context):
        self.engine.delete_context(_tenant(context), request.context_id)
        return pb.DeleteContextResponse()

    async def ScoreBatch(self, request, context):
        if request.packing not in _PACKING:
            raise InvalidArgument("packing must be PACKING_FEATURE_MAJOR or PACKING_RECORD_PER_CIPHERTEXT")
        if request.activation not in _ACTIVATION:
            raise InvalidArgument("activation must be ACTIVATION_AUTO, ACTIVATION_NONE or ACTIVATION_SIGMOID")
        job = ScoreJob(context_id=request.context_id, model_id=request.model_id, packing=_PACKING[request.packing],
                       num_records=request.num_records, ciphertexts=list(request.ciphertexts),
                       activation=_ACTIVATION[request.activation])
        attrs = {"privlm.he.context_id": request.context_id[:16], "privlm.he.model_id": request.model_id[:23],
                 "privlm.he.packing": job.packing, "privlm.he.records": job.num_records,
                 "privlm.he.ciphertexts": len(job.ciphertexts), "privlm.he.activation": job.activation}
        out = await self._run(context, "privlm.he.score", attrs, self.engine.score, _tenant(context), job)
        return pb.ScoreBatchResponse(context_id=out.context_id, model_id=out.model.model_id,
                                     model_version=out.model.version, packing=_PACKING_PB[out.packing],
                                     num_records=out.num_records, scores=out.scores,
                                     activation=_ACTIVATION_PB[out.activation], levels_left=out.levels_left)

    async def Aggregate(self, request, context):
        stats = []
        for s in request.statistics:
            if s not in _STAT:
                raise InvalidArgument(f"statistics: {s} is not a known Statistic")
            stats.append(_STAT[s])
        if request.axis not in _AXIS:
            raise InvalidArgument("axis must be AXIS_CIPHERTEXTS or AXIS_SLOTS")
        attrs = {"privlm.he.context_id": request.context_id[:16], "privlm.he.ciphertexts": len(request.ciphertexts),
                 "privlm.he.statistics": ",".join(stats), "privlm.he.axis": _AXIS[request.axis]}
        out = await self._run(context, "privlm.he.aggregate", attrs, self.engine.aggregate, _tenant(context),
                              request.context_id, list(request.ciphertexts), stats, _AXIS[request.axis])
        return pb.AggregateResponse(context_id=out.context_id, count=out.count, length=out.length, results=[
            pb.AggregateResult(statistic=_STAT_PB[s], ciphertext=ct, levels_left=lv) for s, ct, lv in out.results])

    async def Describe(self, request, context):
        cfg = self.config
        resp = pb.DescribeResponse(
            limits=pb.ServerLimits(max_contexts_per_tenant=cfg.max_contexts_per_tenant,
                                   max_context_bytes_per_tenant=cfg.max_context_bytes_per_tenant,
                                   max_request_bytes=cfg.max_request_bytes,
                                   max_ciphertexts_per_request=cfg.max_ciphertexts_per_request),
            mean_depth=1, variance_depth=2)
        if request.context_id:
            resp.parameters.CopyFrom(_parameters(self.engine.context(_tenant(context), request.context_id).info))
        for mid, m in self.engine.models.items():
            resp.models.append(pb.ScoringModelInfo(
                model_id=mid, name=m.name, version=m.version, num_features=m.num_features,
                feature_names=m.feature_names, linear_depth=1, sigmoid_depth=m.sigmoid_depth,
                sigmoid_range=m.sigmoid_range, sigmoid_coefficients=m.sigmoid_coefficients,
                is_default=mid == self.engine.default_model_id))
        return resp

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def create_server(config: HEServiceConfig, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                        tracer_provider: trace.TracerProvider | None = None) -> tuple[grpc.aio.Server, int]:
    """Build and bind the service (not started). The servicer is reachable as `server.privlm_servicer`
    (tests inspect the engine it holds); `server.privlm_health` is the health servicer. With
    config.tls_dir: mTLS, callers limited to config.allowed_peers; config.plaintext_dev: plaintext, warns.
    `interceptors` run first (e.g. privlm.base.telemetry.server_interceptors()); business spans
    privlm.he.* come from `tracer_provider` (default: the global one)."""
    models = [load_model(p) for p in config.model_files]
    engine = HEEngine(config, models)
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("privlm.he")
    servicer = HomomorphicPreprocessorServicer(engine, config, tracer)
    from privlm.base import certs

    interceptors, credentials = list(interceptors), None
    if config.tls_dir:
        interceptors.append(certs.PeerIdentityInterceptor(set(config.allowed_peers)))
        credentials = certs.server_credentials(config.tls_dir, "he")
    else:
        certs.dev_plaintext_warning("he")
    server = new_server(interceptors, max_message_bytes=config.transport_max_bytes)
    pb_grpc.add_HomomorphicPreprocessorServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    await health.set(SERVICE_NAME, SERVING)
    await health.set("", SERVING)
    port = bind(server, config.host, config.port, credentials)
    server.privlm_servicer = servicer
    server.privlm_health = health
    return server, port


async def serve(config: HEServiceConfig, ready=None, interceptors=()) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully (in-flight RPCs get grace_seconds)."""
    server, port = await create_server(config, interceptors)
    await server.start()
    log.info("HE service listening on %s:%d", config.host, port)
    print(f"privlm he: serving {SERVICE_NAME} on {config.host}:{port}", flush=True)
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    from grpc_health.v1 import health_pb2

    await server.privlm_health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(config.grace_seconds)
    server.privlm_servicer.close()
    print("privlm he: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privlm he", description="Run the homomorphic-encryption service alone.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--model-file", action="append", default=[],
                        help="scoring model JSON (repeatable; the first is the default)")
    parser.add_argument("--config", help="JSON/TOML file with HEServiceConfig keys (flags override it)")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--tls-dir", help="mTLS certificates from `privlm certs --out DIR` (presents he.pem)")
    tls.add_argument("--plaintext-dev", action="store_true",
                     help="DEVELOPMENT ONLY: plaintext gRPC without peer authentication (warns)")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--max-request-bytes", type=int)
    from privlm.base.telemetry.config import add_arguments as add_telemetry_args

    add_telemetry_args(parser)
    args = parser.parse_args(argv)
    from privlm.base.config import ConfigError, from_mapping, load_mapping

    try:
        data = load_mapping(args.config) if args.config else {}
        overrides = {"host": args.host, "port": args.port}
        if args.model_file:
            overrides["model_files"] = tuple(args.model_file)
        if args.workers is not None:
            overrides["workers"] = args.workers
        if args.tls_dir:                               # the flags choose the transport (one is required)
            overrides.update(tls_dir=args.tls_dir, plaintext_dev=False)
        else:
            overrides.update(tls_dir=None, plaintext_dev=True)
        if args.max_request_bytes is not None:
            overrides["max_request_bytes"] = args.max_request_bytes
        config = from_mapping(HEServiceConfig, {**data, **overrides}, where=args.config or "flags")
        for p in config.model_files:
            load_model(p)
    except ConfigError as exc:
        print(f"privlm he: {exc}", flush=True)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from privlm.base.telemetry import server_interceptors
    from privlm.base.telemetry.config import from_args
    from privlm.base.telemetry.setup import init_service

    telemetry = init_service(from_args(args, "privlm-he"))
    interceptors = server_interceptors()
    try:
        asyncio.run(serve(config, interceptors=interceptors))
    finally:
        if telemetry is not None:
            telemetry.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
