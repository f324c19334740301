"""Certificate-chain checks shared by the hardware backends: leaf -> ... -> a root the policy pins."""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave.attestation.claims import AttestationError


def load_pems(pems) -> list[x509.Certificate]:
    out = []
    for pem in pems:
        data = pem.encode() if isinstance(pem, str) else pem
        out.extend(x509.load_pem_x509_certificates(data))
    return out


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_chain(chain: list[x509.Certificate], trusted_roots_pem) -> x509.Certificate:
    """chain = [leaf, intermediates..., root]; the root must be one the policy pins. Returns the leaf."""
    if not chain:
        raise AttestationError("no_cert_chain", "evidence carries no certificate chain")
    roots = load_pems(trusted_roots_pem)
    if not roots:
        raise AttestationError("no_trusted_root", "policy pins no hardware root certificate")
    top = chain[-1]
    if not any(_spki(top) == _spki(r) and top.subject == r.subject for r in roots):
        raise AttestationError("untrusted_root", f"chain ends at {top.subject.rfc4514_string()}, not a pinned root")
    try:
        top.verify_directly_issued_by(top)
        for child, parent in zip(chain, chain[1:]):
            child.verify_directly_issued_by(parent)
    except Exception as exc:  # InvalidSignature, ValueError/TypeError for unsupported algorithms
        raise AttestationError("bad_cert_chain", f"certificate chain does not verify: {exc}") from exc
    return chain[0]
