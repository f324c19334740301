"""Attestation backends behind one interface, plus the claims and errors they share.

    backend.evidence(nonce, report_data) -> bytes          (needs the TEE; raises AttestationUnavailable)
    backend.verify(evidence, policy, nonce) -> Claims      (pure verification; runs anywhere)

Backends: "simulated" (no hardware, always labelled), "sev-snp" and "tdx" (Linux configfs-tsm),
"sgx-gramine" (Gramine /dev/attestation), "nvidia-gpu-cc" (NVIDIA attestation CLI tokens).
A missing TEE is an error, never a silent fall back to simulation.
"""
from __future__ import annotations

from enclave.attestation.claims import SIMULATION_WARNING, AttestationBackend, AttestationError, AttestationUnavailable, Claims

__all__ = ["SIMULATION_WARNING", "AttestationBackend", "AttestationError", "AttestationUnavailable", "Claims",
           "TEE_TYPES", "backend_for"]

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
