"""The bank's side of the risk scenario, in plaintext: synthetic card transactions, a logistic fraud
model trained on them, and free-text memos. Generated in code, deterministic from a seed.

The model is what the HE service serves (services/he/model.py ScoringModel: standardisation + w.x + b);
the bank keeps the features, the service only ever sees them encrypted.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from services.he.model import ScoringModel

FEATURES = ("amount_thousands", "amount_vs_30d_mean", "hour_from_noon", "merchant_risk", "km_from_home",
            "txns_last_hour", "account_age_years", "card_not_present")
# The hidden rule the synthetic labels follow (the trained model should rediscover its signs).
_TRUE_W = np.array([0.35, 0.9, 0.15, 1.1, 0.012, 0.45, -0.25, 1.2])   # [F]
_TRUE_B = -7.0
DEMO_MODEL_SEED = 7            # the model the demo, the tests and the benchmark serve
MERCHANTS = ("grocery", "fuel", "electronics", "jewellery", "crypto exchange", "airline", "pharmacy",
             "online marketplace", "wire transfer service", "restaurant")
MERCHANT_RISK = {"grocery": 0.2, "fuel": 0.4, "restaurant": 0.3, "pharmacy": 0.3, "airline": 1.5,
                 "online marketplace": 1.8, "electronics": 2.2, "jewellery": 3.0, "wire transfer service": 3.5,
                 "crypto exchange": 4.0}
MEMOS_LOW = ("weekly groceries", "fuel on the way to work", "lunch with colleagues", "prescription refill",
             "monthly pharmacy order")
MEMOS_HIGH = ("urgent transfer requested by phone, customer says a relative is stranded abroad",
              "new device, shipping address differs from billing address",
              "customer asked to raise the card limit the same day",
              "purchase of gift cards in several batches within minutes",
              "first crypto purchase, account opened last month")


@dataclass(frozen=True)
class Transaction:
    transaction_id: str
    features: tuple[float, ...]   # [F], FEATURES order
    merchant: str
    memo: str                     # free text, sealed before it leaves the bank ("" = none)


def _draw(rng: np.random.Generator, n: int, fraud_share: float) -> np.ndarray:
    """x: [n, F]; a share of rows drawn from the risky profile so both classes are present."""
    risky = rng.random(n) < fraud_share
    amount = np.where(risky, rng.lognormal(1.2, 0.8, n), rng.lognormal(-1.5, 1.0, n))        # thousands
    ratio = np.where(risky, rng.uniform(2, 9, n), rng.lognormal(0, 0.4, n))
    hour = np.where(risky, rng.uniform(6, 12, n), rng.uniform(0, 8, n))
    merchant = np.where(risky, rng.uniform(1.5, 4, n), rng.uniform(0.2, 2.0, n))
    km = np.where(risky, rng.uniform(50, 4000, n), rng.exponential(15, n))
    velocity = np.where(risky, rng.poisson(4, n), rng.poisson(0.6, n)).astype(np.float64)
    age = np.where(risky, rng.uniform(0, 2, n), rng.uniform(0.5, 25, n))
    cnp = (rng.random(n) < np.where(risky, 0.8, 0.25)).astype(np.float64)
    return np.stack([amount, ratio, hour, merchant, km, velocity, age, cnp], axis=1)


def training_set(seed: int = 0, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """(x: [n, F], y: [n]) with labels from the hidden logistic rule."""
    rng = np.random.default_rng(seed)
    x = _draw(rng, n, 0.3)
    p = 1 / (1 + np.exp(-(x @ _TRUE_W + _TRUE_B)))
    return x, (rng.random(n) < p).astype(np.float64)


def train_model(seed: int = 0, steps: int = 400, lr: float = 0.5, l2: float = 1e-3) -> ScoringModel:
    """Logistic regression by full-batch gradient descent on standardised features (plaintext, bank-side)."""
    x, y = training_set(seed)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = (x - mean) / scale                                   # z: [n, F]
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        grad = p - y
        w -= lr * (z.T @ grad / len(y) + l2 * w)
        b -= lr * float(grad.mean())
    return ScoringModel(name="card-fraud", version=f"synthetic-{seed}", weights=tuple(float(v) for v in w),
                        bias=float(b), means=tuple(float(v) for v in mean), scales=tuple(float(v) for v in scale),
                        feature_names=FEATURES)


def transactions(n: int, seed: int = 1, fraud_share: float = 0.25, memo_share: float = 0.6) -> list[Transaction]:
    """A stream of n transactions; some carry a memo (risky ones get suspicious-sounding memos)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    x = _draw(rng, n, fraud_share)
    out = []
    for i, row in enumerate(x):
        merchant = min(MERCHANT_RISK, key=lambda m: abs(MERCHANT_RISK[m] - row[3]))
        risky = row[1] > 2 and row[3] > 1.5
        memo = ""
        if pick.random() < memo_share:
            memo = pick.choice(MEMOS_HIGH if risky else MEMOS_LOW)
        out.append(Transaction(f"tx-{seed}-{i:05d}", tuple(float(v) for v in row), merchant, memo))
    return out
