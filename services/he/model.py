"""Plaintext scoring models: standardisation + logistic regression, loaded from JSON, identified by hash.

File format (JSON object; unknown keys are errors):
    {"name": "credit-risk", "version": "2026-11", "weights": [...], "bias": 0.0,
     "means": [...], "scales": [...], "feature_names": [...],          # names optional
     "sigmoid_range": 8.0, "sigmoid_degree": 3}                        # optional
The model id is "sha256:" + hex SHA-256 of the canonical JSON (sorted keys, no spaces), so the same
model always has the same id whatever the file's formatting.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from privlm.base.config import ConfigError, check, from_mapping


@dataclass(frozen=True)
class ScoringModel:
    name: str
    version: str
    weights: tuple[float, ...]
    bias: float
    means: tuple[float, ...]
    scales: tuple[float, ...]
    feature_names: tuple[str, ...] = ()
    sigmoid_range: float = 8.0      # the logit interval the polynomial is fitted on
    sigmoid_degree: int = 3         # odd: 3 (2 levels), 5 or 7 (3 levels)
    sigmoid_coefficients: tuple[float, ...] = field(default=(), compare=False)

    def __post_init__(self):
        for name in ("weights", "means", "scales", "feature_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.weights)
        check(n >= 1, "weights must not be empty")
        check(len(self.means) == n, f"means has {len(self.means)} values, weights has {n}")
        check(len(self.scales) == n, f"scales has {len(self.scales)} values, weights has {n}")
        check(not self.feature_names or len(self.feature_names) == n,
              f"feature_names has {len(self.feature_names)} names, weights has {n}")
        values = [*self.weights, *self.means, *self.scales, self.bias, self.sigmoid_range]
        check(all(isinstance(v, (int, float)) and math.isfinite(v) for v in values),
              "weights, means, scales, bias and sigmoid_range must be finite numbers")
        check(all(s > 0 for s in self.scales), "scales must all be > 0")
        check(any(w != 0 for w in self.weights), "at least one weight must be non-zero")
        check(self.sigmoid_range > 0, "sigmoid_range must be > 0")
        check(self.sigmoid_degree in (3, 5, 7), f"sigmoid_degree must be 3, 5 or 7, got {self.sigmoid_degree}")
        object.__setattr__(self, "sigmoid_coefficients", fit_sigmoid(self.sigmoid_degree, self.sigmoid_range))

    @property
    def num_features(self) -> int:
        return len(self.weights)

    @property
    def model_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        data = asdict(self)
        data.pop("sigmoid_coefficients")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def affine(self) -> tuple[np.ndarray, float]:
        """Standardisation folded into the linear model: z = a.x + c, with a = w/s, c = b - sum(w*mu/s).

        Exactly w.((x - mu)/s) + b, and one plaintext multiplication (one level) instead of two.
        """
        w, mu, s = (np.asarray(v, dtype=np.float64) for v in (self.weights, self.means, self.scales))
        a = w / s                                          # a: [F]
        return a, float(self.bias - np.dot(a, mu))

    @property
    def sigmoid_depth(self) -> int:
        """Levels TenSEAL's polyval uses for this degree (measured: 3 -> 2, 5 and 7 -> 3)."""
        return math.ceil(math.log2(self.sigmoid_degree + 1))

    # Plaintext reference, used by tests, the demo and the bank to check decisions.
    def logit(self, x: np.ndarray) -> np.ndarray:
        a, c = self.affine()
        return np.asarray(x, dtype=np.float64) @ a + c    # x: [N, F] -> [N]

    def sigmoid_poly(self, z: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(z, self.sigmoid_coefficients)


def fit_sigmoid(degree: int, bound: float) -> tuple[float, ...]:
    """Least-squares polynomial fit of the logistic function on [-bound, bound], lowest degree first.

    Even coefficients other than the constant are dropped (sigmoid(z) - 1/2 is odd), which keeps the
    polynomial exactly symmetric and one multiplication cheaper.
    """
    z = np.linspace(-bound, bound, 2001)
    y = 1.0 / (1.0 + np.exp(-z))
    odd = list(range(1, degree + 1, 2))
    basis = np.stack([z ** k for k in odd], axis=1)       # basis: [2001, len(odd)]
    coef, *_ = np.linalg.lstsq(basis, y - 0.5, rcond=None)
    out = [0.0] * (degree + 1)
    out[0] = 0.5
    for k, c in zip(odd, coef):
        out[k] = float(c)
    return tuple(out)


def load_model(path: str | Path) -> ScoringModel:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"scoring model {path}: {exc}") from exc
    if isinstance(data, dict) and "sigmoid_coefficients" in data:
        raise ConfigError(f"scoring model {path}: sigmoid_coefficients are derived, not configured")
    return from_mapping(ScoringModel, data, where=f"scoring model {path}")


def save_model(model: ScoringModel, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(json.loads(model.canonical_json()), indent=2) + "\n")
    return path
