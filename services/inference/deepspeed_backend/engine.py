"""The DeepSpeed backend's Engine: a torch-free driver in the caller's process.

The step loop runs on its own thread: it admits waiting requests (up to max_num_seqs), turns
cancellations and finished requests into rows to drop, sends one explicit StepPlan to rank 0
(which broadcasts it to every rank), and turns the sampled tokens into TokenEvents. The ranks are
child processes, so a crash inside DeepSpeed (its shared-memory all-reduce is native code) takes
down the group, never the server: the driver sees the exit, ends in-flight requests with
FinishReason.ERROR and refuses new ones with EngineUnavailable.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from privlm.base.config import ConfigError

from ..config import EngineConfig
from ..types import (
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
    EventCallback,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    TokenEvent,
)
from .launch import GroupFailed, RankGroup
from .plan import Prefill, Ready, StepPlan

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 900.0      # the first start JIT-compiles DeepSpeed's shm op (~30 s on 2 cores)
# An idle follower waits for the next plan inside a gloo broadcast, which times out after the
# process group's timeout (30 min): an empty plan at this interval keeps idle groups alive.
HEARTBEAT_S = 60.0


@dataclass
class _Live:
    request: GenerationRequest
    on_event: EventCallback
    generated: int = 0
    last_token: int = -1


class DeepSpeedEngine:
    def __init__(self, config: EngineConfig, group: RankGroup, ready: Ready):
        self.config = config
        self._group = group
        window = ready.context_window or 1 << 30
        if config.max_model_len:
            window = min(window, config.max_model_len)
        self.info = ModelInfo(model_id=ready.model_id, architecture=ready.architecture, context_window=window,
                              vocab_size=ready.vocab_size, eos_token_ids=ready.eos_token_ids, dtype=config.dtype,
                              tensor_parallel=config.tp, parameters=ready.parameters, backend="deepspeed",
                              device=config.device)
        self._eos = frozenset(ready.eos_token_ids)
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Live] = collections.deque()
        self._running: dict[str, _Live] = {}
        self._cancels: set[str] = set()
        self._scores: collections.deque = collections.deque()     # (token ids, Future): canary scoring
        self._healthy = True
        self._closed = False
        self._error = ""
        self.heartbeat_s = HEARTBEAT_S
        self._stats = EngineStats(extra={"heartbeats": 0.0, "load_seconds": ready.load_seconds,
                                                "rank0_weight_bytes": float(ready.rank0_weight_bytes)})
        self._thread = threading.Thread(target=self._loop, name="deepspeed-step-loop", daemon=True)
        self._thread.start()

    # -- Engine protocol ----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    @property
    def rank_pids(self) -> list[int]:
        return self._group.pids

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None:
        self._validate(request)
        with self._cv:
            if not self.healthy:
                raise EngineUnavailable(self._error or "the deepspeed engine is shut down")
            if request.request_id in self._running or any(w.request.request_id == request.request_id
                                                          for w in self._waiting):
                raise InvalidRequest(f"request id {request.request_id!r} is already in flight")
            if len(self._waiting) >= self.config.max_queue:
                raise EngineOverloaded(f"{len(self._waiting)} requests waiting (max_queue {self.config.max_queue})")
            self._waiting.append(_Live(request, on_event))
            self._cv.notify()

    def score(self, token_ids: list[int], timeout: float = 120.0) -> list[float]:
        """Teacher-forced log-probs of token_ids[1:] (the perplexity canary), run by the step loop
        on every rank between steps. Blocks the caller, not the loop."""
        import concurrent.futures

        if not 2 <= len(token_ids) <= min(self.info.context_window, self.config.max_num_batched_tokens):
            raise InvalidRequest(f"scoring needs 2..{self.config.max_num_batched_tokens} tokens")
        if min(token_ids) < 0 or max(token_ids) >= self.info.vocab_size:
            raise InvalidRequest(f"token ids must lie in [0, {self.info.vocab_size})")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if not self.healthy:
                raise EngineUnavailable(self._error or "the deepspeed engine is shut down")
            self._scores.append((tuple(token_ids), fut))
            self._cv.notify()
        return fut.result(timeout)

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify()

    def stats(self) -> EngineStats:
        with self._cv:
            s = self._stats
            return EngineStats(waiting=len(self._waiting), running=len(self._running), tokens_generated=s.tokens_generated,
                               requests_finished=s.requests_finished, steps=s.steps, batch_size_last=s.batch_size_last,
                               healthy=self.healthy, extra=dict(s.extra))

    def shutdown(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:    # shutdown() from an on_event callback
            self._thread.join(60)
        self._group.stop()

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, r: GenerationRequest) -> None:
        s, n = r.sampling, len(r.prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty")
        if n >= self.info.context_window:
            raise InvalidRequest(f"prompt of {n} tokens does not fit the context window of {self.info.context_window}")
        if s.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be >= 1")
        if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
            raise InvalidRequest("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if min(r.prompt_token_ids) < 0 or max(r.prompt_token_ids) >= self.info.vocab_size:
            raise InvalidRequest(f"token ids must lie in [0, {self.info.vocab_size})")

    # -- the step loop ------------------------------------------------------------------------
    def _emit(self, live: _Live, tokens: tuple[int, ...], finish: FinishReason | None, error: str = "") -> None:
        try:
            live.on_event(TokenEvent(live.request.request_id, tokens, finish,
                                     prompt_tokens=len(live.request.prompt_token_ids), error=error))
        except Exception:  # a broken callback must not stop the other requests
            log.exception("on_event callback failed")

    def _loop(self) -> None:
        drop: list[str] = []                   # rows in the ranks' batch that must leave it
        last_step = time.monotonic()
        try:
            while True:
                ended: list[_Live] = []
                heartbeat = False
                with self._cv:
                    while not (self._closed or self._waiting or self._running or self._cancels or drop
                               or self._scores):
                        if time.monotonic() - last_step > self.heartbeat_s:
                            heartbeat = True
                            break
                        self._cv.wait(min(0.5, self.heartbeat_s))
                        if self._group.dead():
                            raise GroupFailed("rank(s) exited: " + str(self._group.dead()))
                    if self._closed:
                        break
                    for rid in self._cancels:
                        live = self._running.pop(rid, None)
                        if live is not None:
                            drop.append(rid)
                        else:
                            live = next((w for w in self._waiting if w.request.request_id == rid), None)
                            if live is not None:
                                self._waiting.remove(live)
                        if live is not None:
                            ended.append(live)
                    self._cancels.clear()
                    # token budget per step: running rows decode one token each, new prompts prefill
                    # whole (no chunking here: a prompt over the budget is admitted alone)
                    admitted, budget = [], self.config.max_num_batched_tokens - len(self._running)
                    while self._waiting and len(self._running) + len(admitted) < self.config.max_num_seqs:
                        n = len(self._waiting[0].request.prompt_token_ids)
                        if admitted and n > budget:
                            break
                        budget -= n
                        admitted.append(self._waiting.popleft())
                    scoring = self._scores.popleft() if self._scores else None
                for live in ended:
                    self._emit(live, (), FinishReason.CANCELLED)
                plan = StepPlan(
                    drop=tuple(drop),
                    decode=tuple((rid, live.last_token) for rid, live in self._running.items()),
                    prefill=tuple(Prefill(a.request.request_id, tuple(a.request.prompt_token_ids), a.request.sampling.temperature,
                                          a.request.sampling.top_p, a.request.sampling.top_k, a.request.sampling.seed)
                                  for a in admitted),
                    score=scoring[0] if scoring else ())
                drop = []
                if not (plan.drop or plan.decode or plan.prefill or plan.score or heartbeat):
                    continue
                with self._cv:
                    for a in admitted:
                        self._running[a.request.request_id] = a
                try:
                    result = self._group.step(plan)
                except BaseException as e:
                    if scoring:
                        scoring[1].set_exception(EngineUnavailable(f"deepspeed worker group failed: {e}"))
                    raise
                last_step = time.monotonic()
                if scoring:
                    scoring[1].set_result(result.scores)
                drop = self._deliver(result.tokens)
                with self._cv:
                    if heartbeat:
                        self._stats.extra["heartbeats"] += 1
                        continue
                    self._stats.steps += 1
                    self._stats.batch_size_last = len(plan.decode) + len(plan.prefill)
                    self._stats.extra["prefill_seconds_last"] = result.prefill_seconds
                    self._stats.extra["decode_seconds_last"] = result.decode_seconds
                    self._stats.extra["kv_cache_tokens"] = float(result.kv_cache_tokens)
        except GroupFailed as e:
            self._fail(str(e))
            return
        except Exception as e:  # a bug here must not leave requests hanging
            log.exception("deepspeed step loop failed")
            self._fail(f"step loop failed: {e!r}")
            return
        self._finish_all(FinishReason.CANCELLED, "the engine is shutting down")

    def _deliver(self, tokens: dict[str, int]) -> list[str]:
        finished: list[str] = []
        for rid, tok in tokens.items():
            live = self._running[rid]
            live.generated += 1
            live.last_token = tok
            r = live.request
            finish = None
            if tok in self._eos:
                finish = FinishReason.END_OF_SEQUENCE
            elif (live.generated >= r.sampling.max_new_tokens
                  or len(r.prompt_token_ids) + live.generated >= self.info.context_window):
                finish = FinishReason.LENGTH
            if finish is not None:
                with self._cv:
                    self._running.pop(rid)
                    self._stats.requests_finished += 1
                finished.append(rid)
            with self._cv:
                self._stats.tokens_generated += 1
            self._emit(live, (tok,), finish)
        return finished

    def _fail(self, error: str) -> None:
        log.error("deepspeed worker group failed: %s", error.splitlines()[0] if error else "")
        with self._cv:
            self._healthy = False
            self._error = f"deepspeed worker group failed: {error.splitlines()[0] if error else 'unknown'}"
        self._group.kill()
        self._finish_all(FinishReason.ERROR, self._error)

    def _finish_all(self, reason: FinishReason, error: str) -> None:
        with self._cv:
            lives = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
            scores, self._scores = list(self._scores), collections.deque()
        for _, fut in scores:
            fut.set_exception(EngineUnavailable(error or "the deepspeed engine is shut down"))
        for live in lives:
            self._emit(live, (), reason, error)


def create_deepspeed_engine(config: EngineConfig) -> DeepSpeedEngine:
    """Start config.tp rank processes, wait until they have loaded and wrapped the model, and
    return the Engine serving them. Raises EngineUnavailable if the group cannot start."""
    if not (Path(config.model) / "config.json").is_file():
        raise ConfigError(f"model folder {config.model!r} has no config.json")
    group = RankGroup.start(config)
    try:
        ready = group.wait_ready(STARTUP_TIMEOUT_S)
    except GroupFailed as e:
        group.kill()
        raise EngineUnavailable(f"deepspeed worker group did not start: {e}") from e
    except BaseException:
        group.kill()
        raise
    return DeepSpeedEngine(config, group, ready)
