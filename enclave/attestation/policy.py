"""The verification policy a bank pins: which TEEs, which measurements, how fresh, which roots.

JSON or TOML; unknown keys are errors (privlm.base.config). Simulation is refused unless
`allow_simulated = true` is written in the policy itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from privlm.base.config import ConfigError, check, from_mapping, load_file

HARDWARE_TEES = ("sev-snp", "tdx", "sgx-gramine")


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str = "production"
    # TEE types accepted. "simulated" is only accepted if allow_simulated is also true.
    tee_types: tuple = HARDWARE_TEES
    # privlm measurements (SHA-384 hex from `privlm measure`) the bank accepts. Empty: reject all.
    measurements: tuple = ()
    # Hardware launch measurements (SNP MEASUREMENT / TDX MRTD / SGX MRENCLAVE, hex); empty: not pinned.
    launch_measurements: tuple = ()
    allow_simulated: bool = False
    allow_debug: bool = False
    max_age_s: float = 300.0
    # Ed25519 raw public key (hex) of the simulated root; only consulted when allow_simulated.
    simulated_root_public_key: str = ""
    # PEM certificates of the hardware roots the bank trusts (AMD ARK, Intel SGX root CA).
    trusted_roots_pem: tuple = ()
    # PEM public keys that sign NVIDIA attestation tokens (the NVIDIA verifier's keys).
    nvidia_token_keys_pem: tuple = ()
    # Accelerator evidence that must accompany the CPU TEE evidence, bound to the same
    # report_data, e.g. ["nvidia-gpu-cc"] for an H100 in confidential-computing mode.
    required_accelerators: tuple = ()
    # PEM Ed25519 public key of the transparency log; when set, evidence must prove the
    # measurement's inclusion in a checkpoint signed by it.
    audit_public_key_pem: str = ""

    def __post_init__(self) -> None:
        for name in ("tee_types", "measurements", "launch_measurements", "trusted_roots_pem",
                     "nvidia_token_keys_pem", "required_accelerators"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "measurements", tuple(m.lower() for m in self.measurements))
        object.__setattr__(self, "launch_measurements", tuple(m.lower() for m in self.launch_measurements))
        check(self.max_age_s > 0, "policy.max_age_s must be > 0")
        for m in self.measurements:
            check(len(m) == 96 and all(c in "0123456789abcdef" for c in m),
                  f"policy.measurements: {m!r} is not a SHA-384 hex digest")
        if "simulated" in self.tee_types:
            check(self.allow_simulated, "policy lists tee type 'simulated' but allow_simulated is false")

    def digest(self) -> str:
        """SHA-256 of the canonical policy (recorded by policy_changed audit events)."""
        body = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"), default=list)
        return hashlib.sha256(body.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=list)


def production(measurements, **kw) -> Policy:
    """The default: hardware TEEs only, no debug, no simulation."""
    return Policy(measurements=tuple(measurements), **kw)


def development(measurements, simulated_root_public_key: str, **kw) -> Policy:
    """Accepts the simulated backend: for development only, and it says so."""
    return Policy(name="development-simulated", tee_types=("simulated",), allow_simulated=True,
                  measurements=tuple(measurements), simulated_root_public_key=simulated_root_public_key, **kw)


def load(path: str | Path) -> Policy:
    return load_file(Policy, path)


def from_dict(data: dict) -> Policy:
    return from_mapping(Policy, data)


__all__ = ["Policy", "production", "development", "load", "from_dict", "ConfigError"]
