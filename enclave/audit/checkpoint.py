"""Signed checkpoints (tree heads): origin, size, root hash, time; Ed25519 over a fixed text form.

The text form follows the transparency-log "signed note" layout (one field per line) so a
checkpoint can be gossiped, pinned by a bank and verified without this code.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class CheckpointError(ValueError):
    """A checkpoint's signature or fields do not verify."""


def key_id(public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    time_unix_ms: int
    key_id: bytes = b""
    signature: bytes = b""

    def body(self) -> bytes:
        return (f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"
                f"{self.time_unix_ms}\n").encode()

    def signed(self, key: Ed25519PrivateKey) -> "Checkpoint":
        return dataclasses.replace(self, key_id=key_id(key.public_key()), signature=key.sign(self.body()))

    def verify(self, public_key: Ed25519PublicKey) -> None:
        if self.key_id != key_id(public_key):
            raise CheckpointError("checkpoint signed by a different log key")
        try:
            public_key.verify(self.signature, self.body())
        except InvalidSignature as exc:
            raise CheckpointError(f"bad signature on checkpoint of size {self.size}") from exc

    def to_json(self) -> str:
        return json.dumps({"origin": self.origin, "size": self.size, "root": self.root.hex(),
                           "time_unix_ms": self.time_unix_ms, "key_id": self.key_id.hex(),
                           "signature": self.signature.hex()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Checkpoint":
        try:
            d = json.loads(text)
            return cls(origin=d["origin"], size=int(d["size"]), root=bytes.fromhex(d["root"]),
                       time_unix_ms=int(d["time_unix_ms"]), key_id=bytes.fromhex(d["key_id"]),
                       signature=bytes.fromhex(d["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed checkpoint: {exc}") from exc


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointError("audit log public key must be Ed25519")
    return key
