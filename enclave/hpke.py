"""Sealed requests and sealed streaming responses: HPKE (RFC 9180) in the OHTTP pattern (RFC 9458).

Suite: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, base mode. pyhpke provides the HPKE
contexts and the exporter; `cryptography` provides the primitives (X25519, HKDF, AES-GCM).

Request (RFC 9458 section 4.3): hdr = key_id(1) || kem_id(2) || kdf_id(2) || aead_id(2);
info = LABEL || 0x00 || hdr, so a changed key id or suite fails to open, not just a looked-up key.
Response (RFC 9458 section 4.4, extended to a stream as in the chunked-OHTTP draft): the server
draws response_nonce, exports `secret` from the request's HPKE context, derives an AEAD key and base
nonce with HKDF(salt = enc || response_nonce); chunk i is sealed under nonce XOR i, and the last
chunk uses AAD "final", so a truncated or reordered stream does not open.
"""
from __future__ import annotations

import dataclasses
import os
import struct

from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey, OpenError

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0002
NK, NN, NENC = 32, 12, 32
REQUEST_LABEL = b"privlm/v1 sealed GenerateRequest"
RESPONSE_LABEL = b"privlm/v1 sealed GenerateStreamResponse"
KEY_RELEASE_LABEL = b"privlm/v1 released secret"
SUITE = CipherSuite.new(KEMId(KEM_ID), KDFId(KDF_ID), AEADId(AEAD_ID))


class SealError(ValueError):
    """A sealed message was refused. `reason` is a fixed code (logged, counted, audited)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    """An OHTTP key configuration (RFC 9458 section 3) with one symmetric suite."""
    key_id: int
    public_key: bytes
    kem_id: int = KEM_ID
    kdf_id: int = KDF_ID
    aead_id: int = AEAD_ID

    def encode(self) -> bytes:
        return (struct.pack(">BH", self.key_id, self.kem_id) + self.public_key
                + struct.pack(">HHH", 4, self.kdf_id, self.aead_id))

    @classmethod
    def decode(cls, data: bytes) -> "KeyConfig":
        if len(data) != 3 + NENC + 6:
            raise SealError("bad_key_config", "key configuration has the wrong length for X25519")
        key_id, kem_id = struct.unpack(">BH", data[:3])
        pk = data[3:3 + NENC]
        length, kdf_id, aead_id = struct.unpack(">HHH", data[3 + NENC:])
        cfg = cls(key_id, pk, kem_id, kdf_id, aead_id)
        if length != 4 or (kem_id, kdf_id, aead_id) != (KEM_ID, KDF_ID, AEAD_ID):
            raise SealError("suite_mismatch", "key configuration is not X25519/HKDF-SHA256/AES-256-GCM")
        return cfg

    def header(self) -> bytes:
        return struct.pack(">BHHH", self.key_id, self.kem_id, self.kdf_id, self.aead_id)


@dataclasses.dataclass(frozen=True)
class ServerKey:
    """The gateway's HPKE private key; generated in memory per process unless loaded."""
    key_id: int
    private_key: X25519PrivateKey

    @classmethod
    def generate(cls, key_id: int | None = None) -> "ServerKey":
        return cls(os.urandom(1)[0] if key_id is None else key_id, X25519PrivateKey.generate())

    def config(self) -> KeyConfig:
        pub = self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return KeyConfig(self.key_id, pub)


@dataclasses.dataclass(frozen=True)
class SealedMessage:
    key_id: int
    kem_id: int
    kdf_id: int
    aead_id: int
    enc: bytes
    ciphertext: bytes
    aad: bytes


def _info(label: bytes, hdr: bytes) -> bytes:
    return label + b"\x00" + hdr


def seal(config: KeyConfig, plaintext: bytes, aad: bytes = b"", label: bytes = REQUEST_LABEL):
    """Client side: (SealedMessage, sender context kept to open the response)."""
    pkr = KEMKey.from_pyca_cryptography_key(X25519PublicKey.from_public_bytes(config.public_key))
    enc, ctx = SUITE.create_sender_context(pkr, _info(label, config.header()))
    ct = ctx.seal(plaintext, aad)
    return SealedMessage(config.key_id, config.kem_id, config.kdf_id, config.aead_id, enc, ct, aad), ctx


def open_sealed(keys: dict[int, ServerKey], msg: SealedMessage, label: bytes = REQUEST_LABEL):
    """Server side: (plaintext, recipient context). Raises SealError with a reason code."""
    key = keys.get(msg.key_id)
    if key is None:
        raise SealError("unknown_key_id", f"no HPKE key with id {msg.key_id}; fetch fresh evidence")
    if (msg.kem_id, msg.kdf_id, msg.aead_id) != (KEM_ID, KDF_ID, AEAD_ID):
        raise SealError("suite_mismatch", "only X25519/HKDF-SHA256/AES-256-GCM is accepted")
    if len(msg.enc) != NENC:
        raise SealError("bad_enc", "encapsulated key must be 32 bytes")
    try:
        skr = KEMKey.from_pyca_cryptography_key(key.private_key)
        ctx = SUITE.create_recipient_context(msg.enc, skr, _info(label, key.config().header()))
        return ctx.open(msg.ciphertext, msg.aad), ctx
    except (OpenError, ValueError) as exc:
        # enc, ciphertext and aad tampering all end here: they are indistinguishable by design.
        raise SealError("hpke_open_failed", "sealed request did not authenticate") from exc


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    h = hmac.HMAC(salt, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


class _StreamKeys:
    def __init__(self, ctx, enc: bytes, response_nonce: bytes):
        secret = ctx.export(RESPONSE_LABEL, max(NN, NK))
        prk = _hkdf_extract(enc + response_nonce, secret)
        self._aead = AESGCM(_expand(prk, b"key", NK))
        self._nonce = int.from_bytes(_expand(prk, b"nonce", NN), "big")
        self._seq = 0
        self._done = False

    def _next_nonce(self) -> bytes:
        if self._done:
            raise SealError("stream_finished", "sealed stream already finished")
        nonce = (self._nonce ^ self._seq).to_bytes(NN, "big")
        self._seq += 1
        return nonce


class ResponseSealer(_StreamKeys):
    """Server side: seal response chunks with keys exported from the request's context."""

    def __init__(self, recipient_ctx, enc: bytes):
        self.response_nonce = os.urandom(max(NN, NK))
        super().__init__(recipient_ctx, enc, self.response_nonce)

    def seal(self, plaintext: bytes, final: bool = False) -> bytes:
        ct = self._aead.encrypt(self._next_nonce(), plaintext, b"final" if final else b"")
        self._done = final
        return ct


class ResponseOpener(_StreamKeys):
    """Client side: open chunks in order; a missing final chunk means the stream was cut."""

    def __init__(self, sender_ctx, enc: bytes, response_nonce: bytes):
        if len(response_nonce) != max(NN, NK):
            raise SealError("bad_response_nonce", "response nonce has the wrong length")
        super().__init__(sender_ctx, enc, response_nonce)

    @property
    def finished(self) -> bool:
        return self._done

    def open(self, ciphertext: bytes, final: bool) -> bytes:
        try:
            pt = self._aead.decrypt(self._next_nonce(), ciphertext, b"final" if final else b"")
        except Exception as exc:  # cryptography raises InvalidTag
            raise SealError("response_open_failed", "sealed response chunk did not authenticate") from exc
        self._done = final
        return pt
