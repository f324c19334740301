"""Overlapped greedy decoding (overlap_decode): step N+1 is enqueued before step N's tokens reach the
host, its input tokens taken from the device argmax. Run on CPU here (no overlap in time there, the
same bookkeeping): outputs must equal transformers' and the non-overlapped engine's, with requests
finishing at different steps, sampled requests mixed in, cancellation, and at TP=2."""
from __future__ import annotations

import time

import pytest

from privlm.testing.engine import generate, submit
from privlm.testing.tiny_models import build, hf_greedy
from services.inference.config import EngineConfig
from services.inference.engine import create_engine
from services.inference.engine.cuda_graphs import DecodeGraphs

PROMPTS = [[1, 17, 99, 23, 5], [1] + list(range(30, 70)), [1, 200, 201], [1] + [(i * 37) % 240 + 3 for i in range(50)]]
LENS = [24, 7, 16, 3]          # different max_new_tokens: the lookahead drops rows as requests end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build("llama", tmp_path_factory.mktemp("overlap") / "llama")
    return path, [hf_greedy(path, p, n) for p, n in zip(PROMPTS, LENS)]


def _engine(path, **kw):
    return create_engine(EngineConfig(model=str(path), dtype="float32", threads=1, max_num_batched_tokens=64,
                                      overlap_decode="on", **kw))


def _run_all(eng) -> list[list[int]]:
    cs = [submit(eng, f"r{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, LENS))]
    return [c.wait()[0] for c in cs]


@pytest.mark.parametrize("graphs", [False, True])
def test_overlapped_greedy_equals_transformers(tiny, graphs):
    path, refs = tiny
    eng = _engine(path)
    try:
        if graphs:                    # the CUDA-graph decode path (padded, device-side inputs), eagerly
            eng.runner.graphs = DecodeGraphs(eng.runner, capture=False)
        idle = eng.stats().kv_blocks_free
        assert [generate(eng, [p], n)[0] for p, n in zip(PROMPTS, LENS)] == refs
        assert _run_all(eng) == refs
        assert eng.stats().kv_blocks_free == idle
        assert eng.runner.last_ids is not None            # the device path ran
    finally:
        eng.shutdown()


def test_sampled_and_cancelled_requests_beside_overlapped_ones(tiny):
    path, refs = tiny
    seeded = dict(temperature=0.8, top_p=0.9, seed=7)
    off = create_engine(EngineConfig(model=str(path), dtype="float32", threads=1, overlap_decode="off"))
    try:
        alone = generate(off, [PROMPTS[1]], 12, **seeded)[0]
    finally:
        off.shutdown()
    eng = _engine(path)
    try:
        idle = eng.stats().kv_blocks_free
        long = submit(eng, "long", PROMPTS[0], 400)
        while len(long.tokens) < 3:
            time.sleep(0.002)
        greedy = [submit(eng, f"g{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, LENS))]
        sampled = submit(eng, "s", PROMPTS[1], 12, **seeded)
        eng.cancel("long")
        toks, reason, _ = long.wait()
        assert reason.name == "CANCELLED"
        assert [c.wait()[0] for c in greedy] == refs
        assert sampled.wait()[0] == alone
        assert eng.stats().kv_blocks_free == idle
    finally:
        eng.shutdown()


@pytest.mark.slow
def test_overlapped_tp2_equals_transformers_and_rank_death_ends_requests(tiny):
    path, refs = tiny
    eng = _engine(path, tp=2)
    try:
        assert _run_all(eng) == refs
        c = submit(eng, "victim", PROMPTS[3], 400)          # decoding in overlapped steps when the rank dies
        while len(c.tokens) < 3:
            time.sleep(0.002)
        eng.group.procs[0].kill()
        toks, reason, err = c.wait(30)
        assert reason.name == "ERROR" and err
        assert not eng.healthy
    finally:
        eng.shutdown()
