"""Helpers for engine tests: run requests through a real engine and collect their events."""
from __future__ import annotations

import threading

from services.inference.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent


class Collector:
    """Collects one request's events; `wait()` returns (tokens, finish_reason, error)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.events: list[TokenEvent] = []
        self.done = threading.Event()

    def __call__(self, ev: TokenEvent) -> None:
        self.events.append(ev)
        self.tokens.extend(ev.token_ids)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def finish(self) -> FinishReason | None:
        return self.events[-1].finish_reason if self.done.is_set() else None

    def wait(self, timeout: float = 120.0):
        assert self.done.wait(timeout), "request did not finish in time"
        return self.tokens, self.finish, self.events[-1].error


def submit(engine, rid: str, prompt, max_new_tokens: int = 16, **sampling) -> Collector:
    c = Collector()
    engine.submit(GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new_tokens, **sampling)), c)
    return c


def generate(engine, prompts, max_new_tokens: int = 16, **sampling) -> list[list[int]]:
    """Submit all prompts at once (so they share batches) and return each one's tokens."""
    cs = [submit(engine, f"r{i}", p, max_new_tokens, **sampling) for i, p in enumerate(prompts)]
    return [c.wait()[0] for c in cs]
