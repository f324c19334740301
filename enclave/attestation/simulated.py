"""Simulated attestation: for machines without a TEE. It is labelled everywhere it appears.

Evidence is canonical JSON {tee_type: "simulated", debug: true, ...} signed with Ed25519 by a
simulated root key kept in the key directory. A policy accepts it only with allow_simulated = true.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enclave.attestation.claims import SIMULATION_WARNING, AttestationError, Claims

log = logging.getLogger("privlm.enclave.attestation")
FORMAT = "privlm-simulated-evidence-v1"


def load_or_create_root(key_dir: str | Path) -> Ed25519PrivateKey:
    path = Path(key_dir) / "simulated_root_ed25519.pem"
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.touch(mode=0o600)
    path.write_bytes(pem)
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class SimulatedBackend:
    tee_type = "simulated"

    def __init__(self, root_key: Ed25519PrivateKey | None = None, measurement: bytes = b""):
        self._root = root_key
        self._measurement = measurement

    def evidence(self, nonce: bytes, report_data: bytes) -> bytes:
        if self._root is None:
            raise AttestationError("no_root_key", "simulated backend has no root key to sign with")
        log.warning(SIMULATION_WARNING)
        body = {"format": FORMAT, "tee_type": "simulated", "debug": True, "warning": SIMULATION_WARNING,
                "measurement": self._measurement.hex(), "nonce": nonce.hex(),
                "report_data": report_data.hex(), "issued_at": time.time()}
        payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return json.dumps({"payload": payload.decode(), "signature": self._root.sign(payload).hex()}).encode()

    def verify(self, evidence: bytes, policy, nonce: bytes) -> Claims:
        if not policy.allow_simulated:
            raise AttestationError("simulation_not_allowed",
                                   f"policy {policy.name!r} does not allow simulated evidence")
        log.warning("verifying simulated evidence under policy %r: %s", policy.name, SIMULATION_WARNING)
        if not policy.simulated_root_public_key:
            raise AttestationError("no_trusted_root", "policy allows simulation but pins no simulated root key")
        try:
            outer = json.loads(evidence)
            payload = outer["payload"].encode()
            signature = bytes.fromhex(outer["signature"])
            body = json.loads(payload)
        except (ValueError, KeyError, TypeError) as exc:
            raise AttestationError("malformed_evidence", f"simulated evidence does not parse: {exc}") from exc
        root = Ed25519PublicKey.from_public_bytes(bytes.fromhex(policy.simulated_root_public_key))
        try:
            root.verify(signature, payload)
        except InvalidSignature as exc:
            raise AttestationError("bad_signature", "simulated evidence is not signed by the pinned root") from exc
        if body.get("format") != FORMAT or body.get("tee_type") != "simulated":
            raise AttestationError("malformed_evidence", "not simulated evidence")
        if bytes.fromhex(body["nonce"]) != nonce:
            raise AttestationError("stale_nonce", "evidence was issued for a different nonce")
        age = time.time() - float(body["issued_at"])
        if not -5 <= age <= policy.max_age_s:
            raise AttestationError("expired", f"evidence is {age:.0f} s old (policy max {policy.max_age_s} s)")
        return Claims(tee_type="simulated", report_data=bytes.fromhex(body["report_data"]),
                      launch_measurement=bytes.fromhex(body["measurement"]), debug=True, simulated=True,
                      details={"warning": SIMULATION_WARNING})
