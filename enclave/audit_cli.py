"""`privlm audit verify`: check an audit log offline, from its files and the log's public key.

Checks: every entry matches its leaf hash and decodes as a schema-valid event (no plaintext);
every checkpoint is signed by the log key and its root is the Merkle root of that many entries;
consecutive checkpoints are consistent (RFC 6962 consistency proofs); every entry is included in
the latest checkpoint (inclusion proofs); and, with --trusted-checkpoint (one you saved earlier),
the log still extends what you saw then, which is what catches a truncated log.
`privlm audit checkpoint` prints the latest checkpoint so you can save it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from enclave.audit import merkle
from enclave.audit.checkpoint import Checkpoint, CheckpointError, load_public_key
from enclave.audit.events import AuditEvent, EventError
from enclave.audit.log import CHECKPOINTS, ENTRIES, TamperError, check_against_checkpoints, read_checkpoints, read_entries

MAX_FULL_INCLUSION = 200_000


def verify_log(log_dir: Path, public_pem: bytes, trusted: Checkpoint | None = None) -> dict:
    """Raise TamperError / CheckpointError / ProofError / EventError on the first problem."""
    pub = load_public_key(public_pem)
    entries, hashes, _, torn = read_entries(log_dir / ENTRIES)
    cps, _, ctorn = read_checkpoints(log_dir / CHECKPOINTS)
    if not cps:
        raise TamperError("no signed checkpoints: nothing to verify against")
    for i, e in enumerate(entries):
        try:
            AuditEvent.decode(e)
        except EventError as exc:
            raise EventError(f"entry {i}: {exc}") from exc
    check_against_checkpoints(hashes, cps, pub)
    tree = merkle.Tree()
    for lh in hashes:
        tree.append(lh)
    for a, b in zip(cps, cps[1:]):
        proof = tree.consistency(a.size, b.size) if 0 < a.size < b.size else []
        merkle.verify_consistency(a.size, b.size, a.root, b.root, proof)
    last = cps[-1]
    step = max(1, last.size // MAX_FULL_INCLUSION)
    for i in range(0, last.size, step):
        merkle.verify_inclusion(hashes[i], i, last.size, tree.inclusion(i, last.size), last.root)
    if trusted is not None:
        trusted.verify(pub)
        if trusted.size > last.size:
            raise TamperError(f"log was truncated: you trusted size {trusted.size}, the log now has {last.size}")
        proof = tree.consistency(trusted.size, last.size) if 0 < trusted.size < last.size else []
        merkle.verify_consistency(trusted.size, last.size, trusted.root, last.root, proof)
    return {"ok": True, "entries": len(entries), "checkpoints": len(cps), "tree_size": last.size,
            "root_sha256": last.root.hex(), "torn_tail": torn or ctorn,
            "unsigned_entries": len(entries) - last.size, "inclusion_checked_every": step}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm audit", description="verify the privlm transparency log offline")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="verify signatures, inclusion and consistency")
    v.add_argument("--log", required=True, help="audit log folder (entries.bin, checkpoints.jsonl)")
    v.add_argument("--public-key", required=True, help="PEM file with the log's Ed25519 public key")
    v.add_argument("--trusted-checkpoint", help="a checkpoint JSON you saved earlier")
    c = sub.add_parser("checkpoint", help="print the latest checkpoint (JSON) to save and compare later")
    c.add_argument("--log", required=True)
    k = sub.add_parser("public-key", help="print the log's Ed25519 public key (PEM) from the key folder")
    k.add_argument("--key-dir", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "public-key":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        key = load_pem_private_key((Path(args.key_dir) / "audit_ed25519.pem").read_bytes(), None)
        print(key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode(), end="")
        return 0
    log_dir = Path(args.log)
    if args.cmd == "checkpoint":
        cps, _, _ = read_checkpoints(log_dir / CHECKPOINTS)
        if not cps:
            print("no checkpoints", file=sys.stderr)
            return 1
        print(cps[-1].to_json())
        return 0
    try:
        trusted = Checkpoint.from_json(Path(args.trusted_checkpoint).read_text()) if args.trusted_checkpoint else None
        report = verify_log(log_dir, Path(args.public_key).read_bytes(), trusted)
    except (TamperError, CheckpointError, merkle.ProofError, EventError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1
    except OSError as exc:
        print(f"privlm audit verify: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
