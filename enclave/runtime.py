"""The server-side confidential runtime: keys, evidence, sealed-request opening, audit, counters.

grpc-free and protobuf-free: the servicers in enclave/service.py adapt it to the wire.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclave import evidence as ev
from enclave.attestation import SIMULATION_WARNING, AttestationError, backend_for
from enclave.audit.events import AuditEvent
from enclave.audit.log import AuditLog
from enclave.config import EnclaveConfig
from enclave.hpke import SealedMessage, SealError, ServerKey, open_sealed
from enclave.replay import ReplayGuard

log = logging.getLogger("privlm.enclave")
_tracer = None


def _span(name: str, **attrs):
    """A business span (no plaintext: only codes and ids); a no-op span without a tracer provider."""
    global _tracer
    from opentelemetry import trace
    if _tracer is None:
        _tracer = trace.get_tracer("privlm.enclave")
    return _tracer.start_as_current_span(name, attributes={f"privlm.{k}": v for k, v in attrs.items()})


def load_or_create_ed25519(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ConfidentialRuntime:
    def __init__(self, config: EnclaveConfig, measurement: bytes | None = None):
        self.config = config
        if measurement is None:
            if config.measurement:
                measurement = bytes.fromhex(config.measurement)
            else:
                from enclave.measure import measure
                measurement = measure(config.model_path, config.effective_config).value
        self.measurement = measurement
        key_dir = Path(config.key_dir)
        self.audit = AuditLog(config.audit_dir, load_or_create_ed25519(key_dir / "audit_ed25519.pem"),
                              config.audit_origin)
        self.simulated = config.attestation == "simulated"
        if self.simulated:
            from enclave.attestation.simulated import load_or_create_root
            log.warning("confidential layer: %s", SIMULATION_WARNING)
            self.backend = backend_for("simulated", root_key=load_or_create_root(key_dir), measurement=measurement)
        elif config.attestation in ("sev-snp", "tdx"):
            self.backend = backend_for(config.attestation, report_root=config.tsm_report_root)
        else:
            self.backend = backend_for(config.attestation, device_root=config.gramine_root)
        self.accelerators = []
        if config.gpu_attestation:
            opts = {"command": tuple(config.nvidia_command)} if config.nvidia_command else {}
            self.accelerators.append(backend_for("nvidia-gpu-cc", **opts))
        # Fail at startup, not at the first client: a missing TEE is an error, never a downgrade.
        for b in (self.backend, *self.accelerators):
            b.evidence(os.urandom(32), bytes(64))
        # A fresh HPKE key per process: its lifetime is the evidence's; nothing to leak at rest.
        self.key = ServerKey.generate()
        self.keys = {self.key.key_id: self.key}
        self.replay = ReplayGuard(config.replay_window_s)
        self.rejections: collections.Counter[str] = collections.Counter()
        self._secrets: dict[tuple[str, str], bytes] = {}
        self.opened = 0
        self._lock = threading.Lock()
        index, _ = self.audit.append(AuditEvent(
            "measurement_registered", hashes={"measurement_sha384": measurement.hex(),
                                              "key_config_sha256": sha256_hex(self.key.config().encode())},
            labels={"tee_type": self.backend.tee_type, "simulated": str(self.simulated).lower(),
                    "key_id": str(self.key.key_id)}))
        self._measurement_index = index

    def transparency(self) -> ev.TransparencyProof:
        cp = self.audit.checkpoint()
        path = self.audit.inclusion(self._measurement_index, cp.size)
        leaf = self.audit.entries(self._measurement_index, self._measurement_index + 1)[0]
        return ev.TransparencyProof(cp, self._measurement_index, leaf, tuple(path))

    def evidence(self, nonce: bytes, tenant: str = "", trace_id: str = "") -> ev.Bundle:
        """Blocking (TEE ioctl / signing, audit fsync): call from a thread."""
        with _span("privlm.enclave.evidence", tee_type=self.backend.tee_type, simulated=self.simulated):
            return self._evidence(nonce, tenant, trace_id)

    def _evidence(self, nonce: bytes, tenant: str, trace_id: str) -> ev.Bundle:
        bundle = ev.issue(self.backend, nonce, self.key.config().encode(), self.measurement, self.transparency(),
                          self.accelerators)
        self.audit.append(AuditEvent("evidence_issued", tenant=tenant, trace_id=trace_id,
                                     hashes={"nonce_sha256": sha256_hex(nonce),
                                             "evidence_sha256": sha256_hex(bundle.raw)},
                                     labels={"tee_type": bundle.tee_type}))
        return bundle

    def reject(self, reason: str, msg: SealedMessage | None, tenant: str = "", trace_id: str = "") -> None:
        with self._lock:
            self.rejections[reason] += 1
        hashes = {"ciphertext_sha256": sha256_hex(msg.ciphertext), "enc_sha256": sha256_hex(msg.enc)} if msg else {}
        self.audit.append(AuditEvent("sealed_request_rejected", tenant=_safe_tenant(tenant), trace_id=_safe_trace(trace_id),
                                     hashes=hashes, labels={"reason": reason}))
        log.info("sealed request rejected: %s", reason)

    def open_request(self, msg: SealedMessage, parse_context, tenant: str = "") -> tuple[bytes, object, object]:
        """(plaintext, HPKE recipient context, parsed authenticated context). Blocking: use a thread.

        `parse_context(aad) -> obj with tenant, sent_at_unix_ms, trace_id` keeps protobuf out of here.
        `tenant`: the tenant the server's authentication established ("" when it has none);
        refusals are audited under it (nothing the request says about itself is trusted before it
        opens), and a request whose sealed context names another tenant is refused.
        Every refusal is counted by reason and audited; tampering with enc, ciphertext, aad or key
        id is refused here, and a replay after a successful open.
        """
        with _span("privlm.enclave.open_sealed", key_id=msg.key_id) as span:
            try:
                return self._open_request(msg, parse_context, tenant)
            except SealError as exc:
                span.set_attribute("privlm.reject_reason", exc.reason)
                raise

    def _open_request(self, msg: SealedMessage, parse_context, tenant: str):
        if len(msg.ciphertext) + len(msg.aad) > self.config.max_sealed_request_bytes:
            self.reject("too_large", msg, tenant)
            raise SealError("too_large", "sealed request exceeds the configured maximum")
        try:
            plaintext, ctx = open_sealed(self.keys, msg)
            meta = parse_context(msg.aad)
            self.replay.check_and_remember(msg.enc, meta.sent_at_unix_ms)
        except SealError as exc:
            self.reject(exc.reason, msg, tenant)
            raise
        except ValueError as exc:
            self.reject("bad_context", msg, tenant)
            raise SealError("bad_context", "sealed request context does not parse") from exc
        if tenant and meta.tenant != tenant:
            self.reject("tenant_mismatch", msg, tenant, meta.trace_id)
            raise SealError("tenant_mismatch", "sealed request was made for another tenant")
        with self._lock:
            self.opened += 1
        self.audit.append(AuditEvent("sealed_request_opened", tenant=_safe_tenant(tenant or meta.tenant),
                                     trace_id=_safe_trace(meta.trace_id) or _current_trace_id(),
                                     hashes={"ciphertext_sha256": sha256_hex(msg.ciphertext)},
                                     labels={"key_id": str(msg.key_id)}))
        return plaintext, ctx, meta


    def provision_secret(self, tenant: str, name: str, msg: SealedMessage, sent_at_ms: int) -> None:
        """Open a secret the bank sealed to this instance's attested key (push key release). Blocking."""
        from enclave.key_release import KEY_RELEASE_LABEL, provision_aad
        try:
            if msg.aad != provision_aad(tenant, name, self.measurement, sent_at_ms):
                raise SealError("wrong_binding", "secret is bound to another tenant, name, measurement or time")
            value = open_sealed(self.keys, msg, label=KEY_RELEASE_LABEL)[0]
            self.replay.check_and_remember(msg.enc, sent_at_ms)
        except SealError as exc:
            self.reject(exc.reason, msg, tenant)
            raise
        with self._lock:
            self._secrets[(tenant, name)] = value
        self.audit.append(AuditEvent("key_released", tenant=_safe_tenant(tenant), trace_id=_current_trace_id(),
                                     hashes={"secret_sha256": sha256_hex(name.encode()),
                                             "measurement_sha384": self.measurement.hex()},
                                     labels={"tee_type": self.backend.tee_type, "simulated": str(self.simulated).lower()}))

    def secret(self, tenant: str, name: str) -> bytes:
        """A secret provisioned for `tenant` (e.g. its CKKS secret key); NotFound if none."""
        from privlm.base.errors import NotFound
        with self._lock:
            value = self._secrets.get((tenant, name))
        if value is None:
            raise NotFound(f"no secret {name!r} provisioned for tenant {tenant!r}")
        return value

    def record(self, kind: str, tenant: str = "", trace_id: str = "", hashes: dict | None = None,
               labels: dict | None = None) -> int:
        """Append any other security event (policy_changed, he_context_registered, ...). Blocking.

        Only digests and codes are accepted (AuditEvent validates); returns the leaf index.
        """
        event = AuditEvent(kind, tenant=tenant, trace_id=trace_id or _current_trace_id(),
                           hashes=dict(hashes or {}), labels=dict(labels or {}))
        return self.audit.append(event)[0]


def _current_trace_id() -> str:
    """The active OpenTelemetry trace id (hex), or "" outside a span."""
    try:
        from opentelemetry import trace
    except ImportError:
        return ""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def _safe_tenant(tenant: str) -> str:
    from enclave.audit.events import _IDENT
    return tenant if _IDENT.match(tenant or "") else "invalid-tenant-id"


def _safe_trace(trace_id: str) -> str:
    from enclave.audit.events import _TRACE
    return trace_id if _TRACE.match(trace_id or "") else ""


__all__ = ["ConfidentialRuntime", "AttestationError", "SealError", "load_or_create_ed25519"]
