"""The gateway's domain logic: validate, template, tokenize, call the worker, detokenize, stop.

Servicers (gateway/server.py, enclave/) convert protobuf to `GenerateInput` and consume `Chunk`s.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from gateway.config import GatewayConfig, ModelRoute
from gateway.tenants import TenantRegistry
from gateway.text import IncrementalDetokenizer, StopMatcher
from gateway.tokenizer import ModelTokenizer
from gateway.worker_client import WorkerClient
from privlm.errors import InvalidArgument, NotFound
from privlm.telemetry import instruments
from privlm.telemetry.spans import GenerationSpan

ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID = 128


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

    async def connect(self, timeout: float = 60.0) -> None:
        """Fetch each worker group's model description (context window, vocabulary)."""
        for h in self.models.values():
            h.info = await h.worker.describe(timeout)
            h.eos = frozenset(h.info.eos_token_ids)

    async def close(self) -> None:
        for h in self.models.values():
            await h.worker.close()

    def resolve(self, model: str) -> ModelHandle:
        handle = self.models.get(model or self.default_model)
        if handle is None:
            raise NotFound(f"model {model!r} not found; available: {sorted(self.models)}")
        return handle

    def tokenize(self, inp: GenerateInput) -> tuple[ModelHandle, list[int]]:
        handle = self.resolve(inp.model)
        if inp.messages is not None:
            if not inp.messages:
                raise InvalidArgument("chat.messages must not be empty")
            for i, (role, content) in enumerate(inp.messages):
                if role not in ROLES:
                    raise InvalidArgument(f"chat.messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
                if len(content) > self.config.max_prompt_chars:
                    raise InvalidArgument(f"chat.messages[{i}].content is longer than {self.config.max_prompt_chars} characters")
            if not any(c.strip() for _, c in inp.messages):
                raise InvalidArgument("chat.messages: every message content is empty")
            ids = handle.tokenizer.encode_chat(inp.messages)
        elif inp.prompt is not None:
            if not inp.prompt.strip():
                raise InvalidArgument("prompt must not be empty")
            if len(inp.prompt) > self.config.max_prompt_chars:
                raise InvalidArgument(f"prompt is longer than {self.config.max_prompt_chars} characters")
            ids = handle.tokenizer.encode_prompt(inp.prompt)
        else:
            raise InvalidArgument("input: set either prompt or chat")
        if not ids:
            raise InvalidArgument("prompt tokenizes to zero tokens")
        return handle, ids

    def _sampling(self, inp: GenerateInput, handle: ModelHandle, n_prompt: int) -> tuple[int, float, float, int]:
        ctx = handle.info.context_window
        if n_prompt >= ctx:
            raise InvalidArgument(f"prompt is {n_prompt} tokens, longer than the context window of {ctx} tokens")
        if inp.max_new_tokens is None:
            max_new = min(self.config.default_max_new_tokens, ctx - n_prompt)
        else:
            max_new = inp.max_new_tokens
            if max_new < 1:
                raise InvalidArgument("sampling.max_new_tokens must be >= 1")
            if max_new > self.config.max_new_tokens_limit:
                raise InvalidArgument(f"sampling.max_new_tokens must be <= {self.config.max_new_tokens_limit}, got {max_new}")
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
        if len(inp.stop) > self.config.max_stop_sequences:
            raise InvalidArgument(f"sampling.stop: at most {self.config.max_stop_sequences} stop sequences")
        for i, s in enumerate(inp.stop):
            if not s:
                raise InvalidArgument(f"sampling.stop[{i}] must not be empty")
            if len(s) > self.config.max_stop_length:
                raise InvalidArgument(f"sampling.stop[{i}] is longer than {self.config.max_stop_length} characters")
        return max_new, temperature, top_p, top_k

    def prepare(self, inp: GenerateInput):
        """Validate everything before any work is queued; returns what generate() needs."""
        if len(inp.request_id) > MAX_REQUEST_ID or not inp.request_id.isprintable():
            raise InvalidArgument(f"request_id must be printable and at most {MAX_REQUEST_ID} characters")
        handle, ids = self.tokenize(inp)
        return handle, ids, self._sampling(inp, handle, len(ids))

    async def generate(self, inp: GenerateInput, timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Stream text chunks; the last one has `finish` and usage. Closing early cancels the worker."""
        handle, ids, (max_new, temperature, top_p, top_k) = self.prepare(inp)
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
            with span:
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
        finally:
            await stream.aclose()
            if inp.tenant:
                self.tenants.charge(inp.tenant, completion)
