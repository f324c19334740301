"""Constructed hardware evidence (no TEE here): SNP reports with a VCEK/ASK/ARK chain, DCAP v3/v4
quotes with a PCK chain, NVIDIA ES384 tokens. Layouts follow the public specifications; keys are
made up, so only a policy pinning these test roots accepts them."""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclave.attestation import snp


def _cert(name, key, issuer_name=None, issuer_key=None, ca=True, curve_hash=hashes.SHA384()):
    now = datetime.datetime.now(datetime.timezone.utc)
    subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    iss = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]) if issuer_name else subj
    return (x509.CertificateBuilder().subject_name(subj).issuer_name(iss).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key or key, curve_hash))


def pem(c) -> str:
    return c.public_bytes(serialization.Encoding.PEM).decode()


class SnpChain:
    def __init__(self):
        self.ark_key, self.ask_key, self.vcek_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
        self.ark = _cert("ARK-Test", self.ark_key)
        self.ask = _cert("SEV-Test", self.ask_key, "ARK-Test", self.ark_key)
        self.vcek = _cert("SEV-VCEK", self.vcek_key, "SEV-Test", self.ask_key, ca=False)

    def report(self, report_data: bytes, measurement: bytes, debug=False, key=None) -> bytes:
        r = bytearray(snp.REPORT_LEN)
        struct.pack_into("<IIQ", r, 0, 3, 1, (1 << 17) | ((1 if debug else 0) << snp.POLICY_DEBUG_BIT))
        struct.pack_into("<II", r, 0x30, 0, 1)
        r[0x50:0x90] = report_data
        r[0x90:0xC0] = measurement
        sig = (key or self.vcek_key).sign(bytes(r[:snp.SIGNED_LEN]), ec.ECDSA(hashes.SHA384()))
        rr, ss = decode_dss_signature(sig)
        r[snp.SIGNED_LEN:snp.SIGNED_LEN + 72] = rr.to_bytes(72, "little")
        r[snp.SIGNED_LEN + 72:snp.SIGNED_LEN + 144] = ss.to_bytes(72, "little")
        return bytes(r)

    def auxblob(self) -> bytes:
        certs = [(snp.GUID_ARK, self.ark), (snp.GUID_ASK, self.ask), (snp.GUID_VCEK, self.vcek)]
        ders = [c.public_bytes(serialization.Encoding.DER) for _, c in certs]
        table_len = 24 * (len(certs) + 1)
        out, off = b"", table_len
        for (g, _), der in zip(certs, ders):
            out += g.bytes_le + struct.pack("<II", off, len(der))
            off += len(der)
        return out + bytes(24) + b"".join(ders)

    def evidence(self, report_data: bytes, measurement: bytes, **kw) -> bytes:
        return json.dumps({"provider": "sev_guest", "outblob": base64.b64encode(self.report(report_data, measurement, **kw)).decode(),
                           "auxblob": base64.b64encode(self.auxblob()).decode()}).encode()


def _raw_sig(key, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class DcapChain:
    def __init__(self):
        self.root_key, self.pck_key, self.att_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        self.root = _cert("Intel SGX Root CA (test)", self.root_key, curve_hash=hashes.SHA256())
        self.pck = _cert("Intel SGX PCK Certificate (test)", self.pck_key, "Intel SGX Root CA (test)",
                         self.root_key, ca=False, curve_hash=hashes.SHA256())

    def _qe(self, auth: bytes) -> bytes:
        n = self.att_key.public_key().public_numbers()
        att = n.x.to_bytes(32, "big") + n.y.to_bytes(32, "big")
        qe = bytearray(384)
        qe[320:352] = hashlib.sha256(att + auth).digest()
        qe = bytes(qe)
        chain = (pem(self.pck) + pem(self.root)).encode() + b"\x00"
        section = qe + _raw_sig(self.pck_key, qe) + struct.pack("<H", len(auth)) + auth
        section += struct.pack("<HI", 5, len(chain)) + chain
        return att, section

    def sgx_quote(self, report_data: bytes, mrenclave: bytes, debug=False) -> bytes:
        header = struct.pack("<HHI", 3, 2, 0) + bytes(40)
        body = bytearray(384)
        struct.pack_into("<Q", body, 48, 0x4 | (0x2 if debug else 0))
        body[64:96] = mrenclave
        body[320:384] = report_data
        signed = header + bytes(body)
        att, section = self._qe(b"auth")
        sig = _raw_sig(self.att_key, signed) + att + section
        return signed + struct.pack("<I", len(sig)) + sig

    def tdx_quote(self, report_data: bytes, mrtd: bytes, debug=False) -> bytes:
        header = struct.pack("<HHI", 4, 2, 0x81) + bytes(40)
        body = bytearray(584)
        struct.pack_into("<Q", body, 120, 1 if debug else 0)
        body[136:184] = mrtd
        body[520:584] = report_data
        signed = header + bytes(body)
        att, section = self._qe(b"")
        sig = _raw_sig(self.att_key, signed) + att + struct.pack("<HI", 6, len(section)) + section
        return signed + struct.pack("<I", len(sig)) + sig


class NvidiaSigner:
    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP384R1())

    def public_pem(self) -> str:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def jwt(self, claims: dict) -> str:
        enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
        h = enc(json.dumps({"alg": "ES384", "typ": "JWT"}).encode())
        p = enc(json.dumps(claims).encode())
        r, s = decode_dss_signature(self.key.sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA384())))
        return f"{h}.{p}.{enc(r.to_bytes(48, 'big') + s.to_bytes(48, 'big'))}"

    def evidence(self, report_data: bytes, measres="success", nonce_of=None, dbg="disabled") -> bytes:
        nonce = hashlib.sha256(nonce_of if nonce_of is not None else report_data).hexdigest()
        overall = self.jwt({"eat_nonce": nonce, "x-nvidia-overall-att-result": True})
        gpu = self.jwt({"eat_nonce": nonce, "measres": measres, "dbgstat": dbg, "hwmodel": "GH100 A01 GSP BROM"})
        return json.dumps({"report_data": report_data.hex(), "detached_eat": [["JWT", overall], {"GPU-0": gpu}]}).encode()
