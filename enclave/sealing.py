"""Sealing bound to the measurement: data sealed by one build cannot be unsealed by another.

key = HKDF-SHA384(root secret, salt "privlm-seal-v1", info = measurement); AES-256-GCM with the
measurement and a caller label as associated data. The root secret must come from the TEE:
  - Gramine SGX: /dev/attestation/keys/_sgx_mrenclave (an MRENCLAVE-bound key from EGETKEY);
  - simulated: a random file in the key directory (no hardware protection; says so);
  - SEV-SNP (SNP_GET_DERIVED_KEY ioctl) and TDX (no sealing key; use key release): not implemented,
    a clear error rather than a weaker substitute.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave.attestation import SIMULATION_WARNING, AttestationUnavailable

log = logging.getLogger("privlm.enclave.sealing")
MAGIC = b"PSL1"


class SealingError(ValueError):
    pass


class Sealer:
    def __init__(self, root_secret: bytes, measurement: bytes):
        if len(root_secret) < 16:
            raise SealingError("sealing root secret must be at least 16 bytes")
        self.measurement = measurement
        key = HKDF(hashes.SHA384(), 32, salt=b"privlm-seal-v1", info=measurement).derive(root_secret)
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, label: bytes = b"") -> bytes:
        nonce = os.urandom(12)
        head = MAGIC + self.measurement
        return head + nonce + self._aead.encrypt(nonce, plaintext, head + label)

    def unseal(self, blob: bytes, label: bytes = b"") -> bytes:
        n = len(MAGIC) + len(self.measurement)
        if blob[:len(MAGIC)] != MAGIC:
            raise SealingError("not a privlm sealed blob")
        if blob[len(MAGIC):n] != self.measurement:
            raise SealingError("sealed under a different measurement: this build cannot unseal it")
        try:
            return self._aead.decrypt(blob[n:n + 12], blob[n + 12:], blob[:n] + label)
        except InvalidTag as exc:
            raise SealingError("sealed blob does not authenticate (tampered, or another root key)") from exc


def root_secret(tee_type: str, key_dir: str | Path = "", gramine_root: str = "/dev/attestation") -> bytes:
    if tee_type == "simulated":
        log.warning("sealing with a file-backed root key: %s", SIMULATION_WARNING)
        path = Path(key_dir) / "sealing_root.bin"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_bytes(os.urandom(32))
        return path.read_bytes()
    if tee_type == "sgx-gramine":
        p = Path(gramine_root) / "keys" / "_sgx_mrenclave"
        if not p.exists():
            raise AttestationUnavailable(f"{p} missing: not inside a Gramine SGX enclave")
        return p.read_bytes()
    raise AttestationUnavailable(f"measurement-bound sealing keys for {tee_type!r} are not implemented; "
                                 "use key release from the bank's broker instead")
