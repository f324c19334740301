"""Iteration-level scheduler (torch-free): which sequences run in the next step, and how much.

Each step gets a token budget (max_num_batched_tokens). Decoding sequences go first (one token
each), then partially prefilled ones continue, then waiting requests are admitted in FIFO order.
Prompts longer than `long_prefill_threshold` are prefilled in chunks of `prefill_chunk` tokens so
they never stall the running decodes or a newly arrived short request for their whole length;
shorter ones are prefilled whole (within the step budget). When KV blocks run out,
the most recently admitted running sequence is preempted (blocks freed, recomputed later) and goes
back to the head of the waiting queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.sequence import SeqStatus, Sequence
from services.inference.types import FinishReason


@dataclass(frozen=True)
class Chunk:
    """Work for one sequence in one step: compute KV for `token_ids` at positions start.., and
    sample a next token if `sample` (the chunk reaches the end of the sequence's tokens)."""
    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool
    score: bool = False          # return logits for every row (teacher-forced scoring, the canary)


PENDING_TOKEN = -1     # a decode chunk's input token that is still on the GPU (see StepPlan.prev_rows)


@dataclass(frozen=True)
class StepPlan:
    """What every rank executes in one step. Decode chunks (one token each) come first.

    device_greedy: every rank takes the argmax of the sampled rows on the device and keeps it, so
    that the next plan can be launched before these tokens reach the host (overlapped decoding).
    prev_rows: set on such a next plan: decode chunk i's input token is row prev_rows[i] of the
    previous step's device argmax (its token_ids hold PENDING_TOKEN)."""
    chunks: tuple[Chunk, ...]
    num_decode: int
    device_greedy: bool = False
    prev_rows: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int | None = None, long_prefill_threshold: int | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk or max_num_batched_tokens
        self.long_threshold = max(long_prefill_threshold or 0, self.prefill_chunk)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # admission order: the last is preempted first
        self.by_request: dict[str, Sequence] = {}
        self.by_id: dict[int, Sequence] = {}
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.by_request:
            raise ValueError(f"duplicate request_id {seq.request_id!r}")
        self.by_request[seq.request_id] = seq
        self.by_id[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is and free its blocks; returns it, or None if unknown."""
        seq = self.by_request.pop(request_id, None)
        if seq is None:
            return None
        if seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, FinishReason.CANCELLED)
        return seq

    def abort_all(self, reason: FinishReason) -> list[Sequence]:
        seqs = list(self.running) + list(self.waiting)
        for seq in seqs:
            self.by_request.pop(seq.request_id, None)
            self._finish(seq, reason)
        self.running.clear()
        self.waiting.clear()
        return seqs

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.bm.free(seq)
        self.by_id.pop(seq.seq_id, None)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        decode: list[Chunk] = []
        prefill: list[Chunk] = []
        # 1. decoding sequences, one token each, in admission order
        for seq in list(self.running):
            if seq.status == SeqStatus.RUNNING and seq.is_decoding and budget > 0:
                if self._reserve(seq, 1, scheduled):
                    scheduled.add(seq.seq_id)
                    budget -= 1
                    decode.append(self._chunk(seq, 1))
        # 2. admit waiting requests in FIFO order; stop at the first that does not fit
        admitted = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.remaining, budget, self._cap(seq))
            if not self.bm.can_allocate(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.add(seq.seq_id)
            budget -= n
            prefill.append(self._chunk(seq, n))
            admitted = True
        # 3. continuing prefills. A step that admits new requests defers them once, so a newly
        #    arrived short request is not slowed down by a long prompt's chunk (its TTFT stays close
        #    to idle); the next step resumes them, so they are never starved.
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING or seq.seq_id in scheduled or seq.is_decoding or budget <= 0:
                continue
            if admitted and not seq.deferred:
                seq.deferred = True
                continue
            n = min(seq.remaining, budget, self._cap(seq))
            if not self._reserve(seq, n, scheduled):
                continue                       # no room this step (seq may be preempted)
            seq.deferred = False
            scheduled.add(seq.seq_id)
            budget -= n
            prefill.append(self._chunk(seq, n))
        return StepPlan(chunks=tuple(decode + prefill), num_decode=len(decode))

    def _cap(self, seq: Sequence) -> int:
        """Chunk cap: short remainders go whole, long prompts in prefill_chunk pieces."""
        return seq.remaining if seq.remaining <= self.long_threshold else self.prefill_chunk

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Make room for n more KV positions of seq by preempting the most recently admitted
        sequence not already in this step's plan (possibly seq itself)."""
        while not self.bm.can_allocate(seq, seq.num_computed + n):
            victims = [s for s in self.running if s.seq_id not in scheduled]
            if not victims:
                return False
            victim = victims[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.bm.allocate(seq, seq.num_computed + n)
        return True

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> Chunk:
        start = seq.num_computed
        return Chunk(seq_id=seq.seq_id, token_ids=tuple(seq.tokens[start:start + n]), start_pos=start,
                     block_table=tuple(seq.block_table), sample=start + n == len(seq.tokens))

    def lookahead(self, plan: StepPlan) -> StepPlan | None:
        """The next decode step of `plan`'s sequences, scheduled before `plan`'s tokens are known.

        Only for a pure-decode plan whose tokens are still on the device, with nobody waiting for
        admission. Sequences that `plan` finishes by length are left out (one that ends on an EOS
        token runs one wasted row, discarded by update()); None when nothing qualifies or a block
        is missing (the caller then schedules normally, with preemption)."""
        if self.waiting or plan.num_decode != len(plan.chunks):
            return None
        chunks, rows = [], []
        for i, c in enumerate(plan.chunks):
            seq = self.by_id.get(c.seq_id)
            if seq is None or seq.status != SeqStatus.RUNNING or seq.num_computed != c.start_pos:
                continue                                   # cancelled meanwhile
            if seq.num_output + 1 >= seq.sampling.max_new_tokens or len(seq.tokens) + 1 >= seq.max_len:
                continue                                   # plan's token is its last
            pos = c.start_pos + 1
            if not self.bm.can_allocate(seq, pos + 1):
                return None
            self.bm.allocate(seq, pos + 1)
            chunks.append(Chunk(seq.seq_id, (PENDING_TOKEN,), pos, tuple(seq.block_table), True))
            rows.append(i)
        if not chunks:
            return None
        return StepPlan(tuple(chunks), len(chunks), device_greedy=True, prev_rows=tuple(rows))

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[tuple[Sequence, int | None, FinishReason | None]]:
        """Apply a step's results. Returns (seq, new token or None, finish reason or None) for every
        sequence that produced a token; finished sequences release their blocks."""
        out = []
        for chunk in plan.chunks:
            seq = self.by_id.get(chunk.seq_id)
            if seq is None or seq.status != SeqStatus.RUNNING:
                continue                            # aborted meanwhile
            seq.num_computed = chunk.start_pos + len(chunk.token_ids)
            if not chunk.sample:
                continue
            token = sampled[chunk.seq_id]
            reason = seq.append(token)
            if reason is not None:
                self.running.remove(seq)
                self.by_request.pop(seq.request_id, None)
                self._finish(seq, reason)
            out.append((seq, token, reason))
        return out
