"""EnclaveConfig: the one typed configuration of the confidential-compute layer."""
from __future__ import annotations

import dataclasses

from privlm.base.config import check

BACKENDS = ("simulated", "sev-snp", "tdx", "sgx-gramine")


@dataclasses.dataclass(frozen=True)
class EnclaveConfig:
    # TEE backend that produces this instance's evidence. "simulated" also needs allow_simulated.
    attestation: str = "sev-snp"
    # Must be set explicitly to run the simulated backend (development; warned about everywhere).
    allow_simulated: bool = False
    # Private keys: audit-log signing key, simulated root, sealing root. Created 0600 on first use.
    key_dir: str = ".cache/enclave/keys"
    audit_dir: str = ".cache/enclave/audit"
    # privlm measurement (hex SHA-384). Empty: computed at startup from model_path + effective_config.
    measurement: str = ""
    model_path: str = ""
    effective_config: dict = dataclasses.field(default_factory=dict)
    # Sealed requests older/newer than this (by their authenticated timestamp) are refused.
    replay_window_s: float = 120.0
    max_sealed_request_bytes: int = 4 * 1024 * 1024
    tsm_report_root: str = "/sys/kernel/config/tsm/report"
    gramine_root: str = "/dev/attestation"
    audit_origin: str = "privlm-audit"
    # Also attest the GPU (NVIDIA confidential computing) and send its evidence with the CPU's.
    gpu_attestation: bool = False
    # NVIDIA attestation CLI command line; "{nonce}" is replaced. Empty: the default command.
    nvidia_command: tuple = ()

    def __post_init__(self) -> None:
        check(self.attestation in BACKENDS, f"enclave.attestation must be one of {BACKENDS}")
        check(self.attestation != "simulated" or self.allow_simulated,
              "enclave.attestation = 'simulated' requires enclave.allow_simulated = true (development only)")
        check(self.replay_window_s > 0, "enclave.replay_window_s must be > 0")
        check(bool(self.measurement) or bool(self.model_path),
              "enclave: set measurement (from `privlm measure`) or model_path to compute it")
        if self.measurement:
            check(len(self.measurement) == 96, "enclave.measurement must be a SHA-384 hex digest")
