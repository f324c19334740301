"""Perplexity canary: catches corrupted or badly quantised weights while the service looks healthy.

The worker group periodically scores a fixed text with the served weights and exports the perplexity
(`privlm_canary_perplexity`) next to the known-good baseline (`privlm_canary_perplexity_baseline`);
docs/prometheus/alerts.yml fires when current / baseline > 1 + ALERT_THRESHOLD.

The scorer is any callable returning the log-probability of each token given its prefix, so the same
canary runs against transformers (hf_scorer, below) or the engine's own log-prob scoring.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Sequence

from privlm.base.telemetry.instruments import Instruments

log = logging.getLogger("privlm.base.telemetry.canary")

ALERT_THRESHOLD = 0.15   # the deployment guide: alert when perplexity rises > 15% over its baseline

# Fixed, public, unremarkable finance prose (no customer data). Changing it changes every baseline.
CANARY_TEXT = (
    "The bank's quarterly report shows net interest income of 4.2 billion euros, up 6 percent from the "
    "previous quarter, driven by higher deposit margins. Loan loss provisions rose to 310 million euros as "
    "credit quality in commercial real estate weakened. The common equity tier 1 ratio stood at 14.1 percent, "
    "well above the regulatory minimum, and the liquidity coverage ratio was 145 percent. Management expects "
    "operating costs to remain stable and plans a share buyback of 500 million euros subject to supervisory "
    "approval."
)

# token_ids -> log p(token_ids[i] | token_ids[:i]) for i = 1 .. len-1
Scorer = Callable[[Sequence[int]], Sequence[float]]


def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) of the scored tokens."""
    if not token_logprobs:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))


def canary_perplexity(score: Scorer, token_ids: Sequence[int]) -> float:
    if len(token_ids) < 2:
        raise ValueError("the canary needs at least two tokens")
    logprobs = list(score(token_ids))
    if len(logprobs) != len(token_ids) - 1:
        raise ValueError(f"scorer returned {len(logprobs)} log-probs for {len(token_ids)} tokens; "
                         f"expected one per token after the first")
    return perplexity(logprobs)


def alert_condition(current: float, baseline: float, threshold: float = ALERT_THRESHOLD) -> bool:
    """The alert rule's condition: current perplexity more than `threshold` above the baseline."""
    return current / baseline > 1.0 + threshold


def hf_scorer(model) -> Scorer:
    """A Scorer over a transformers causal LM (imports torch lazily; runs on the model's device)."""
    import torch

    def score(token_ids: Sequence[int]) -> list[float]:
        device = next(model.parameters()).device
        ids = torch.tensor([list(token_ids)], device=device)           # ids: [1, T]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()                  # logits: [T-1, V]
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp.gather(-1, ids[0, 1:, None])[:, 0]            # picked: [T-1]
        return picked.tolist()

    return score


class CanaryMonitor:
    """Measures the canary on demand or every `interval_s` in a daemon thread, exporting both gauges.

    baseline: the known-good perplexity (record it when the model is qualified, e.g. from the
    unquantised weights). None takes the first measurement as the baseline, which only catches
    corruption that happens after start-up; say so in the deployment's runbook if used.
    """

    def __init__(self, score: Scorer, token_ids: Sequence[int], instruments: Instruments | None = None,
                 baseline: float | None = None, interval_s: float = 300.0):
        self.score, self.token_ids = score, list(token_ids)
        self.instruments, self.baseline, self.interval_s = instruments, baseline, interval_s
        self.last: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def measure(self) -> float:
        ppl = canary_perplexity(self.score, self.token_ids)
        if self.baseline is None:
            self.baseline = ppl
        self.last = ppl
        if self.instruments is not None:
            self.instruments.set_canary(ppl, self.baseline)
        if alert_condition(ppl, self.baseline):
            log.warning("canary perplexity %.3f is %.1f%% above baseline %.3f", ppl,
                        100 * (ppl / self.baseline - 1), self.baseline)
        return ppl

    @property
    def firing(self) -> bool:
        return self.last is not None and self.baseline is not None and alert_condition(self.last, self.baseline)

    def start(self) -> None:
        def loop():
            while not self._stop.is_set():
                try:
                    self.measure()
                except Exception:  # noqa: BLE001 - a failed canary must not kill the worker
                    log.exception("canary measurement failed")
                self._stop.wait(self.interval_s)
        self._thread = threading.Thread(target=loop, name="privlm-canary", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
