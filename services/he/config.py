"""Configuration of the HE preprocessing service: one frozen, validated object passed down explicitly."""
from __future__ import annotations

from dataclasses import dataclass

from privlm.base.config import check

MiB = 1024 * 1024


@dataclass(frozen=True)
class HEServiceConfig:
    host: str = "127.0.0.1"
    port: int = 0
    # Scoring model JSON files (services/he/model.py); the first is the default model. None is
    # allowed: Aggregate and Describe still work, ScoreBatch answers FAILED_PRECONDITION.
    model_files: tuple[str, ...] = ()
    grace_seconds: float = 5.0
    workers: int = 2                           # threads running TenSEAL work (off the asyncio loop)
    max_pending: int = 64                      # requests queued or running before RESOURCE_EXHAUSTED
    max_contexts_per_tenant: int = 8
    max_context_bytes_per_tenant: int = 512 * MiB
    max_context_bytes: int = 256 * MiB         # one context (a depth-3 context with Galois keys is ~120 MB)
    max_request_bytes: int = 96 * MiB          # sum of ciphertext bytes in one request: INVALID_ARGUMENT over it
    max_ciphertexts_per_request: int = 4096
    max_records_per_request: int = 1 << 20
    # Transport, exactly one of: mTLS with the private CA (`privlm certs --out DIR`: the server presents
    # DIR/he.pem and admits only callers whose verified certificate names one of allowed_peers), or
    # plaintext_dev (development only: no TLS, no peer authentication; warns). No default.
    tls_dir: str | None = None
    plaintext_dev: bool = False
    allowed_peers: tuple[str, ...] = ("gateway", "client")

    def __post_init__(self):
        object.__setattr__(self, "model_files", tuple(str(p) for p in self.model_files))
        object.__setattr__(self, "allowed_peers", tuple(self.allowed_peers))
        check(bool(self.tls_dir) != bool(self.plaintext_dev),
              "transport: set tls_dir (mTLS, `privlm certs --out DIR`) or plaintext_dev (development), exactly one")
        check(len(self.allowed_peers) >= 1, "allowed_peers must name at least one service")
        check(isinstance(self.host, str) and self.host != "", "host must be a non-empty string")
        check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        check(self.grace_seconds >= 0, "grace_seconds must be >= 0")
        check(self.workers >= 1, "workers must be >= 1")
        check(self.max_pending >= 1, "max_pending must be >= 1")
        check(self.max_contexts_per_tenant >= 1, "max_contexts_per_tenant must be >= 1")
        check(self.max_context_bytes >= 1024, "max_context_bytes must be >= 1024")
        check(self.max_context_bytes_per_tenant >= self.max_context_bytes,
              "max_context_bytes_per_tenant must be >= max_context_bytes")
        check(self.max_request_bytes >= 1024, "max_request_bytes must be >= 1024")
        check(self.max_ciphertexts_per_request >= 1, "max_ciphertexts_per_request must be >= 1")
        check(self.max_records_per_request >= 1, "max_records_per_request must be >= 1")

    @property
    def transport_max_bytes(self) -> int:
        """gRPC message limit: above both application limits, so that going over one of those gets a
        clear INVALID_ARGUMENT naming the limit rather than the transport's RESOURCE_EXHAUSTED."""
        return max(self.max_request_bytes, self.max_context_bytes) + 4 * MiB
