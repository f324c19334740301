"""Shared values for the HE tests: the test model, records with edge values, tolerances per depth."""
from __future__ import annotations

import numpy as np

from services.he.model import ScoringModel

F = 8                       # features of the test model (the benchmark uses 64)

# Explicit tolerances per multiplicative depth used, absolute, for the value ranges these tests use
# (logits up to ~50, raw features up to 1e5 standardised by their scale). Measured errors are ~100x
# smaller; CKKS error grows with depth and with the ring (N=16384 for depth 3).
TOLERANCE = {
    "linear_depth1": 1e-3,       # logit, N=8192 [60,40,60]
    "linear_compact": 3e-3,      # logit, N=4096 [39,31,39] scale 2^31 (the low-latency ring)
    "linear_depth2": 1e-3,       # logit, N=8192 [60,40,40,60]
    "sigmoid_depth3": 2e-3,      # polynomial sigmoid, N=16384 [60,40,40,40,60]
    "sum": 1e-3,                 # relative to max(1, |value|): no multiplication
    "mean": 1e-5,                # relative, one plaintext multiplication
    "variance": 1e-4,            # relative, two levels
}


def make_model(seed: int = 0, num_features: int = F) -> ScoringModel:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=num_features) * 10
    means[0] = 50_000.0            # a balance-like feature: large raw values, large scale
    scales = rng.uniform(0.5, 2.0, size=num_features)
    scales[0] = 20_000.0
    weights = rng.normal(size=num_features)
    weights[1] = 0.0               # a zero weight must be handled (no transparent ciphertext)
    return ScoringModel(name="test-credit-risk", version="t1", weights=weights.tolist(), bias=-0.25,
                        means=means.tolist(), scales=scales.tolist())


def make_records(n: int, seed: int = 1, num_features: int = F) -> np.ndarray:
    """Raw features with large, negative and zero values: x: [n, F]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, num_features)) * 3
    x[:, 0] = rng.uniform(-20_000, 120_000, size=n)     # balances, overdrafts included
    x[0, :] = 0.0                                          # an all-zero record
    if n > 2:
        x[1, 1:] = -x[1, 1:]                               # negatives
        x[2, 2] = 0.0
    return x
