"""Intel DCAP ECDSA quotes: SGX v3 (Gramine) and TDX v4 (configfs-tsm), verified offline.

Checked: the attestation key's ECDSA-P256 signature over header || report body; the QE report's
signature by the PCK certificate; the QE report binding SHA-256(attestation key || QE auth data);
the PCK chain up to the Intel root the policy pins; the DEBUG attribute. Not checked (needs Intel
PCS collateral, fetched by the relying party): TCB info, QE identity and revocation lists. The
fields are returned so a verifier with collateral can add those checks.
"""
from __future__ import annotations

import hashlib
import struct

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclave.attestation.claims import AttestationError

HEADER = 48
SGX_BODY = 384
TDX_BODY = 584
TEE_SGX, TEE_TDX = 0x00000000, 0x00000081
CERT_PCK_CHAIN, CERT_QE_REPORT = 5, 6


def _p256(raw64: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicNumbers(int.from_bytes(raw64[:32], "big"), int.from_bytes(raw64[32:], "big"),
                                         ec.SECP256R1()).public_key()


def _verify(key, sig64: bytes, data: bytes, what: str) -> None:
    der = encode_dss_signature(int.from_bytes(sig64[:32], "big"), int.from_bytes(sig64[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AttestationError("bad_signature", f"{what} signature does not verify") from exc


def parse_sgx_body(b: bytes) -> dict:
    (flags,) = struct.unpack_from("<Q", b, 48)
    return {"attributes_flags": flags, "mrenclave": b[64:96], "mrsigner": b[128:160],
            "isv_prod_id": struct.unpack_from("<H", b, 256)[0], "isv_svn": struct.unpack_from("<H", b, 258)[0],
            "report_data": b[320:384], "debug": bool(flags & 0x2)}


def parse_tdx_body(b: bytes) -> dict:
    (td_attr,) = struct.unpack_from("<Q", b, 120)
    return {"tee_tcb_svn": b[0:16].hex(), "mrseam": b[16:64], "td_attributes": td_attr, "mrtd": b[136:184],
            "mrconfigid": b[184:232], "mrowner": b[232:280], "rtmr": [b[328 + 48 * i:376 + 48 * i] for i in range(4)],
            "report_data": b[520:584], "debug": bool(td_attr & 0x1)}


class _Reader:
    def __init__(self, data: bytes, off: int):
        self.data, self.off = data, off

    def take(self, n: int) -> bytes:
        if self.off + n > len(self.data):
            raise AttestationError("malformed_evidence", "quote is truncated")
        out = self.data[self.off:self.off + n]
        self.off += n
        return out

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]


def _qe_section(r: _Reader) -> tuple[bytes, bytes, bytes, bytes]:
    qe_report, qe_sig = r.take(SGX_BODY), r.take(64)
    auth = r.take(r.u16())
    ctype, size = r.u16(), r.u32()
    if ctype != CERT_PCK_CHAIN:
        raise AttestationError("malformed_evidence", f"certification data type {ctype}: only a PCK chain (5) is supported")
    return qe_report, qe_sig, auth, r.take(size)


def verify_quote(quote: bytes, policy) -> dict:
    """Parse and verify a v3 (SGX) or v4 (TDX) quote; returns the body fields plus 'tee'."""
    from enclave.attestation.x509chain import verify_chain

    if len(quote) < HEADER + 4:
        raise AttestationError("malformed_evidence", "quote too short")
    version, key_type, tee = struct.unpack_from("<HHI", quote, 0)
    if key_type != 2:
        raise AttestationError("malformed_evidence", "only ECDSA-256-with-P-256 quotes are supported")
    if version == 3:
        body_len, parse, tee_name = SGX_BODY, parse_sgx_body, "sgx"
    elif version == 4 and tee == TEE_TDX:
        body_len, parse, tee_name = TDX_BODY, parse_tdx_body, "tdx"
    else:
        raise AttestationError("malformed_evidence", f"unsupported quote version {version} / tee type {tee:#x}")
    r = _Reader(quote, 0)
    signed = r.take(HEADER + body_len)
    sig_len = r.u32()
    sig_end = r.off + sig_len
    sig, att_key = r.take(64), r.take(64)
    if version == 3:
        qe_report, qe_sig, auth, chain_pem = _qe_section(r)
    else:
        ctype, _size = r.u16(), r.u32()
        if ctype != CERT_QE_REPORT:
            raise AttestationError("malformed_evidence", "TDX quote lacks QE report certification data")
        qe_report, qe_sig, auth, chain_pem = _qe_section(r)
    if r.off != sig_end:
        raise AttestationError("malformed_evidence", "quote signature data length mismatch")
    _verify(_p256(att_key), sig, signed, "quote (attestation key)")
    chain = x509.load_pem_x509_certificates(chain_pem.rstrip(b"\x00"))
    pck = verify_chain(chain, policy.trusted_roots_pem)
    _verify(pck.public_key(), qe_sig, qe_report, "QE report (PCK)")
    qe_rd = parse_sgx_body(qe_report)["report_data"]
    if qe_rd[:32] != hashlib.sha256(att_key + auth).digest() or qe_rd[32:] != bytes(32):
        raise AttestationError("bad_signature", "QE report does not bind the attestation key")
    fields = parse(signed[HEADER:])
    fields["tee"] = tee_name
    return fields
