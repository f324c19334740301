"""The engine on rank 0: request intake, the step loop thread, events, health.

submit() and cancel() only enqueue (any thread); the loop thread owns the scheduler, runs one step
at a time and calls each request's on_event from that thread.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque

from services.inference.config import EngineConfig
from services.inference.engine.block_manager import BlockManager
from services.inference.engine.compute_thread import ComputeThread
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.sampler import new_generator, sample
from services.inference.engine.scheduler import Chunk, Scheduler, StepPlan
from services.inference.engine.sequence import Sequence
from services.inference.types import (
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
    EventCallback,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    SamplingParams,
    TokenEvent,
)

log = logging.getLogger(__name__)


def eos_token_ids(model_dir: str, hf_config) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (each an int or a list)."""
    import json
    from pathlib import Path

    ids: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None)]
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for v in sources:
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


class LLMEngine:
    """Implements services.inference.types.Engine over a ModelRunner (rank 0 of the group)."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, group=None, thread: ComputeThread | None = None):
        """thread: the thread that built the runner; the step loop runs on it (see compute_thread.py)."""
        self.config, self.runner, self.group = config, runner, group
        from privlm.base.telemetry import instruments  # no-op meters unless the process set up telemetry

        self._instruments = instruments.get()
        hf = runner.hf_config
        self.eos = eos_token_ids(config.model, hf)
        self.info = ModelInfo(
            model_id=config.model.rstrip("/").split("/")[-1], architecture=runner.architecture,
            context_window=runner.max_model_len, vocab_size=hf.vocab_size, eos_token_ids=self.eos,
            dtype=config.dtype, tensor_parallel=config.tp,
            parameters=int(getattr(group, "total_parameters", 0) or runner.parameters_local),
            backend="native", device=config.device)
        self.block_manager = BlockManager(runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.prefill_chunk, config.long_prefill_threshold)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque = deque()              # ("add", seq, cb) | ("cancel", request_id)
        self._active: dict[str, tuple[EventCallback, int]] = {}   # request_id -> (callback, prompt len)
        self._gens: dict[int, object] = {}
        self._healthy = True
        self._error = ""
        self._stopping = False
        self._stats = EngineStats()
        self._overlap = config.overlap_enabled
        self._pending = None        # (plan, token handle, t0): a launched greedy step not yet applied
        self._thread = thread or ComputeThread()
        self._thread.run_last(self._loop)

    # -- public API --------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._healthy and not self._stopping

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None:
        if not self.healthy:
            raise EngineUnavailable(self._error or "engine is shut down")
        seq = self._validate(request)
        with self._lock:
            if request.request_id in self._active:
                raise InvalidRequest(f"request_id {request.request_id!r} is already in flight")
            if len(self.scheduler.waiting) + sum(1 for m in self._inbox if m[0] == "add") >= self.config.max_queue:
                raise EngineOverloaded(f"queue full ({self.config.max_queue} waiting requests), retry later")
            self._active[request.request_id] = (on_event, seq.prompt_len)
            self._inbox.append(("add", seq))
            self._wake.notify()

    def score(self, token_ids: list[int], timeout: float = 120.0) -> list[float]:
        """Teacher-forced log-probs of token_ids[1:] given their prefixes, run by the step loop
        between steps on every rank (the perplexity canary). Blocks the caller, not the loop."""
        import concurrent.futures

        if not 2 <= len(token_ids) <= min(self.info.context_window, self.config.max_num_batched_tokens):
            raise InvalidRequest(f"scoring needs 2..{self.config.max_num_batched_tokens} tokens")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping or not self._healthy:
                raise EngineUnavailable(self._error or "engine is shut down")
            self._inbox.append(("score", (list(token_ids), fut)))
            self._wake.notify()
        return fut.result(timeout)

    def _score(self, token_ids: list[int], fut) -> None:
        """One scoring chunk through the normal runner, on blocks borrowed from the free pool."""
        import torch

        seq = Sequence(seq_id=next(self._ids), request_id="__canary__", prompt_len=len(token_ids),
                       tokens=list(token_ids), sampling=SamplingParams(max_new_tokens=1),
                       max_len=self.info.context_window)
        if not self.block_manager.can_allocate(seq, len(token_ids)):
            fut.set_exception(EngineOverloaded("no free KV blocks for the canary right now"))
            return
        self.block_manager.allocate(seq, len(token_ids))
        try:
            chunk = Chunk(seq_id=seq.seq_id, token_ids=tuple(token_ids), start_pos=0,
                          block_table=tuple(seq.block_table), sample=False, score=True)
            logits = self.runner.step(StepPlan(chunks=(chunk,), num_decode=0))   # logits: [T, V]
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)               # logp: [T-1, V]
            nxt = torch.tensor(token_ids[1:], device=logp.device)[:, None]
            fut.set_result(logp.gather(-1, nxt)[:, 0].tolist())
        except Exception as exc:  # noqa: BLE001 - reported to the caller; a runner failure also kills the loop
            fut.set_exception(exc)
            raise
        finally:
            self.block_manager.free(seq)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("cancel", request_id))
            self._wake.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            st = self._stats
            s = EngineStats(tokens_generated=st.tokens_generated, requests_finished=st.requests_finished,
                            steps=st.steps, batch_size_last=st.batch_size_last,
                            kv_blocks_total=self.block_manager.num_blocks)
            queued = sum(1 for m in self._inbox if m[0] == "add")
        # Plain reads of lengths owned by the loop thread: a snapshot, good enough for monitoring.
        s.waiting = len(self.scheduler.waiting) + queued
        s.running = len(self.scheduler.running)
        s.kv_blocks_free = self.block_manager.num_free
        s.healthy = self.healthy
        s.extra = {"preemptions": float(self.scheduler.num_preemptions),
                   "weight_bytes_rank0": float(self.runner.weight_bytes)}
        if self.group is not None:
            for r, b in enumerate(self.group.weight_bytes):
                s.extra[f"weight_bytes_rank{r}"] = float(b)
        # Model figures (DeepSeek: expert load imbalance, fp8_tensor_core_fraction). engine_stats()
        # reads only a CPU snapshot the model publishes from the loop thread after each forward,
        # never the live (possibly GPU) counters: no device work from this thread, so no race with
        # a running step or a CUDA-graph capture. For tp > 1 rank 0's counts equal every rank's.
        model_stats = getattr(self.runner.model, "engine_stats", None)
        if model_stats is not None:
            s.extra.update(model_stats())
        return s

    def shutdown(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._fail_all("engine shut down")
        if self.group is not None:
            self.group.close()
        self.runner.comm.close()

    def mark_dead(self, reason: str) -> None:
        """Called by the group monitor when a rank dies: fail everything now, refuse new work."""
        log.error("worker group unhealthy: %s; failing requests %s", reason, self._active_ids())
        self._error = reason
        self._healthy = False
        self._fail_all(reason)
        with self._lock:
            self._wake.notify()

    # -- internals ---------------------------------------------------------------------------
    def _validate(self, r: GenerationRequest) -> Sequence:
        p, s = r.prompt_token_ids, r.sampling
        if not r.request_id:
            raise InvalidRequest("request_id must not be empty")
        if not p:
            raise InvalidRequest("prompt_token_ids must not be empty")
        if s.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
        if len(p) + s.max_new_tokens > self.info.context_window:
            raise InvalidRequest(f"prompt ({len(p)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds "
                                 f"the context window ({self.info.context_window})")
        if min(p) < 0 or max(p) >= self.info.vocab_size:
            raise InvalidRequest(f"prompt_token_ids must be in [0, {self.info.vocab_size})")
        if s.temperature < 0 or not (0 < s.top_p <= 1) or s.top_k < 0:
            raise InvalidRequest("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        need = -(-(len(p) + s.max_new_tokens) // self.config.block_size)
        if need > self.runner.num_blocks:
            raise InvalidRequest(f"request needs {need} KV blocks, the cache has {self.runner.num_blocks}")
        return Sequence(seq_id=next(self._ids), request_id=r.request_id, prompt_len=len(p), tokens=list(p),
                        sampling=s, max_len=self.info.context_window, eos_token_ids=frozenset(self.eos))

    def _emit(self, request_id: str, tokens: tuple[int, ...], reason: FinishReason | None, error: str = ""):
        with self._lock:
            entry = self._active.get(request_id)
            if entry is None:
                return
            if reason is not None:
                del self._active[request_id]
        cb, plen = entry
        try:
            cb(TokenEvent(request_id, tokens, reason, plen, error))
        except Exception:                       # a broken consumer must not kill the loop
            log.exception("on_event callback failed")

    def _active_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._active)

    def _fail_all(self, error: str) -> None:
        with self._lock:
            ids = list(self._active)
        for rid in ids:
            self._emit(rid, (), FinishReason.ERROR, error)

    def _drain_inbox(self) -> None:
        with self._lock:
            msgs = list(self._inbox)
            self._inbox.clear()
        for kind, item in msgs:
            if kind == "score":
                self._score(*item)
            elif kind == "add":
                if item.sampling.temperature > 0:
                    self._gens[item.seq_id] = new_generator(item.sampling.seed)
                self.scheduler.add(item)
            else:
                seq = self.scheduler.abort(item)
                if seq is not None:
                    self._gens.pop(seq.seq_id, None)
                    self._emit(item, (), FinishReason.CANCELLED)

    def _idle(self) -> bool:
        return not self._inbox and not self.scheduler.has_work()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._idle() and not self._stopping and self._healthy:
                        # bounded at tp > 1: idle followers need a keep-alive (model_runner.IDLE)
                        self._wake.wait(self.runner.keepalive_due_s())
                    if self._stopping or not self._healthy:
                        break
                    idle = self._idle()
                if idle:
                    self.runner.keep_alive()
                    continue
                self._drain_inbox()
                if self.scheduler.has_work():
                    self._step()
        except Exception as exc:                # the group is out of sync: nothing can be trusted
            log.exception("engine step failed; failing requests %s", self._active_ids())
            self._error = f"engine step failed: {type(exc).__name__}: {exc}"
            self._healthy = False
        finally:
            self.scheduler.abort_all(FinishReason.ERROR)
            self._fail_all(self._error or "engine shut down")
            if self._healthy and self.group is not None:
                try:
                    self.runner.stop_followers()
                except Exception:
                    log.exception("could not stop follower ranks")

    def _step(self) -> None:
        """One scheduling round. Greedy pure-decode steps overlap (overlap_decode): the next step
        is enqueued before this one's tokens are read, so the device never waits for the host."""
        sched = self.scheduler
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None:
            plan, handle, t_launch = pending
            nxt = None if self._inbox else sched.lookahead(plan)
            if nxt is not None:
                self._pending = (nxt, self.runner.launch(nxt), time.perf_counter())
            self._apply(plan, dict(zip((c.seq_id for c in plan.chunks), handle.tokens())), t_launch)
            return
        plan = sched.schedule()
        if not plan.chunks:            # work that cannot be scheduled yet: followers still wait
            self.runner.keep_alive()
            time.sleep(0.001)
            return
        for c in plan.chunks:          # first prefill chunk: tell the consumer queueing is over
            if c.start_pos == 0:
                self._emit(sched.by_id[c.seq_id].request_id, (), None)
        if self._overlap and plan.num_decode == len(plan.chunks) \
                and all(sched.by_id[c.seq_id].sampling.temperature <= 0 for c in plan.chunks):
            plan = dataclasses.replace(plan, device_greedy=True)
            self._pending = (plan, self.runner.launch(plan), t0)
            return
        logits = self.runner.step(plan)
        sampled: dict[int, int] = {}
        rows = [c for c in plan.chunks if c.sample]
        if rows:
            seqs = [sched.by_id[c.seq_id] for c in rows]
            toks = sample(logits, [s.sampling for s in seqs], [self._gens.get(s.seq_id) for s in seqs])
            sampled = {c.seq_id: t for c, t in zip(rows, toks)}
        self._apply(plan, sampled, t0)

    def _apply(self, plan, sampled: dict[int, int], t0: float) -> None:
        """A step's tokens -> scheduler, consumers, metrics."""
        results = self.scheduler.update(plan, sampled)
        for seq, tok, reason in results:
            if reason is not None:
                self._gens.pop(seq.seq_id, None)
            self._emit(seq.request_id, (tok,), reason)
        self._instruments.record_step(len(plan.chunks), time.perf_counter() - t0)
        with self._lock:
            st = self._stats
            st.steps += 1
            st.batch_size_last = len(plan.chunks)
            st.tokens_generated += len(results)
            st.requests_finished += sum(1 for r in results if r[2] is not None)
