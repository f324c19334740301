"""Torch-free domain objects shared by the worker server, the scheduler and the engine.

Its exceptions belong to the one family of privlm.base.errors (mapped to gRPC status in one place).

The servicer converts protobuf to these and back; nothing below the servicer imports a _pb2.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Protocol

from privlm.base.errors import InvalidArgument, ResourceExhausted, Unavailable


class FinishReason(enum.Enum):
    LENGTH = "length"
    END_OF_SEQUENCE = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"          # the engine failed (e.g. a rank died); detail for the log in TokenEvent.error


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0     # 0: greedy
    top_p: float = 1.0           # 1: off
    top_k: int = 0               # 0: off
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    tenant: str = ""


@dataclass(frozen=True)
class TokenEvent:
    """New tokens for one request; the last event of a request has finish_reason set."""
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    error: str = ""          # what failed (exception, rank): for the worker's log, never for callers


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    architecture: str
    context_window: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    tensor_parallel: int
    parameters: int
    backend: str = "native"
    device: str = "cpu"


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    tokens_generated: int = 0
    requests_finished: int = 0
    steps: int = 0
    batch_size_last: int = 0
    healthy: bool = True
    extra: dict[str, float] = field(default_factory=dict)


class EngineOverloaded(ResourceExhausted):
    """The engine's queue is full: the caller should retry later."""


class EngineUnavailable(Unavailable):
    """The engine cannot serve (a rank died, shutting down)."""


class InvalidRequest(InvalidArgument):
    """The request cannot be served as asked (e.g. longer than the context window)."""


EventCallback = Callable[[TokenEvent], None]


class Engine(Protocol):
    """What the worker servicer needs from an engine; the step loop runs on its own thread.

    `submit` returns at once; `on_event` is then called from the engine thread, possibly many
    times, the last time with finish_reason set. It must not block. An event with no tokens and
    no finish_reason is an admission notice (queueing is over, prefill starts); consumers that
    only want tokens ignore it.
    """

    info: ModelInfo

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    @property
    def healthy(self) -> bool: ...

    def shutdown(self) -> None: ...
