"""NVIDIA GPU confidential computing: tokens from NVIDIA's attestation CLI, verified offline.

The CLI (NVIDIA Attestation SDK / nvtrust local verifier) attests the GPU against a 32-byte nonce
and returns EAT tokens: an overall JWT plus one JWT per GPU (ES384). We set the GPU nonce to
SHA-256(report_data), so the GPU evidence is bound to the same key and measurement as the CPU TEE
evidence. verify() checks the ES384 signatures against keys the policy pins, the nonce, the overall
result, measurement match (`measres`) and that the GPU is not in debug mode. The CLI's exact
command line is configurable because its flags differ between releases.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclave.attestation.claims import AttestationError, AttestationUnavailable, Claims

DEFAULT_COMMAND = ("nvattest", "attest", "--device", "gpu", "--verifier", "local", "--nonce", "{nonce}",
                   "--format", "json")


def _b64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_jwt(token: str, keys_pem) -> dict:
    try:
        h, p, s = token.split(".")
        header = json.loads(_b64url(h))
        claims = json.loads(_b64url(p))
        sig = _b64url(s)
    except ValueError as exc:
        raise AttestationError("malformed_evidence", f"not a JWT: {exc}") from exc
    if header.get("alg") != "ES384" or len(sig) != 96:
        raise AttestationError("malformed_evidence", "NVIDIA tokens must be ES384")
    der = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    for pem in keys_pem:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
        try:
            key.verify(der, f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA384()))
            return claims
        except (InvalidSignature, TypeError):
            continue
    raise AttestationError("bad_signature", "NVIDIA token is not signed by a key the policy pins")


class NvidiaBackend:
    tee_type = "nvidia-gpu-cc"

    def __init__(self, command: tuple[str, ...] = DEFAULT_COMMAND, timeout_s: float = 120.0):
        self.command = tuple(command)
        self.timeout_s = timeout_s

    def evidence(self, nonce: bytes, report_data: bytes) -> bytes:
        if shutil.which(self.command[0]) is None:
            raise AttestationUnavailable(f"nvidia-gpu-cc attestation unavailable: {self.command[0]!r} not on PATH "
                                         "(install NVIDIA's attestation CLI on a CC-mode GPU host)")
        gpu_nonce = hashlib.sha256(report_data).hexdigest()
        cmd = [a.replace("{nonce}", gpu_nonce) for a in self.command]
        proc = subprocess.run(cmd, capture_output=True, timeout=self.timeout_s, check=False)
        if proc.returncode != 0:
            raise AttestationUnavailable(f"NVIDIA attestation CLI failed ({proc.returncode}): "
                                         f"{proc.stderr.decode(errors='replace')[-500:]}")
        out = json.loads(proc.stdout)
        eat = out.get("detached_eat") or out.get("eat") or out
        return json.dumps({"report_data": report_data.hex(), "detached_eat": eat}).encode()

    def verify(self, evidence: bytes, policy, nonce: bytes) -> Claims:
        if not policy.nvidia_token_keys_pem:
            raise AttestationError("no_trusted_root", "policy pins no NVIDIA token signing key")
        try:
            d = json.loads(evidence)
            report_data = bytes.fromhex(d["report_data"])
            (_kind, overall_token), per_gpu = d["detached_eat"][0], d["detached_eat"][1]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise AttestationError("malformed_evidence", f"NVIDIA evidence does not parse: {exc}") from exc
        overall = verify_jwt(overall_token, policy.nvidia_token_keys_pem)
        if overall.get("eat_nonce") != hashlib.sha256(report_data).hexdigest():
            raise AttestationError("key_binding", "GPU evidence nonce does not bind this report_data")
        if overall.get("x-nvidia-overall-att-result") is not True:
            raise AttestationError("gpu_attestation_failed", "NVIDIA overall attestation result is not true")
        if not per_gpu:
            raise AttestationError("malformed_evidence", "no per-GPU tokens")
        debug, details = False, {}
        for name, token in per_gpu.items():
            c = verify_jwt(token, policy.nvidia_token_keys_pem)
            if c.get("measres") != "success":
                raise AttestationError("wrong_measurement", f"{name}: GPU measurements do not match the RIM")
            if c.get("eat_nonce") not in (None, overall.get("eat_nonce")):
                raise AttestationError("key_binding", f"{name}: token answers another nonce")
            debug = debug or c.get("dbgstat", "disabled") != "disabled"
            details[name] = {k: c.get(k) for k in ("hwmodel", "oemid", "x-nvidia-gpu-driver-version",
                                                   "x-nvidia-gpu-vbios-version")}
        return Claims(tee_type="nvidia-gpu-cc", report_data=report_data, launch_measurement=b"", debug=debug,
                      details=details)
