"""The gateway's domain logic: validate, template, tokenize, call the worker, detokenize, stop.

Servicers (gateway/server.py, enclave/) convert protobuf to `GenerateInput` and consume `Chunk`s.
Every string is bounded before any tokenizer work, and the chat template and tokenizer run on a
bounded thread pool: one large request must not stall the event loop that serves everyone else.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig, ModelRoute
from gateway.tenants import TenantRegistry
from gateway.text import IncrementalDetokenizer, StopMatcher
from gateway.tokenizer import ModelTokenizer
from gateway.worker_client import WorkerClient
from privlm.base.errors import InvalidArgument, NotFound, PrivlmError, ResourceExhausted, Unavailable, echo, upstream_failure
from privlm.base.telemetry import instruments
from privlm.base.telemetry.spans import GenerationSpan

log = logging.getLogger("privlm.gateway")
ROLES = ("system", "user", "assistant")


def _tracer():
    from opentelemetry import trace

    return trace.get_tracer("privlm.gateway")


@dataclass(frozen=True)
class GenerateInput:
    model: str = ""
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None   # (role, content)
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    request_id: str = ""
    tenant: str = ""


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish: str | None = None          # "length", "stop", "eos", "cancelled" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ModelHandle:
    model_id: str
    route: ModelRoute
    tokenizer: ModelTokenizer
    worker: WorkerClient
    info: object = None                 # worker_pb2.WorkerInfo once described
    eos: frozenset = field(default_factory=frozenset)
    serving: bool = True                # the worker group's last health answer (True once described)
    recheck: asyncio.Event = field(default_factory=asyncio.Event)   # set: check its health now


class GatewayService:
    def __init__(self, config: GatewayConfig, client_interceptors=()):
        self.config = config
        self.tenants = TenantRegistry(config.tenants)
        self.models: dict[str, ModelHandle] = {}
        for route in config.models:
            mid = route.model_id or Path(route.model_dir).name
            self.models[mid] = ModelHandle(mid, route, ModelTokenizer(route.model_dir),
                                           WorkerClient(route.worker_target, config.transport, client_interceptors))
        self.default_model = next(iter(self.models))
        self._pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="privlm-tokenize")
        self._queued = threading.BoundedSemaphore(config.max_queued_tokenizations)
        self._watchers: list[asyncio.Task] = []

    async def connect(self, timeout: float = 60.0) -> None:
        """Fetch each worker group's model description (context window, vocabulary)."""
        for h in self.models.values():
            h.info = await h.worker.describe(timeout)
            h.eos = frozenset(h.info.eos_token_ids)

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for h in self.models.values():
            await h.worker.close()

    @property
    def serving(self) -> bool:
        """Whether any model's worker group answers: what the gateway can generate with."""
        return any(h.serving for h in self.models.values())

    def watch_workers(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Follow every worker group's grpc.health.v1 in background tasks (stopped by close()):
        `on_change(self.serving)` is awaited whenever that changes, so the gateway's own health says
        what it can serve instead of SERVING while every Generate fails."""
        self._watchers = [asyncio.create_task(self._watch(h, on_change)) for h in self.models.values()]

    async def _watch(self, handle: ModelHandle, on_change: Callable[[bool], Awaitable[None]]) -> None:
        stub = health_pb2_grpc.HealthStub(handle.worker.channel)
        request = health_pb2.HealthCheckRequest(service="")
        target = handle.route.worker_target
        while True:
            handle.recheck.clear()
            try:
                resp = await stub.Check(request, timeout=self.config.worker_health_timeout_s)
                serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                why = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.aio.AioRpcError as err:
                serving, why = False, f"{err.code().name}: {err.details()}"
            except Exception as exc:  # noqa: BLE001 - whatever fails, this loop must keep following
                serving, why = False, type(exc).__name__
            if serving != handle.serving:
                before = self.serving
                handle.serving = serving
                if serving:
                    log.info("model %s: worker group %s is SERVING again", handle.model_id, target)
                else:
                    log.error("model %s: worker group %s is not serving (%s)", handle.model_id, target, why)
                if self.serving != before:
                    await on_change(self.serving)
            try:
                await asyncio.wait_for(handle.recheck.wait(), self.config.worker_health_period_s)
            except asyncio.TimeoutError:
                pass

    def resolve(self, model: str) -> ModelHandle:
        if len(model) > self.config.max_model_chars:
            raise InvalidArgument(f"model must be at most {self.config.max_model_chars} characters")
        handle = self.models.get(model or self.default_model)
        if handle is None:
            raise NotFound(f"model {echo(model)} not found; available: {sorted(self.models)}")
        return handle

    def check_input(self, inp: GenerateInput, handle: ModelHandle) -> None:
        """Validate the text before any tokenizer work: roles, emptiness, and the total size, which
        is bounded by the model's context window (input_chars_per_token characters per token)."""
        cfg, ctx = self.config, handle.info.context_window
        if inp.messages is not None:
            if not inp.messages:
                raise InvalidArgument("chat.messages must not be empty")
            if len(inp.messages) > cfg.max_chat_messages:
                raise InvalidArgument(f"chat.messages: at most {cfg.max_chat_messages} messages")
            for i, (role, _) in enumerate(inp.messages):
                if role not in ROLES:
                    raise InvalidArgument(f"chat.messages[{i}].role must be one of {list(ROLES)}, got {echo(role)}")
            field_name, total = "chat.messages", sum(len(c) for _, c in inp.messages)
        elif inp.prompt is not None:
            field_name, total = "prompt", len(inp.prompt)
        else:
            raise InvalidArgument("input: set either prompt or chat")
        limit = min(cfg.max_input_chars, cfg.input_chars_per_token * ctx)
        if total > limit:
            raise InvalidArgument(f"{field_name}: input is {total} characters, over the limit of {limit} characters "
                                  f"({cfg.input_chars_per_token} per token of model {handle.model_id}'s "
                                  f"{ctx}-token context window, at most {cfg.max_input_chars})")
        if inp.messages is not None and not any(c.strip() for _, c in inp.messages):
            raise InvalidArgument("chat.messages: every message content is empty")
        if inp.prompt is not None and not inp.prompt.strip():
            raise InvalidArgument("prompt must not be empty")

    async def tokenize(self, inp: GenerateInput) -> tuple[ModelHandle, list[int]]:
        """Resolve the model, check the input, then template + tokenize on the tokenizer pool."""
        handle = self.resolve(inp.model)
        self.check_input(inp, handle)
        if inp.messages is not None:
            ids = await self._off_loop(handle.tokenizer.encode_chat, inp.messages)
        else:
            ids = await self._off_loop(handle.tokenizer.encode_prompt, inp.prompt)
        if not ids:
            raise InvalidArgument("prompt tokenizes to zero tokens")
        return handle, ids

    async def _off_loop(self, fn, arg):
        """Run fn(arg) on the bounded tokenizer pool; a full queue is RESOURCE_EXHAUSTED at once."""
        if not self._queued.acquire(blocking=False):
            raise ResourceExhausted(f"the gateway is tokenizing {self.config.max_queued_tokenizations} requests; "
                                    "retry later")
        try:
            fut = self._pool.submit(fn, arg)
        except BaseException:
            self._queued.release()
            raise
        fut.add_done_callback(lambda _: self._queued.release())   # when the work ends, even if abandoned
        return await asyncio.wrap_future(fut)

    def _check_fields(self, inp: GenerateInput) -> None:
        """The fields that need no tokens: request id, stop strings, sampling ranges."""
        cfg = self.config
        if len(inp.request_id) > cfg.max_request_id_chars or not inp.request_id.isprintable():
            raise InvalidArgument(f"request_id must be printable and at most {cfg.max_request_id_chars} characters")
        if len(inp.stop) > cfg.max_stop_sequences:
            raise InvalidArgument(f"sampling.stop: at most {cfg.max_stop_sequences} stop sequences")
        for i, s in enumerate(inp.stop):
            if not s:
                raise InvalidArgument(f"sampling.stop[{i}] must not be empty")
            if len(s) > cfg.max_stop_length:
                raise InvalidArgument(f"sampling.stop[{i}] is longer than {cfg.max_stop_length} characters")
        if inp.max_new_tokens is not None:
            if inp.max_new_tokens < 1:
                raise InvalidArgument("sampling.max_new_tokens must be >= 1")
            if inp.max_new_tokens > cfg.max_new_tokens_limit:
                raise InvalidArgument(f"sampling.max_new_tokens must be <= {cfg.max_new_tokens_limit}, "
                                      f"got {inp.max_new_tokens}")

    def _sampling(self, inp: GenerateInput, handle: ModelHandle, n_prompt: int) -> tuple[int, float, float, int]:
        ctx = handle.info.context_window
        if n_prompt >= ctx:
            raise InvalidArgument(f"prompt is {n_prompt} tokens, longer than the context window of {ctx} tokens")
        if inp.max_new_tokens is None:
            max_new = min(self.config.default_max_new_tokens, ctx - n_prompt)
        else:
            max_new = inp.max_new_tokens
            if n_prompt + max_new > ctx:
                raise InvalidArgument(f"prompt ({n_prompt} tokens) + sampling.max_new_tokens ({max_new}) exceeds "
                                      f"the context window of {ctx} tokens")
        temperature = 0.0 if inp.temperature is None else inp.temperature
        if not (math.isfinite(temperature) and 0 <= temperature <= 100):
            raise InvalidArgument(f"sampling.temperature must be in [0, 100], got {temperature}")
        top_p = 1.0 if inp.top_p is None else inp.top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {top_p}")
        top_k = inp.top_k or 0
        if top_k > handle.info.vocab_size:
            raise InvalidArgument(f"sampling.top_k must be <= the vocabulary size {handle.info.vocab_size}")
        return max_new, temperature, top_p, top_k

    async def prepare(self, inp: GenerateInput):
        """Validate everything before any work is queued; returns what generate() needs."""
        self._check_fields(inp)
        handle, ids = await self.tokenize(inp)
        return handle, ids, self._sampling(inp, handle, len(ids))

    @contextlib.contextmanager
    def _public_errors(self, handle: ModelHandle, span: GenerationSpan):
        """Errors of the worker call: what the worker group said is logged under the trace id, the
        caller gets the public form (privlm.base.errors.upstream_failure)."""
        try:
            yield
        except PrivlmError as exc:
            ctx = span.span.get_span_context()
            ref = f"{ctx.trace_id:032x}" if ctx.is_valid else uuid.uuid4().hex
            log.warning("model %s: worker group %s failed (%s, trace %s): %s", handle.model_id,
                        handle.route.worker_target, exc.code.name, ref, exc)
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                handle.recheck.set()                  # health follows at once, not at the next period
            raise upstream_failure(exc, f"the inference worker group of model {handle.model_id}", ref) from None

    async def generate(self, inp: GenerateInput, timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Stream text chunks; the last one has `finish` and usage. Closing early cancels the worker."""
        handle, ids, (max_new, temperature, top_p, top_k) = await self.prepare(inp)
        # Unique in the worker group whatever the caller sends; the tenant prefix keeps work attributable.
        request_id = f"{inp.tenant or 'anon'}/{inp.request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        detok = IncrementalDetokenizer(handle.tokenizer.core)
        stops = StopMatcher(inp.stop)
        completion = 0
        stream = handle.worker.generate(request_id, ids, max_new, temperature, top_p, top_k, inp.seed,
                                        inp.tenant, timeout)
        # The business span is current while the worker is called, so the worker's RPC is its child.
        span = GenerationSpan(_tracer(), model=handle.model_id, request_id=inp.request_id,
                              operation="chat" if inp.messages is not None else "text_completion",
                              instruments=instruments.get(), max_tokens=max_new, temperature=temperature,
                              top_p=top_p, top_k=top_k)
        try:
            with span, self._public_errors(handle, span):
                async for wc in stream:
                    completion += len(wc.token_ids)
                    span.tokens(len(wc.token_ids))
                    text = detok.push(wc.token_ids)
                    if wc.finish:
                        text += detok.flush()
                    emit, stopped = stops.push(text)
                    if stopped:
                        span.finish("stop", prompt_tokens=len(ids), completion_tokens=completion)
                        yield Chunk(emit, list(wc.token_ids), "stop", len(ids), completion)
                        return
                    if wc.finish:
                        emit += stops.flush()
                        span.finish(wc.finish, prompt_tokens=wc.prompt_tokens or len(ids), completion_tokens=completion)
                        yield Chunk(emit, list(wc.token_ids), wc.finish, wc.prompt_tokens or len(ids), completion)
                        return
                    if emit or wc.token_ids:
                        yield Chunk(emit, list(wc.token_ids))
                raise Unavailable("the worker group ended the stream without a finish reason")
        finally:
            await stream.aclose()
            if inp.tenant:
                self.tenants.charge(inp.tenant, completion)

