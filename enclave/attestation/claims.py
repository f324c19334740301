"""The claims and errors every attestation backend shares."""
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
