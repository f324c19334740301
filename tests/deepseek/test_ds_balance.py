"""Expert placement from observed load: hot-expert replicas, LPT over EP ranks, applied at load."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from ds_tiny import build, ep_worker, hf_greedy, prompts

from services.inference.deepseek.balance import (
    contiguous,
    max_over_mean,
    placement_from_load,
    plan_placement,
    rank_loads,
    save_placement,
)
from services.inference.deepseek.generate import greedy
from services.inference.deepseek.model import DeepseekV3ForCausalLM


def test_plan_replicates_hot_experts_and_lowers_rank_imbalance():
    counts = [500, 20, 10, 10, 30, 10, 10, 10]          # expert 0 is hot, and on rank 0 by default
    base = rank_loads(counts, contiguous(8, 2))
    placed = plan_placement(counts, ep=2, extra=1)
    assert all(len(h) == 5 and len(set(h)) == 5 for h in placed)      # E/ep + 1 slots used, no duplicates
    assert sorted({e for h in placed for e in h}) == list(range(8))  # every expert somewhere
    assert all(0 in h for h in placed)                                # the hot one on both ranks
    assert max_over_mean(rank_loads(counts, placed)) < max_over_mean(base)
    assert max_over_mean(rank_loads(counts, placed)) < 1.1 < max_over_mean(base)
    assert sum(rank_loads(counts, placed)) == pytest.approx(sum(counts))


def test_uniform_load_keeps_one_copy_per_expert_when_no_spare_slots():
    placed = plan_placement([7] * 8, ep=4, extra=0)
    assert sorted(e for h in placed for e in h) == list(range(8))
    assert max_over_mean(rank_loads([7] * 8, placed)) == 1.0


@pytest.mark.slow
def test_two_ranks_with_replicated_experts_equal_transformers(tmp_path):
    folder = tmp_path / "ckpt"
    ref = build(folder, seed=17)
    ps = prompts(3, seed=19)
    single = DeepseekV3ForCausalLM.from_pretrained(folder)
    want = greedy(single, ps, 8)
    assert want == [hf_greedy(ref, p, 8) for p in ps]
    load = single.expert_load()                                       # [3 moe layers, 8]
    per_layer = placement_from_load(load, sorted(single.held), ep=2, extra=2)
    save_placement(folder, per_layer)
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(ep_worker, args=(2, str(tmp_path / "store"), str(folder), ps, 8, str(out), "grouped"),
                       nprocs=2, join=True, start_method="spawn")
    r = [torch.load(out / f"rank{i}.pt") for i in range(2)]
    assert r[0]["tokens"] == want and r[1]["tokens"] == want
    for i in range(2):
        assert r[i]["held"] == {layer: set(p[i]) for layer, p in per_layer.items()}
    # every routed (token, expert) pair was computed exactly once, by one of the replicas
    assert r[0]["computed_pairs"] + r[1]["computed_pairs"] == int(r[0]["load"].sum())
