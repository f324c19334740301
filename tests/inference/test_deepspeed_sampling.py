"""The DeepSpeed backend's per-request sampler (runs on rank 0): no processes needed."""
from __future__ import annotations

import torch

from services.inference.deepspeed_backend.plan import Prefill
from services.inference.deepspeed_backend.runner import Sampler


def sampler(temperature=1.0, top_p=1.0, top_k=0, seed=7) -> Sampler:
    return Sampler(Prefill("r", (1,), temperature, top_p, top_k, seed))


LOGITS = torch.tensor([0.5, 3.0, 2.9, -1.0, 1.0, 2.0])   # [V]


def test_greedy_takes_the_first_maximum():
    assert sampler(temperature=0.0)(LOGITS) == 1
    assert sampler(temperature=0.0)(torch.tensor([1.0, 4.0, 4.0])) == 1


def test_top_k_and_top_p_restrict_the_candidates():
    draws_k = {sampler(top_k=2, seed=s)(LOGITS) for s in range(200)}
    assert draws_k == {1, 2}
    # probabilities of the sorted logits 3.0, 2.9, 2.0, ...: the first holds 0.40 (< 0.5), the first two 0.76
    draws_p = {sampler(top_p=0.5, seed=s)(LOGITS) for s in range(200)}
    assert draws_p == {1, 2}
    assert {sampler(top_p=1e-6, seed=s)(LOGITS) for s in range(50)} == {1}
    assert len({sampler(seed=s)(LOGITS) for s in range(200)}) >= 5


def test_a_seed_fixes_the_sequence_and_different_seeds_differ():
    a, b, c = sampler(seed=1), sampler(seed=1), sampler(seed=2)
    logits = torch.zeros(1000)
    seq_a = [a(logits) for _ in range(20)]
    assert seq_a == [b(logits) for _ in range(20)]
    assert seq_a != [c(logits) for _ in range(20)]


def test_low_temperature_concentrates_on_the_maximum():
    assert {sampler(temperature=1e-3, seed=s)(LOGITS) for s in range(50)} == {1}
