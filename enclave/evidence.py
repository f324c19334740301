"""Evidence bundles: TEE evidence + the HPKE key configuration + the privlm measurement, bound together.

report_data = SHA-512("privlm-evidence-v1" || 0x00 || nonce || measurement || key_config), so
evidence for one nonce, key or measurement cannot be presented for another (issue: "the key bound
to the evidence"). verify_bundle is what a client, `privlm verify` and the key broker all run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging

from enclave.attestation import AttestationError, Claims, backend_for
from enclave.attestation.policy import Policy
from enclave.audit import merkle
from enclave.audit.checkpoint import Checkpoint, CheckpointError, load_public_key
from enclave.audit.events import AuditEvent
from enclave.hpke import KeyConfig, SealError

log = logging.getLogger("privlm.enclave.evidence")
MIN_NONCE, MAX_NONCE = 16, 64


def report_data_for(nonce: bytes, measurement: bytes, key_config: bytes) -> bytes:
    return hashlib.sha512(b"privlm-evidence-v1\x00" + nonce + measurement + key_config).digest()


@dataclasses.dataclass(frozen=True)
class TransparencyProof:
    """Inclusion of the measurement_registered event in a signed checkpoint."""
    checkpoint: Checkpoint
    leaf_index: int
    leaf: bytes
    path: tuple[bytes, ...]


@dataclasses.dataclass(frozen=True)
class Bundle:
    tee_type: str
    raw: bytes
    key_config: bytes
    measurement: bytes
    nonce: bytes
    transparency: TransparencyProof | None = None
    additional: tuple[tuple[str, bytes], ...] = ()   # (tee_type, raw) of accelerators, same report_data


@dataclasses.dataclass(frozen=True)
class Verified:
    claims: Claims
    key_config: KeyConfig
    measurement: bytes
    accelerators: tuple[Claims, ...] = ()


def check_nonce(nonce: bytes) -> None:
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise AttestationError("bad_nonce", f"nonce must be {MIN_NONCE}..{MAX_NONCE} bytes")


def issue(backend, nonce: bytes, key_config: bytes, measurement: bytes,
          transparency: TransparencyProof | None = None, accelerators=()) -> Bundle:
    check_nonce(nonce)
    rd = report_data_for(nonce, measurement, key_config)
    raw = backend.evidence(nonce, rd)
    extra = tuple((a.tee_type, a.evidence(nonce, rd)) for a in accelerators)
    return Bundle(backend.tee_type, raw, key_config, measurement, nonce, transparency, extra)


def _check_accelerators(bundle: Bundle, policy: Policy, nonce: bytes, expected_rd: bytes) -> list[Claims]:
    out = []
    for tee in policy.required_accelerators:
        raws = [raw for t, raw in bundle.additional if t == tee]
        if not raws:
            raise AttestationError("missing_accelerator_evidence", f"policy requires {tee} evidence; none was sent")
        for raw in raws:
            claims = backend_for(tee).verify(raw, policy, nonce)
            if claims.report_data != expected_rd:
                raise AttestationError("key_binding", f"{tee} evidence is bound to another key, measurement or nonce")
            if claims.debug and not policy.allow_debug:
                raise AttestationError("debug", f"{tee} runs in debug mode; policy forbids it")
            out.append(claims)
    return out


def _check_transparency(bundle: Bundle, policy: Policy) -> None:
    proof = bundle.transparency
    if proof is None:
        raise AttestationError("no_transparency_proof", "policy requires the measurement to be in the audit log")
    try:
        proof.checkpoint.verify(load_public_key(policy.audit_public_key_pem.encode()))
        merkle.verify_inclusion(merkle.leaf_hash(proof.leaf), proof.leaf_index, proof.checkpoint.size,
                                list(proof.path), proof.checkpoint.root)
        event = AuditEvent.decode(proof.leaf)
    except (CheckpointError, merkle.ProofError, ValueError) as exc:
        raise AttestationError("transparency", f"measurement inclusion proof does not verify: {exc}") from exc
    if event.kind != "measurement_registered" or event.hashes.get("measurement_sha384") != bundle.measurement.hex():
        raise AttestationError("transparency", "logged entry is not this measurement's registration")


def verify_bundle(bundle: Bundle, policy: Policy, nonce: bytes, backend=None) -> Verified:
    """Every check a relying party makes; raises AttestationError(reason) on the first failure."""
    check_nonce(nonce)
    if bundle.nonce != nonce:
        raise AttestationError("stale_nonce", "evidence answers a different (old) nonce")
    if bundle.tee_type == "simulated" and not policy.allow_simulated:
        raise AttestationError("simulation_not_allowed",
                               f"simulated evidence under policy {policy.name!r}, which does not allow it")
    if bundle.tee_type not in policy.tee_types:
        raise AttestationError("tee_type", f"TEE type {bundle.tee_type!r} not accepted by policy {policy.name!r}")
    backend = backend or backend_for(bundle.tee_type)
    claims = backend.verify(bundle.raw, policy, nonce)
    if claims.tee_type != bundle.tee_type:
        raise AttestationError("tee_type", "evidence TEE type differs from the bundle's")
    expected_rd = report_data_for(nonce, bundle.measurement, bundle.key_config)
    if claims.report_data != expected_rd:
        raise AttestationError("key_binding", "evidence report_data does not bind this key, measurement and nonce")
    if claims.debug and not (claims.simulated or policy.allow_debug):
        raise AttestationError("debug", "TEE runs in debug mode; policy forbids it")
    if claims.simulated and claims.launch_measurement != bundle.measurement:
        raise AttestationError("wrong_measurement", "simulated evidence signs a different measurement")
    if bundle.measurement.hex() not in policy.measurements:
        raise AttestationError("wrong_measurement",
                               f"measurement {bundle.measurement.hex()[:16]}... is not pinned by policy {policy.name!r}")
    if policy.launch_measurements and claims.launch_measurement.hex() not in policy.launch_measurements:
        raise AttestationError("wrong_launch_measurement", "hardware launch measurement is not pinned by policy")
    accelerators = _check_accelerators(bundle, policy, nonce, expected_rd)
    if policy.audit_public_key_pem:
        _check_transparency(bundle, policy)
    try:
        key_config = KeyConfig.decode(bundle.key_config)
    except SealError as exc:
        raise AttestationError("bad_key_config", str(exc)) from exc
    if claims.simulated:
        log.warning("accepted SIMULATED evidence under policy %r (no hardware protection)", policy.name)
    return Verified(claims, key_config, bundle.measurement, tuple(accelerators))
