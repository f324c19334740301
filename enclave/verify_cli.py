"""`privlm verify`: what a bank's security team runs before sending anything to a gateway.

Fetches evidence for a fresh random nonce over gRPC, verifies it against a pinned policy file
(TEE type, measurement, freshness, key binding, transparency-log inclusion) and prints the claims.
Exit status: 0 verified, 1 rejected (the reason is printed), 2 usage or connection error.
`--emit-dev-policy` writes a development policy that accepts this machine's SIMULATED backend.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc

from enclave.attestation import AttestationError
from enclave.attestation import policy as pol


async def _verify(target: str, policy: pol.Policy, creds, server_name: str, timeout: float) -> dict:
    from enclave.client import fetch_and_verify
    from privlm.v1 import enclave_pb2_grpc

    if creds is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", server_name)])
    async with channel:
        v = await fetch_and_verify(enclave_pb2_grpc.ConfidentialStub(channel), policy, timeout)
    c = v.claims
    return {"verified": True, "policy": policy.name, "tee_type": c.tee_type, "simulated": c.simulated,
            "debug": c.debug, "measurement_sha384": v.measurement.hex(),
            "launch_measurement": c.launch_measurement.hex(), "hpke_key_id": v.key_config.key_id,
            "hpke_public_key": v.key_config.public_key.hex(),
            "details": {k: (v2 if isinstance(v2, (int, str, bool, list, dict)) else str(v2)) for k, v2 in c.details.items()}}


def emit_dev_policy(out: str, key_dir: str, measurement: str, audit_dir_key: bool) -> None:
    from cryptography.hazmat.primitives import serialization

    from enclave.attestation.simulated import load_or_create_root, public_hex
    from enclave.runtime import load_or_create_ed25519

    kd = Path(key_dir)
    extra = {}
    if audit_dir_key:
        pub = load_or_create_ed25519(kd / "audit_ed25519.pem").public_key()
        extra["audit_public_key_pem"] = pub.public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    p = pol.development([measurement], public_hex(load_or_create_root(kd)), **extra)
    Path(out).write_text(p.to_json())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm verify", description="verify a privlm gateway's attestation")
    ap.add_argument("--target", help="gateway address host:port")
    ap.add_argument("--policy", help="pinned policy (.json or .toml)")
    ap.add_argument("--certs", help="mTLS folder from `privlm certs` (uses the client certificate)")
    ap.add_argument("--cert-name", default="client", help="which certificate in --certs to present")
    ap.add_argument("--server-name", default="gateway", help="expected server certificate name")
    ap.add_argument("--insecure-dev-plaintext", action="store_true", help="development only: no TLS (warns)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--emit-dev-policy", metavar="OUT", help="write a development policy accepting SIMULATED evidence")
    ap.add_argument("--key-dir", default=".cache/enclave/keys", help="with --emit-dev-policy: the gateway's key dir")
    ap.add_argument("--measurement", help="with --emit-dev-policy: the measurement to pin (`privlm measure`)")
    args = ap.parse_args(argv)
    if args.emit_dev_policy:
        if not args.measurement:
            ap.error("--emit-dev-policy needs --measurement")
        emit_dev_policy(args.emit_dev_policy, args.key_dir, args.measurement, audit_dir_key=True)
        print(f"wrote development policy (accepts SIMULATED evidence) to {args.emit_dev_policy}", file=sys.stderr)
        return 0
    if not args.target or not args.policy:
        ap.error("--target and --policy are required")
    try:
        policy = pol.load(args.policy)
    except (OSError, ValueError) as exc:
        print(f"privlm verify: policy: {exc}", file=sys.stderr)
        return 2
    if args.insecure_dev_plaintext:
        from privlm.base.certs import dev_plaintext_warning
        dev_plaintext_warning("privlm verify")
        creds = None
    elif args.certs:
        from privlm.base.certs import channel_credentials
        creds = channel_credentials(args.certs, args.cert_name)
    else:
        ap.error("give --certs DIR (mTLS) or --insecure-dev-plaintext")
    try:
        result = asyncio.run(_verify(args.target, policy, creds, args.server_name, args.timeout))
    except AttestationError as exc:
        print(json.dumps({"verified": False, "reason": exc.reason, "error": str(exc)}))
        return 1
    except grpc.aio.AioRpcError as exc:
        print(f"privlm verify: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    if result["simulated"]:
        print("WARNING: the gateway uses SIMULATED attestation (no TEE hardware)", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
