"""gRPC worker server (rank 0 of a worker group): a thin adapter over the engine.

protobuf -> GenerationRequest -> engine.submit; engine events (engine thread) -> asyncio queue ->
streamed WorkerGenerateResponse. A call that ends early (client cancel, deadline) cancels the
request in the engine, which frees its KV blocks.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from pathlib import Path

import grpc
from opentelemetry import context as otel_context

from privlm.base.errors import InvalidArgument, Unavailable
from privlm.base.grpcserver import NOT_SERVING, SERVING, add_health_and_reflection, bind, new_server, wait_for_stop
from privlm.base.telemetry import instruments
from privlm.base.telemetry.spans import RequestTimeline
from privlm.base.transport import add_transport_args, transport_from_args
from privlm.internal.v1 import worker_pb2, worker_pb2_grpc
from services.inference.config import EngineConfig, WorkerServerConfig
from services.inference.types import Engine, EngineUnavailable, FinishReason, GenerationRequest, SamplingParams, TokenEvent

log = logging.getLogger("privlm.worker")

# What callers are told when the worker group fails; the details (exception, rank) go to the log.
GROUP_FAILED = "the inference worker group failed while serving this request; retry later"
GROUP_DOWN = "the inference worker group is unavailable (failed or shutting down); retry later"

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
_FINISH = {
    FinishReason.LENGTH: worker_pb2.WORKER_FINISH_REASON_LENGTH,
    FinishReason.END_OF_SEQUENCE: worker_pb2.WORKER_FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.CANCELLED: worker_pb2.WORKER_FINISH_REASON_CANCELLED,
}


def _tracer():
    from opentelemetry import trace

    return trace.get_tracer("privlm.worker")


def _trace_id(ctx) -> str:
    """The W3C trace id of the RPC's span in ctx (hex), or "-" when untraced."""
    from opentelemetry import trace

    sc = trace.get_current_span(ctx).get_span_context()
    return f"{sc.trace_id:032x}" if sc.is_valid else "-"


def _to_domain(request: worker_pb2.WorkerGenerateRequest, vocab_size: int) -> GenerationRequest:
    if not request.prompt_token_ids:
        raise InvalidArgument("prompt_token_ids must not be empty")
    bad = [t for t in request.prompt_token_ids if t >= vocab_size]
    if bad:
        raise InvalidArgument(f"prompt_token_ids: id {bad[0]} is outside the vocabulary (size {vocab_size})")
    s = request.sampling
    if s.max_new_tokens < 1:
        raise InvalidArgument("sampling.max_new_tokens must be >= 1")
    if not s.temperature >= 0:
        raise InvalidArgument("sampling.temperature must be >= 0")
    if not 0 < s.top_p <= 1:
        raise InvalidArgument("sampling.top_p must be in (0, 1]")
    sampling = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, seed=s.seed if s.HasField("seed") else None)
    return GenerationRequest(request_id=request.request_id or uuid.uuid4().hex,
                             prompt_token_ids=tuple(request.prompt_token_ids), sampling=sampling,
                             tenant=request.tenant)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    async def Generate(self, request, context):
        req = _to_domain(request, self.engine.info.vocab_size)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        parent = otel_context.get_current()        # the RPC span: queue/prefill/decode go under it
        timeline = RequestTimeline(prompt_tokens=len(req.prompt_token_ids))

        def on_event(ev: TokenEvent) -> None:      # engine thread: stamp integers, hand over, return
            if ev.token_ids:
                timeline.token(len(ev.token_ids))
            elif ev.finish_reason is None:         # the engine's admission notice: queueing is over
                timeline.admitted()
                return
            if ev.finish_reason is not None:
                timeline.finished(ev.finish_reason.value)
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        try:
            self.engine.submit(req, on_event)
        except EngineUnavailable as exc:
            log.warning("request %s (trace %s) refused: %s", req.request_id, _trace_id(parent), exc)
            raise Unavailable(GROUP_DOWN) from None
        finished = False
        try:
            while not finished:
                events = [await queue.get()]
                while not queue.empty():          # coalesce what arrived meanwhile into one message
                    events.append(queue.get_nowait())
                tokens = [t for ev in events for t in ev.token_ids]
                last = events[-1]
                if last.finish_reason is FinishReason.ERROR:
                    finished = True
                    log.error("request %s (trace %s) failed in the worker group: %s", req.request_id,
                              _trace_id(parent), last.error or "no detail")
                    raise Unavailable(GROUP_FAILED)
                msg = worker_pb2.WorkerGenerateResponse(token_ids=tokens)
                if last.finish_reason is not None:
                    finished = True
                    msg.finish_reason = _FINISH[last.finish_reason]
                    msg.prompt_tokens = last.prompt_tokens or len(req.prompt_token_ids)
                    # the outcome is decided: a caller that closes the stream after this message
                    # ends an OK call (the RPC metrics read this code), not an UNKNOWN one
                    context.set_code(grpc.StatusCode.OK)
                yield msg
        finally:
            if not finished:
                self.engine.cancel(req.request_id)
                timeline.finished("cancelled")
            timeline.emit_spans(_tracer(), parent, model=self.engine.info.model_id, instruments=instruments.get())

    async def Describe(self, request, context):
        i = self.engine.info
        return worker_pb2.WorkerInfo(
            model_id=i.model_id, architecture=i.architecture, context_window=i.context_window,
            vocab_size=i.vocab_size, eos_token_ids=list(i.eos_token_ids), dtype=i.dtype,
            tensor_parallel=i.tensor_parallel, parameters=i.parameters, backend=i.backend, device=i.device)

    async def GetStats(self, request, context):
        s = self.engine.stats()
        return worker_pb2.WorkerStats(
            waiting=s.waiting, running=s.running, kv_blocks_total=s.kv_blocks_total,
            kv_blocks_free=s.kv_blocks_free, tokens_generated=s.tokens_generated,
            requests_finished=s.requests_finished, steps=s.steps, batch_size_last=s.batch_size_last,
            healthy=s.healthy and self.engine.healthy, extra=s.extra)


def build_engine(config: EngineConfig) -> Engine:
    """The engine for `config.backend` (imports torch; call off the event loop)."""
    if config.backend == "deepspeed":
        from services.inference.deepspeed_backend import create_deepspeed_engine

        return create_deepspeed_engine(config)
    from services.inference.engine import create_engine

    return create_engine(config)


async def create_server(config: WorkerServerConfig, engine: Engine, interceptors=()):
    """A worker server over `engine`, bound but not started: returns (server, port, health).

    With mTLS only the gateway's certificate may call Generate (health stays open to any peer
    with a certificate from the private CA)."""
    credentials = config.transport.server_credentials("worker")
    if credentials is not None:
        from privlm.base.certs import PeerIdentityInterceptor

        interceptors = [*interceptors, PeerIdentityInterceptor({"gateway"})]
    server = new_server(interceptors, config.max_message_bytes)
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(engine), server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, config.host, config.port, credentials)
    return server, port, health


async def _watch_health(engine: Engine, health, period: float = 0.5) -> None:
    """Report NOT_SERVING as soon as the engine (any rank) is unhealthy."""
    state = None
    while True:
        new = SERVING if engine.healthy else NOT_SERVING
        if new != state:
            state = new
            for name in ("", SERVICE_NAME):
                await health.set(name, state)
            if state == NOT_SERVING:
                log.error("engine unhealthy: worker group reports NOT_SERVING")
        await asyncio.sleep(period)


def start_canary(config: WorkerServerConfig, engine: Engine):
    """Perplexity on a fixed text every canary_interval_s, exported as a gauge (the guide's alert on
    a > 15% rise catches corrupted or badly quantised weights). Needs an engine with score()."""
    if config.canary_interval_s <= 0 or not hasattr(engine, "score"):
        return None
    from transformers import AutoTokenizer

    from privlm.base.telemetry.canary import CANARY_TEXT, CanaryMonitor

    ids = AutoTokenizer.from_pretrained(config.engine.model, local_files_only=True).encode(CANARY_TEXT)
    monitor = CanaryMonitor(engine.score, ids[:min(len(ids), config.engine.max_num_batched_tokens)],
                            instruments.get(), baseline=config.canary_baseline, interval_s=config.canary_interval_s)
    monitor.start()
    return monitor


def _kv_use(engine: Engine) -> tuple[int, int]:
    s = engine.stats()
    return s.kv_blocks_total - s.kv_blocks_free, s.kv_blocks_total


async def serve(config: WorkerServerConfig, ready_file: Path | None = None, telemetry=None) -> None:
    """Run until SIGTERM/SIGINT; then NOT_SERVING, drain for grace_seconds, stop the engine."""
    from privlm.base.telemetry import server_interceptors

    engine = await asyncio.to_thread(build_engine, config.engine)
    instruments.get().observe_kv_cache(lambda: _kv_use(engine))
    instruments.get().observe_engine_extra(lambda: engine.stats().extra)   # MoE imbalance, FP8 share
    server, port, health = await create_server(config, engine, server_interceptors())
    await server.start()
    watcher = asyncio.create_task(_watch_health(engine, health))
    canary = start_canary(config, engine)
    log.info("worker serving %s on %s:%d (tp=%d, backend=%s)", engine.info.model_id, config.host, port,
             config.engine.tp, config.engine.backend)
    await wait_for_stop(port, ready_file)
    log.info("worker shutting down (grace %.1fs)", config.grace_seconds)
    watcher.cancel()
    if canary is not None:
        canary.stop()
    await health.enter_graceful_shutdown()
    await server.stop(config.grace_seconds)
    await asyncio.to_thread(engine.shutdown)
    if telemetry is not None:
        telemetry.shutdown()


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    ap.add_argument("--backend", default="native", choices=["native", "deepspeed"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--keep-fp8", action="store_true",
                    help="FP8 block-scaled checkpoints (DeepSeek-V3/R1): keep weights in FP8 (CUDA: FP8 matmuls)")
    ap.add_argument("--no-custom-all-reduce", dest="custom_all_reduce", action="store_false",
                    help="CUDA tp > 1: use NCCL for every all-reduce (default: one-shot over NVLink for small tensors)")
    ap.add_argument("--decode-kernels", default="auto", choices=["torch", "triton", "auto"],
                    help="batch-1 GEMV and decode attention in Triton kernels (auto: on CUDA; docs/engine.md)")
    ap.add_argument("--no-fused-all-reduce-norm", dest="fused_all_reduce_norm", action="store_false",
                    help="CUDA tp > 1: keep the all-reduce apart from the residual add + RMSNorm (default: fused)")
    ap.add_argument("--no-pdl", dest="pdl", action="store_false",
                    help="decode kernels on H100/H200: no programmatic dependent launch (default: on)")
    ap.add_argument("--overlap-decode", default="auto", choices=["auto", "on", "off"],
                    help="greedy decode: enqueue the next step before this one's tokens reach the host (auto: CUDA)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, tp=args.tp, backend=args.backend, dtype=args.dtype, device=args.device,
                        max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, keep_fp8=args.keep_fp8,
                        custom_all_reduce=args.custom_all_reduce, decode_kernels=args.decode_kernels,
                        fused_all_reduce_norm=args.fused_all_reduce_norm, overlap_decode=args.overlap_decode,
                        pdl=args.pdl)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm worker", description="Run a worker group (rank 0 serves gRPC).")
    add_engine_args(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path, default=None, help="write {'port': N} here once serving")
    ap.add_argument("--canary-interval", type=float, default=300.0, help="perplexity canary period, s (0: off)")
    ap.add_argument("--canary-baseline", type=float, default=None,
                    help="known-good canary perplexity (default: the first measurement)")
    add_transport_args(ap)
    from privlm.base.telemetry.config import add_arguments as add_telemetry_args

    add_telemetry_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import os

    from privlm.base.config import cache_dir

    # Triton kernels (CUDA decode path) compile on first use: keep them with the deployment's cache
    # rather than the service account's home directory; inherited by locally spawned ranks.
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
    engine_cfg = engine_config_from_args(args)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:   # launched by torchrun / the deepspeed launcher: followers run the step loop only
        from services.inference.engine import run_follower

        run_follower(engine_cfg)
        return 0
    cfg = WorkerServerConfig(engine=engine_cfg, transport=transport_from_args(args), host=args.host, port=args.port,
                             canary_interval_s=args.canary_interval, canary_baseline=args.canary_baseline)
    from privlm.base.telemetry.config import from_args
    from privlm.base.telemetry.setup import init_service

    telemetry = init_service(from_args(args, "privlm-worker"))
    asyncio.run(serve(cfg, args.ready_file, telemetry))
    return 0
