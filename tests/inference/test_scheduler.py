"""Scheduler and KV block manager, without torch or a model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.scheduler import Scheduler
from services.inference.engine.sequence import SeqStatus, Sequence
from services.inference.types import FinishReason, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def seq(i: int, prompt_len: int, max_new: int = 4) -> Sequence:
    return Sequence(seq_id=i, request_id=f"r{i}", prompt_len=prompt_len, tokens=list(range(1, prompt_len + 1)),
                    sampling=SamplingParams(max_new_tokens=max_new), max_len=10_000, eos_token_ids=frozenset({0}))


def run_step(s: Scheduler, token: int = 7):
    plan = s.schedule()
    return plan, s.update(plan, {c.seq_id: token for c in plan.chunks if c.sample})


def test_scheduler_imports_no_torch():
    code = ("import sys; import services.inference.engine.scheduler, services.inference.engine.block_manager; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_block_manager_allocate_and_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(0, 5)
    bm.allocate(s, 5)
    assert len(s.block_table) == 2 and bm.num_free == 2
    bm.allocate(s, 8)                      # still fits in two blocks
    assert len(s.block_table) == 2
    assert not bm.can_allocate(s, 17)
    with pytest.raises(RuntimeError):
        bm.allocate(s, 17)
    bm.free(s)
    assert bm.num_free == 4 and s.block_table == []


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16, prefill_chunk=8)
    s.add(seq(0, 3))
    plan, out = run_step(s)                # short prompt: whole prefill, samples a token
    assert [len(c.token_ids) for c in plan.chunks] == [3] and out[0][1] == 7
    s.add(seq(1, 40))                      # long prompt arrives: chunks of <= 8 tokens
    plan, _ = run_step(s)
    assert plan.num_decode == 1 and plan.chunks[0].seq_id == 0
    assert [len(c.token_ids) for c in plan.chunks] == [1, 8]
    assert not plan.chunks[1].sample
    steps = 1
    while s.by_id[1].num_output == 0:
        plan, _ = run_step(s)
        assert plan.num_tokens <= 16
        steps += 1
    assert steps == 5                      # 40 tokens / 8 per step
    assert s.by_id[1].num_computed == 40


def test_fifo_admission_stops_at_first_that_does_not_fit():
    s = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    s.add(seq(0, 8))                       # 2 blocks
    s.add(seq(1, 12))                      # 3 blocks: does not fit next to seq 0
    s.add(seq(2, 2))                       # would fit, but must not overtake seq 1
    plan, _ = run_step(s)
    assert [c.seq_id for c in plan.chunks] == [0]
    assert [q.seq_id for q in s.waiting] == [1, 2]


def test_preemption_frees_blocks_and_requeues_at_head():
    s = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(0, 7, max_new=20), seq(1, 7, max_new=20)
    s.add(a)
    s.add(b)
    run_step(s)                            # both prefilled: 2 blocks each, all 4 used
    assert s.bm.num_free == 0
    run_step(s)                            # a decodes at position 7 (fits); b too
    plan, _ = run_step(s)                  # a needs a 3rd block: b (admitted last) is preempted
    assert s.num_preemptions == 1
    assert b.status == SeqStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert s.waiting[0] is b
    assert [c.seq_id for c in plan.chunks] == [0]
    # b's generated tokens are kept and recomputed later: its prompt now includes them
    assert b.num_output == 2


def test_abort_returns_blocks():
    s = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_num_batched_tokens=64)
    s.add(seq(0, 9))
    run_step(s)
    assert s.bm.num_free == 5
    aborted = s.abort("r0")
    assert aborted.finish_reason == FinishReason.CANCELLED
    assert s.bm.num_free == 8 and not s.has_work()
    assert s.abort("r0") is None


def test_finish_on_length_and_eos():
    s = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_num_batched_tokens=64)
    s.add(seq(0, 3, max_new=2))
    run_step(s)
    _, out = run_step(s)
    assert out[0][2] == FinishReason.LENGTH and s.bm.num_free == 8
    s.add(seq(1, 3, max_new=5))
    _, out = run_step(s, token=0)          # eos id 0
    assert out[0][2] == FinishReason.END_OF_SEQUENCE and not s.has_work()


def test_max_num_seqs_caps_running():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(4):
        s.add(seq(i, 3))
    plan, _ = run_step(s)
    assert len(plan.chunks) == 2 and len(s.waiting) == 2


def test_new_arrival_defers_long_prefill_once():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=32, prefill_chunk=8)
    s.add(seq(0, 100))
    run_step(s)                            # long prompt: first chunk
    s.add(seq(1, 5))                       # short request arrives mid-prefill
    plan, out = run_step(s)
    assert [c.seq_id for c in plan.chunks] == [1]       # short prefill alone: its TTFT ~ idle
    assert out[0][0].seq_id == 1
    s.add(seq(2, 5))                       # another arrival: the long prompt is not deferred twice
    plan, _ = run_step(s)
    assert sorted(c.seq_id for c in plan.chunks) == [0, 1, 2]


def test_long_prefill_threshold_keeps_short_prompts_whole():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, prefill_chunk=8,
                  long_prefill_threshold=24)
    s.add(seq(0, 100))                     # long: 8-token chunks
    s.add(seq(1, 20))                      # short (<= 24): whole in its first step
    plan, _ = run_step(s)
    assert [len(c.token_ids) for c in plan.chunks] == [8, 20]


def test_lookahead_schedules_the_next_decode_before_tokens_are_known():
    from services.inference.engine.scheduler import PENDING_TOKEN

    s = Scheduler(BlockManager(num_blocks=8, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(0, 3, max_new=5), seq(1, 3, max_new=2)
    s.add(a)
    s.add(b)
    run_step(s)                                   # prefill both: one token each
    plan = s.schedule()                           # decode a (pos 3) and b (pos 3)
    assert plan.num_decode == 2
    nxt = s.lookahead(plan)                       # b's token of `plan` is its 2nd and last: left out
    assert [c.seq_id for c in nxt.chunks] == [0] and nxt.prev_rows == (0,) and nxt.device_greedy
    c = nxt.chunks[0]
    assert c.token_ids == (PENDING_TOKEN,) and c.start_pos == 4 and len(c.block_table) == 2   # pos 4: 2nd block
    done = s.update(plan, {0: 7, 1: 7})
    assert [r[2] for r in done] == [None, FinishReason.LENGTH]
    s.update(nxt, {0: 8})
    assert a.tokens[-2:] == [7, 8] and a.num_computed == 5
    s.add(seq(2, 3))                              # someone waiting: no lookahead (admission first)
    assert s.lookahead(s.schedule()) is None
