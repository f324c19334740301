"""Gramine SGX attestation through its pseudo-files (/dev/attestation), DCAP quotes only.

evidence(): check attestation_type is "dcap", write report_data to user_report_data, read quote.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from enclave.attestation.claims import AttestationError, AttestationUnavailable, Claims


class GramineBackend:
    tee_type = "sgx-gramine"

    def __init__(self, device_root: str = "/dev/attestation"):
        self.root = Path(device_root)

    def evidence(self, nonce: bytes, report_data: bytes) -> bytes:
        kind_file = self.root / "attestation_type"
        if not kind_file.exists():
            raise AttestationUnavailable(
                f"sgx-gramine attestation unavailable: {kind_file} missing (not running inside a Gramine SGX "
                "enclave with remote attestation enabled). Refusing to fall back to simulation.")
        kind = kind_file.read_text().strip()
        if kind != "dcap":
            raise AttestationUnavailable(f"Gramine attestation type is {kind!r}; privlm needs 'dcap'")
        (self.root / "user_report_data").write_bytes(report_data)
        quote = (self.root / "quote").read_bytes()
        return json.dumps({"quote": base64.b64encode(quote).decode()}).encode()

    def verify(self, evidence: bytes, policy, nonce: bytes) -> Claims:
        from enclave.attestation.dcap import verify_quote
        try:
            quote = base64.b64decode(json.loads(evidence)["quote"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AttestationError("malformed_evidence", f"Gramine evidence does not parse: {exc}") from exc
        q = verify_quote(quote, policy)
        if q["tee"] != "sgx":
            raise AttestationError("tee_type", "Gramine evidence is not an SGX quote")
        return Claims(tee_type="sgx-gramine", report_data=q["report_data"], launch_measurement=q["mrenclave"],
                      debug=q["debug"], details={"mrsigner": q["mrsigner"].hex(), "isv_prod_id": q["isv_prod_id"],
                                                 "isv_svn": q["isv_svn"]})
