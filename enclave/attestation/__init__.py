"""Attestation backends behind one interface, plus the claims and errors they share.

    backend.evidence(nonce, report_data) -> bytes          (needs the TEE; raises AttestationUnavailable)
    backend.verify(evidence, policy, nonce) -> Claims      (pure verification; runs anywhere)

Backends: "simulated" (no hardware, always labelled), "sev-snp" and "tdx" (Linux configfs-tsm),
"sgx-gramine" (Gramine /dev/attestation), "nvidia-gpu-cc" (NVIDIA attestation CLI tokens).
A missing TEE is an error, never a silent fall back to simulation.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

SIMULATION_WARNING = ("SIMULATED ATTESTATION: no TEE hardware protects this process; evidence is signed "
                      "by a simulated root key and proves nothing about confidentiality")


class AttestationError(ValueError):
    """Evidence was rejected. `reason` is a fixed code (counted, audited, shown to the client)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class AttestationUnavailable(RuntimeError):
    """The requested TEE is not present on this machine (no silent downgrade)."""


@dataclasses.dataclass(frozen=True)
class Claims:
    tee_type: str
    report_data: bytes           # 64 bytes bound into the signed evidence
    launch_measurement: bytes    # SNP MEASUREMENT, TDX MRTD, SGX MRENCLAVE, or the simulated measurement
    debug: bool
    simulated: bool = False
    details: dict = dataclasses.field(default_factory=dict)


class AttestationBackend(Protocol):
    tee_type: str

    def evidence(self, nonce: bytes, report_data: bytes) -> bytes: ...

    def verify(self, evidence: bytes, policy, nonce: bytes) -> Claims: ...


TEE_TYPES = ("simulated", "sev-snp", "tdx", "sgx-gramine", "nvidia-gpu-cc")


def backend_for(tee_type: str, **options) -> AttestationBackend:
    """The backend for a TEE type; constructing one never touches hardware (verifiers use it too)."""
    if tee_type == "simulated":
        from enclave.attestation.simulated import SimulatedBackend
        return SimulatedBackend(**options)
    if tee_type in ("sev-snp", "tdx"):
        from enclave.attestation.tsm import TsmBackend
        return TsmBackend(tee_type, **options)
    if tee_type == "sgx-gramine":
        from enclave.attestation.gramine import GramineBackend
        return GramineBackend(**options)
    if tee_type == "nvidia-gpu-cc":
        from enclave.attestation.nvidia import NvidiaBackend
        return NvidiaBackend(**options)
    raise AttestationError("unknown_tee_type", f"unknown TEE type {tee_type!r}; known: {list(TEE_TYPES)}")
