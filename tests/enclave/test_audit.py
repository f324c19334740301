"""Audit log: RFC 6962 proofs, signed checkpoints, crash safety, tamper detection, gRPC, offline CLI."""
import asyncio
import json
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave import audit_cli
from enclave.audit import merkle
from enclave.audit.checkpoint import Checkpoint
from enclave.audit.events import AuditEvent, EventError
from enclave.audit.log import CHECKPOINTS, ENTRIES, AuditLog, TamperError

KEY = Ed25519PrivateKey.generate()


def _ev(i: int) -> AuditEvent:
    return AuditEvent("sealed_request_opened", tenant=f"bank-{i % 3}", trace_id=f"{i:032x}",
                      hashes={"ciphertext_sha256": f"{i:064x}"}, labels={"key_id": "7"})


def _filled(tmp_path, n=9) -> AuditLog:
    log = AuditLog(tmp_path, KEY)
    for i in range(n):
        log.append(_ev(i))
    return log


def _pem(tmp_path):
    p = tmp_path / "log.pub.pem"
    p.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return p


def test_rfc6962_known_root_for_empty_and_small_trees():
    # Root of the empty tree is SHA-256(""); a one-leaf tree's root is its leaf hash (RFC 6962 2.1).
    assert merkle.root_from_hashes([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    lh = [merkle.leaf_hash(bytes([i])) for i in range(3)]
    assert merkle.root_from_hashes(lh) == merkle.node_hash(merkle.node_hash(lh[0], lh[1]), lh[2])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), data=st.data())
def test_proofs_verify_and_wrong_ones_fail(n, data):
    hashes = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    rng, tree = merkle.CompactRange(), merkle.Tree()
    for h in hashes:
        rng.append(h)
        tree.append(h)
    root = merkle.root_from_hashes(hashes)
    assert rng.root() == root == tree.root()
    i = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(hashes, i)
    assert tree.inclusion(i, n) == proof  # the cached tree gives the same RFC 6962 paths
    size = data.draw(st.integers(i + 1, n))
    assert tree.inclusion(i, size) == merkle.inclusion_proof(hashes[:size], i)
    merkle.verify_inclusion(hashes[i], i, n, proof, root)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(merkle.leaf_hash(b"forged"), i, n, proof, root)
    m = data.draw(st.integers(1, n))
    cproof = merkle.consistency_proof(hashes, m)
    assert tree.consistency(m, n) == cproof and tree.root(m) == merkle.root_from_hashes(hashes[:m])
    old_root = merkle.root_from_hashes(hashes[:m])
    merkle.verify_consistency(m, n, old_root, root, cproof)
    if m < n:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(m, n, merkle.leaf_hash(b"rewritten"), root, cproof)


def test_events_refuse_plaintext():
    with pytest.raises(EventError):
        AuditEvent("sealed_request_opened", labels={"reason": "customer John Smith owes 10000"})
    with pytest.raises(EventError):
        AuditEvent("sealed_request_opened", labels={"prompt": "x"})
    with pytest.raises(EventError):
        AuditEvent("sealed_request_opened", hashes={"ciphertext_sha256": "not hex"})


def test_reopen_verifies_and_checkpoints_are_signed(tmp_path):
    log = _filled(tmp_path)
    cp = log.checkpoint()
    assert cp.size == 9
    cp.verify(KEY.public_key())
    again = AuditLog(tmp_path, KEY)
    assert again.size == 9 and again.checkpoint().root == cp.root
    other = Ed25519PrivateKey.generate()
    with pytest.raises(Exception):
        AuditLog(tmp_path, other)  # checkpoints signed by a different key


def _records(path):
    data, out, off = path.read_bytes(), [], 0
    while off < len(data):
        (n,) = struct.unpack(">I", data[off:off + 4])
        out.append((off, n))
        off += 4 + n + 64
    return out


def test_editing_an_entry_on_disk_is_detected(tmp_path):
    _filled(tmp_path)
    path = tmp_path / ENTRIES
    off, n = _records(path)[4]
    data = bytearray(path.read_bytes())
    body = bytes(data[off + 4:off + 4 + n]).replace(b"bank-1", b"bank-2")
    data[off + 4:off + 4 + n] = body
    path.write_bytes(bytes(data))
    with pytest.raises(TamperError):
        AuditLog(tmp_path, KEY)
    # Re-hashing the edited leaf does not help: the signed root no longer matches.
    data[off + 4 + n:off + 4 + n + 32] = merkle.leaf_hash(body)
    path.write_bytes(bytes(data))
    with pytest.raises(TamperError):
        AuditLog(tmp_path, KEY)
    assert audit_cli.main(["verify", "--log", str(tmp_path), "--public-key", str(_pem(tmp_path))]) == 1


def test_deleting_an_entry_on_disk_is_detected(tmp_path):
    _filled(tmp_path)
    path = tmp_path / ENTRIES
    recs = _records(path)
    data = path.read_bytes()
    off, n = recs[2]
    path.write_bytes(data[:off] + data[off + 4 + n + 64:])
    with pytest.raises(TamperError):
        AuditLog(tmp_path, KEY)
    assert audit_cli.main(["verify", "--log", str(tmp_path), "--public-key", str(_pem(tmp_path))]) == 1


def test_truncation_caught_against_a_saved_checkpoint(tmp_path, capsys):
    log = _filled(tmp_path)
    saved = tmp_path / "saved.json"
    saved.write_text(log.checkpoint().to_json())
    pem = _pem(tmp_path)
    assert audit_cli.main(["verify", "--log", str(tmp_path), "--public-key", str(pem),
                           "--trusted-checkpoint", str(saved)]) == 0
    # Cut the last 3 entries and their checkpoints: internally consistent, but shorter than saved.
    recs = _records(tmp_path / ENTRIES)
    (tmp_path / ENTRIES).write_bytes((tmp_path / ENTRIES).read_bytes()[:recs[6][0]])
    lines = (tmp_path / CHECKPOINTS).read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if Checkpoint.from_json(ln).size <= 6]
    (tmp_path / CHECKPOINTS).write_text("".join(keep))
    capsys.readouterr()
    assert audit_cli.main(["verify", "--log", str(tmp_path), "--public-key", str(pem)]) == 0
    assert audit_cli.main(["verify", "--log", str(tmp_path), "--public-key", str(pem),
                           "--trusted-checkpoint", str(saved)]) == 1
    assert "truncated" in capsys.readouterr().out


def test_torn_tail_from_a_crash_is_cut_and_log_continues(tmp_path):
    log = _filled(tmp_path, 5)
    root5 = log.checkpoint().root
    with open(tmp_path / ENTRIES, "ab") as f:  # a crash half-way through writing entry 6
        body = _ev(5).encode()
        f.write(struct.pack(">I", len(body)) + body[:10])
    with open(tmp_path / CHECKPOINTS, "a") as f:
        f.write('{"origin": "privlm-au')
    log2 = AuditLog(tmp_path, KEY)
    assert log2.size == 5 and log2.checkpoint().root == root5
    log2.append(_ev(5))
    assert AuditLog(tmp_path, KEY).size == 6
    assert audit_cli.main(["verify", "--log", str(tmp_path), "--public-key", str(_pem(tmp_path))]) == 0


def test_audit_grpc_service_proofs_verify_client_side(tmp_path):
    from enclave_fixtures import channel, serve, sim_runtime

    from privlm.v1 import audit_pb2, audit_pb2_grpc

    rt = sim_runtime(tmp_path)
    for i in range(6):
        rt.audit.append(_ev(i))

    async def main():
        server, port, _ = await serve(rt)
        async with channel(port) as ch:
            stub = audit_pb2_grpc.AuditStub(ch)
            cp = await stub.GetCheckpoint(audit_pb2.GetCheckpointRequest())
            inc = await stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(leaf_index=3))
            cons = await stub.GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(first_size=4))
            ents = await stub.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=100))
        await server.stop(None)
        return cp, inc, cons, ents

    cp, inc, cons, ents = asyncio.run(main())
    Checkpoint(cp.origin, cp.tree_size, cp.root_hash, cp.timestamp_unix_ms, cp.key_id, cp.signature).verify(
        rt.audit.public_key)
    merkle.verify_inclusion(merkle.leaf_hash(inc.leaf), 3, cp.tree_size, list(inc.path), cp.root_hash)
    hashes = [merkle.leaf_hash(e) for e in ents.entries]
    merkle.verify_consistency(4, cp.tree_size, merkle.root_from_hashes(hashes[:4]), cp.root_hash, list(cons.path))
    assert json.loads(ents.entries[0])["kind"] == "measurement_registered"


def test_lost_checkpoint_is_resigned_but_injected_entries_are_not(tmp_path):
    log = _filled(tmp_path, 5)
    root5 = log.checkpoint().root
    log.close()
    # A crash after the record's fsync but before its checkpoint line reached the disk:
    lines = (tmp_path / CHECKPOINTS).read_text().splitlines(keepends=True)
    (tmp_path / CHECKPOINTS).write_text("".join(lines[:-1]))
    again = AuditLog(tmp_path, KEY)
    assert again.size == 5 and again.checkpoint().size == 5 and again.checkpoint().root == root5
    again.close()
    # Someone with disk access appends a well-formed record (correct leaf hash, no valid MAC):
    body = _ev(99).encode()
    with open(tmp_path / ENTRIES, "ab") as f:
        f.write(struct.pack(">I", len(body)) + body + merkle.leaf_hash(body) + bytes(32))
    with pytest.raises(TamperError, match="MAC"):
        AuditLog(tmp_path, KEY)


def test_concurrent_appends_share_fsyncs_and_stay_consistent(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    log = AuditLog(tmp_path, KEY)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: log.append(_ev(i)), range(64)))
    assert sorted(i for i, _ in results) == list(range(64))
    for i, cp in results:
        assert cp.size > i  # every append returns a checkpoint that covers it
        cp.verify(KEY.public_key())
        merkle.verify_inclusion(merkle.leaf_hash(log.entries(i, i + 1)[0]), i, cp.size, log.inclusion(i, cp.size), cp.root)
    log.close()
    assert AuditLog(tmp_path, KEY).size == 64
    assert audit_cli.main(["verify", "--log", str(tmp_path), "--public-key", str(_pem(tmp_path))]) == 0
