"""RiskConfig: the one typed configuration of the risk-alert stream (frozen, validated, unknown keys
are errors when loaded through privlm.base.config.from_mapping)."""
from __future__ import annotations

from dataclasses import dataclass

from privlm.base.config import check
from privlm.base.transport import TransportConfig


@dataclass(frozen=True)
class RiskConfig:
    he_target: str                                  # host:port of the HE service (privlm.v1.HomomorphicPreprocessor)
    he_transport: TransportConfig | None = None     # None: the gateway's own transport (mTLS or plaintext_dev)
    default_threshold: float = 0.8                  # alert probability when the bank's sealed params say 0
    default_explanation_tokens: int = 32
    max_explanation_tokens: int = 128
    max_memo_bytes: int = 2048
    max_in_flight: int = 64                         # undecided transactions per stream (beyond: back-pressure)
    # Alert explanations being written or queued, all streams together; beyond it an alert's decision
    # still goes out at once but its explanation is skipped ("overloaded"): decisions never wait.
    max_pending_explanations: int = 32
    he_timeout_s: float = 10.0
    generation_timeout_s: float = 60.0
    model: str = ""                                 # gateway model id that writes explanations ("" = default)

    def __post_init__(self):
        check(bool(self.he_target) and ":" in self.he_target, f"risk.he_target must be host:port, got {self.he_target!r}")
        check(0.0 < self.default_threshold < 1.0, "risk.default_threshold must be in (0, 1)")
        check(1 <= self.default_explanation_tokens <= self.max_explanation_tokens,
              "risk.default_explanation_tokens must be in [1, max_explanation_tokens]")
        check(self.max_memo_bytes >= 1, "risk.max_memo_bytes must be >= 1")
        check(self.max_in_flight >= 1, "risk.max_in_flight must be >= 1")
        check(self.max_pending_explanations >= 1, "risk.max_pending_explanations must be >= 1")
        check(self.he_timeout_s > 0 and self.generation_timeout_s > 0, "risk timeouts must be > 0")
