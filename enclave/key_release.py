"""Key release: secrets go only to an instance whose verified evidence satisfies the policy.

The broker side (run by the bank, or a key-broker service it controls) holds the secrets: a CKKS
secret key for the enclave-side decryption path, a key for encrypted model weights. Protocol:
  1. enclave asks the broker for a challenge (a fresh single-use nonce);
  2. enclave returns evidence for that nonce (its HPKE key config bound in report_data);
  3. broker verifies the bundle (verify_bundle: TEE, measurement, freshness, key binding) and, if a
     secret is restricted to certain measurements, checks those too;
  4. broker HPKE-seals the secret to the *attested* key; only the holder of that private key (the
     attested process) can open it. Every release and every refusal is audited.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from typing import Iterable

from enclave import evidence as ev
from enclave.attestation import AttestationError
from enclave.attestation.policy import Policy
from enclave.audit.events import AuditEvent
from enclave.hpke import KEY_RELEASE_LABEL, SealedMessage, SealError, ServerKey, open_sealed, seal


@dataclasses.dataclass(frozen=True)
class WrappedSecret:
    name: str
    message: SealedMessage


def provision_aad(tenant: str, name: str, measurement: bytes, sent_at_ms: int) -> bytes:
    """AAD of a pushed secret: binds tenant, name, measurement and send time."""
    return (b"privlm-provision-v1\x00" + hashlib.sha256(f"{tenant}\x00{name}".encode()).digest() + measurement
            + sent_at_ms.to_bytes(8, "big", signed=True))


def seal_for_provision(verified: ev.Verified, tenant: str, name: str, value: bytes, sent_at_ms: int) -> SealedMessage:
    """Bank side of the push model: seal `value` to a key that has just verified."""
    return seal(verified.key_config, value, provision_aad(tenant, name, verified.measurement, sent_at_ms),
                label=KEY_RELEASE_LABEL)[0]


def _aad(name: str, measurement: bytes) -> bytes:
    return b"privlm-key-release-v1\x00" + hashlib.sha256(name.encode()).digest() + measurement


class KeyBroker:
    CHALLENGE_TTL_S = 120.0

    def __init__(self, policy: Policy, audit=None):
        self.policy = policy
        self.audit = audit
        self._secrets: dict[str, tuple[bytes, frozenset[str] | None]] = {}
        self._challenges: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def set_policy(self, policy: Policy, tenant: str = "") -> None:
        """Replace the release policy; audited as policy_changed with old and new digests."""
        old, self.policy = self.policy, policy
        if self.audit is not None:
            self.audit.append(AuditEvent("policy_changed", tenant=tenant, hashes={
                "old_policy_sha256": old.digest(), "new_policy_sha256": policy.digest()},
                labels={"policy_id": policy.name}))

    def add_secret(self, name: str, value: bytes, measurements: Iterable[str] | None = None) -> None:
        """Register a secret; `measurements` optionally narrows the policy's list for this one secret."""
        self._secrets[name] = (value, frozenset(m.lower() for m in measurements) if measurements else None)

    def challenge(self) -> bytes:
        nonce = os.urandom(32)
        now = time.monotonic()
        with self._lock:
            self._challenges = {n: t for n, t in self._challenges.items() if now - t < self.CHALLENGE_TTL_S}
            self._challenges[nonce] = now
        return nonce

    def _deny(self, name: str, reason: str, bundle: ev.Bundle | None, tenant: str) -> None:
        if self.audit is not None:
            hashes = {"secret_sha256": hashlib.sha256(name.encode()).hexdigest()}
            if bundle is not None and len(bundle.measurement) == 48:
                hashes["measurement_sha384"] = bundle.measurement.hex()
            self.audit.append(AuditEvent("key_release_denied", tenant=tenant, hashes=hashes, labels={"reason": reason}))

    def release(self, name: str, bundle: ev.Bundle, tenant: str = "") -> WrappedSecret:
        """Verify, then wrap `name` to the attested key. Raises AttestationError(reason) when refused."""
        with self._lock:
            issued = self._challenges.pop(bundle.nonce, None)
        try:
            if issued is None or time.monotonic() - issued > self.CHALLENGE_TTL_S:
                raise AttestationError("stale_nonce", "evidence does not answer an outstanding challenge")
            if name not in self._secrets:
                raise AttestationError("unknown_secret", f"no secret named {name!r}")
            verified = ev.verify_bundle(bundle, self.policy, bundle.nonce)
            value, allowed = self._secrets[name]
            if allowed is not None and verified.measurement.hex() not in allowed:
                raise AttestationError("wrong_measurement", f"secret {name!r} is not released to this measurement")
        except AttestationError as exc:
            self._deny(name, exc.reason, bundle, tenant)
            raise
        msg, _ = seal(verified.key_config, value, _aad(name, verified.measurement), label=KEY_RELEASE_LABEL)
        if self.audit is not None:
            self.audit.append(AuditEvent("key_released", tenant=tenant, hashes={
                "secret_sha256": hashlib.sha256(name.encode()).hexdigest(),
                "measurement_sha384": verified.measurement.hex(),
                "key_config_sha256": hashlib.sha256(bundle.key_config).hexdigest()},
                labels={"tee_type": verified.claims.tee_type, "simulated": str(verified.claims.simulated).lower()}))
        return WrappedSecret(name, msg)


def unwrap(keys: dict[int, ServerKey], wrapped: WrappedSecret, measurement: bytes) -> bytes:
    """Enclave side: open a released secret with the attested private key."""
    if wrapped.message.aad != _aad(wrapped.name, measurement):
        raise SealError("wrong_binding", "released secret is bound to another name or measurement")
    return open_sealed(keys, wrapped.message, label=KEY_RELEASE_LABEL)[0]
