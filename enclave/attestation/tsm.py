"""Linux configfs-tsm attestation (kernel >= 6.7): SEV-SNP (provider sev_guest) and TDX (tdx_guest).

evidence(): mkdir REPORT_ROOT/<entry>, write 64 bytes of report_data to inblob, read outblob (SNP
report or TDX quote) and auxblob (SNP certificate table), check `generation` to detect a concurrent
writer, rmdir. Evidence bytes are JSON {provider, outblob, auxblob} (base64).
"""
from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

from enclave.attestation.claims import AttestationError, AttestationUnavailable, Claims

PROVIDERS = {"sev-snp": "sev_guest", "tdx": "tdx_guest"}


class TsmBackend:
    def __init__(self, tee_type: str, report_root: str = "/sys/kernel/config/tsm/report"):
        if tee_type not in PROVIDERS:
            raise ValueError(f"configfs-tsm serves {list(PROVIDERS)}, not {tee_type!r}")
        self.tee_type = tee_type
        self.root = Path(report_root)

    def evidence(self, nonce: bytes, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise AttestationError("bad_report_data", "report_data must be 64 bytes")
        if not self.root.is_dir():
            raise AttestationUnavailable(
                f"{self.tee_type} attestation unavailable: {self.root} does not exist (not a {self.tee_type} "
                "guest, configfs not mounted, or kernel < 6.7). Refusing to fall back to simulation.")
        entry = self.root / f"privlm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            entry.mkdir()
        except OSError as exc:
            raise AttestationUnavailable(f"{self.tee_type}: cannot create {entry}: {exc}") from exc
        try:
            provider = (entry / "provider").read_text().strip()
            if provider != PROVIDERS[self.tee_type]:
                raise AttestationUnavailable(f"configfs-tsm provider is {provider!r}, not {PROVIDERS[self.tee_type]!r}")
            (entry / "inblob").write_bytes(report_data)
            gen = (entry / "generation").read_text().strip()
            out = (entry / "outblob").read_bytes()
            aux_path = entry / "auxblob"
            aux = aux_path.read_bytes() if aux_path.exists() else b""
            if (entry / "generation").read_text().strip() != gen:
                raise AttestationError("concurrent_writer", "configfs-tsm entry changed while reading; retry")
        finally:
            try:
                entry.rmdir()
            except OSError:
                pass
        return json.dumps({"provider": provider, "outblob": base64.b64encode(out).decode(),
                           "auxblob": base64.b64encode(aux).decode()}).encode()

    def verify(self, evidence: bytes, policy, nonce: bytes) -> Claims:
        try:
            d = json.loads(evidence)
            provider, out, aux = d["provider"], base64.b64decode(d["outblob"]), base64.b64decode(d.get("auxblob", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise AttestationError("malformed_evidence", f"configfs-tsm evidence does not parse: {exc}") from exc
        if provider != PROVIDERS[self.tee_type]:
            raise AttestationError("tee_type", f"evidence from provider {provider!r}, expected {PROVIDERS[self.tee_type]!r}")
        if self.tee_type == "sev-snp":
            from enclave.attestation.snp import parse_cert_table, verify_report
            return verify_report(out, parse_cert_table(aux), policy)
        from enclave.attestation.dcap import verify_quote
        q = verify_quote(out, policy)
        if q["tee"] != "tdx":
            raise AttestationError("tee_type", "tdx_guest produced a non-TDX quote")
        return Claims(tee_type="tdx", report_data=q["report_data"], launch_measurement=q["mrtd"], debug=q["debug"],
                      details={"rtmr": [x.hex() for x in q["rtmr"]], "tee_tcb_svn": q["tee_tcb_svn"],
                               "td_attributes": q["td_attributes"]})
