"""Security events recorded in the audit log, and the schema that keeps plaintext out of them.

An event carries only: its kind, the tenant id, the W3C trace id, hex digests, and short
identifier-like labels (reason codes, TEE type, key id). Free text cannot pass validation, so a
prompt, a feature value or a key can never be written into the log by mistake.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time

KINDS = frozenset({
    "log_opened", "measurement_registered", "evidence_issued", "key_released", "key_release_denied",
    "sealed_request_opened", "sealed_request_rejected", "policy_changed", "he_context_registered",
})
HASH_SUFFIX_LEN = {"_sha256": 64, "_sha384": 96, "_sha512": 128}
LABEL_KEYS = frozenset({"reason", "tee_type", "key_id", "policy_id", "backend", "service", "secret",
                        "simulated", "count", "model"})
_IDENT = re.compile(r"^[A-Za-z0-9_.:/@-]{0,128}$")
_HEX = re.compile(r"^[0-9a-f]*$")
_TRACE = re.compile(r"^([0-9a-f]{32})?$")


class EventError(ValueError):
    """An event would put something other than ids, digests or codes into the log."""


@dataclasses.dataclass(frozen=True)
class AuditEvent:
    kind: str
    tenant: str = ""
    trace_id: str = ""
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    time_unix_ms: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EventError(f"unknown audit event kind {self.kind!r}; known: {sorted(KINDS)}")
        if not _IDENT.match(self.tenant):
            raise EventError("tenant must be an identifier ([A-Za-z0-9_.:/@-], at most 128 chars)")
        if not _TRACE.match(self.trace_id):
            raise EventError("trace_id must be 32 lowercase hex characters or empty")
        for name, value in self.hashes.items():
            want = next((n for s, n in HASH_SUFFIX_LEN.items() if name.endswith(s)), None)
            if want is None or not _HEX.match(value) or len(value) != want:
                raise EventError(f"hash field {name!r} must end in _sha256/_sha384/_sha512 and hold "
                                 "that digest in lowercase hex")
        for name, value in self.labels.items():
            if name not in LABEL_KEYS:
                raise EventError(f"label {name!r} not allowed; allowed: {sorted(LABEL_KEYS)}")
            if not _IDENT.match(value):
                raise EventError(f"label {name!r} must be an identifier-like code, not free text")

    def encode(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the exact leaf bytes hashed into the tree."""
        body = dataclasses.asdict(self)
        if not body["time_unix_ms"]:
            body["time_unix_ms"] = int(time.time() * 1000)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "AuditEvent":
        try:
            return cls(**json.loads(data))
        except (TypeError, ValueError) as exc:
            raise EventError(f"not an audit event: {exc}") from exc
