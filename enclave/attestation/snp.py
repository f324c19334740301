"""AMD SEV-SNP attestation reports (SNP ABI spec, ATTESTATION_REPORT, 0x4A0 bytes), verified offline.

Checked: report version and signature algorithm (ECDSA P-384/SHA-384), the signature over bytes
0..0x29F by the VCEK, the VCEK <- ASK <- ARK chain up to an ARK the policy pins, and the guest
policy DEBUG bit. Not checked here: TCB freshness against AMD's published minimums (the policy
can pin launch measurements; TCB values are returned in claims.details for the relying party).
"""
from __future__ import annotations

import struct
import uuid

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclave.attestation.claims import AttestationError, Claims
from enclave.attestation.x509chain import load_pems, verify_chain

REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
POLICY_DEBUG_BIT = 19


def parse_report(report: bytes) -> dict:
    if len(report) != REPORT_LEN:
        raise AttestationError("malformed_evidence", f"SNP report must be {REPORT_LEN} bytes, got {len(report)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", report, 0)
    vmpl, sig_algo = struct.unpack_from("<II", report, 0x30)
    (current_tcb,) = struct.unpack_from("<Q", report, 0x38)
    (reported_tcb,) = struct.unpack_from("<Q", report, 0x180)
    return {"version": version, "guest_svn": guest_svn, "policy": policy, "vmpl": vmpl, "sig_algo": sig_algo,
            "current_tcb": current_tcb, "reported_tcb": reported_tcb,
            "report_data": report[0x50:0x90], "measurement": report[0x90:0xC0], "host_data": report[0xC0:0xE0],
            "chip_id": report[0x1A0:0x1E0], "signature": report[SIGNED_LEN:SIGNED_LEN + 144]}


def parse_cert_table(aux: bytes) -> dict[uuid.UUID, bytes]:
    """The GUID table of the extended report (GUID, u32 offset, u32 length; all-zero entry ends it)."""
    out, off = {}, 0
    while off + 24 <= len(aux):
        guid = uuid.UUID(bytes_le=aux[off:off + 16])
        start, length = struct.unpack_from("<II", aux, off + 16)
        if guid.int == 0:
            break
        if start + length > len(aux):
            raise AttestationError("malformed_evidence", "certificate table entry points past the blob")
        out[guid] = aux[start:start + length]
        off += 24
    return out


def _cert(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_certificate(data)


def verify_report(report: bytes, certs: dict[uuid.UUID, bytes], policy) -> Claims:
    r = parse_report(report)
    if r["version"] < 2 or r["sig_algo"] != 1:
        raise AttestationError("malformed_evidence", "unsupported SNP report version or signature algorithm")
    if GUID_VCEK not in certs or GUID_ASK not in certs:
        raise AttestationError("no_cert_chain", "SNP evidence lacks the VCEK/ASK certificates")
    chain = [_cert(certs[GUID_VCEK]), _cert(certs[GUID_ASK])]
    chain.append(_cert(certs[GUID_ARK]) if GUID_ARK in certs else load_pems(policy.trusted_roots_pem)[0])
    vcek = verify_chain(chain, policy.trusted_roots_pem)
    sig = r["signature"]
    der = encode_dss_signature(int.from_bytes(sig[:72], "little"), int.from_bytes(sig[72:144], "little"))
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AttestationError("bad_cert_chain", "VCEK is not an ECDSA key")
    try:
        key.verify(der, report[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise AttestationError("bad_signature", "SNP report signature does not verify with the VCEK") from exc
    return Claims(tee_type="sev-snp", report_data=r["report_data"], launch_measurement=r["measurement"],
                  debug=bool(r["policy"] >> POLICY_DEBUG_BIT & 1),
                  details={"vmpl": r["vmpl"], "guest_svn": r["guest_svn"], "reported_tcb": r["reported_tcb"],
                           "current_tcb": r["current_tcb"], "chip_id": r["chip_id"].hex(), "policy": r["policy"]})
