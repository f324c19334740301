"""Crash-safe, append-only persistent Merkle log of audit events.

On disk (one directory):
  entries.bin       records: u32 big-endian length || event bytes || RFC 6962 leaf hash (32)
                    || record MAC (32: HMAC-SHA256 under a key derived from the log's signing key)
  checkpoints.jsonl one signed checkpoint per line
An append returns once its record is fsynced (group commit: concurrent appends share one fsync),
then a checkpoint covering it is signed and written. A crash can lose only that checkpoint line:
on reopen, intact records after the last checkpoint are re-signed *only if their MACs verify*, so
nothing written to the file by anyone but the log's key holder is ever signed. An incomplete record
or line at the end (a torn tail) is cut; anything else that disagrees with the signed checkpoints
or the MACs (an edited, deleted, injected or reordered entry) is refused as tampering.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enclave.audit import merkle
from enclave.audit.checkpoint import Checkpoint, CheckpointError
from enclave.audit.events import AuditEvent

log = logging.getLogger("privlm.enclave.audit")
ENTRIES = "entries.bin"
TRAILER = 64  # leaf hash + record MAC
CHECKPOINTS = "checkpoints.jsonl"
MAX_ENTRY = 64 * 1024


class TamperError(RuntimeError):
    """The log on disk disagrees with its own signed checkpoints."""


def record_mac(key: bytes, index: int, lh: bytes) -> bytes:
    return hmac.new(key, index.to_bytes(8, "big") + lh, hashlib.sha256).digest()


def mac_key(signing_key: Ed25519PrivateKey) -> bytes:
    raw = signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    return hashlib.sha256(b"privlm-audit-record-mac-v1\x00" + raw).digest()


def read_entries(path: Path, macs: list[bytes] | None = None) -> tuple[list[bytes], list[bytes], int, bool]:
    """(entries, leaf hashes, bytes of whole records, torn) without repairing anything.

    `macs`, if given, receives each record's MAC (checked by the key holder, not offline).
    """
    data = path.read_bytes() if path.exists() else b""
    entries, hashes, off, torn = [], [], 0, False
    while off < len(data):
        if off + 4 > len(data):
            torn = True
            break
        (n,) = struct.unpack(">I", data[off:off + 4])
        end = off + 4 + n + TRAILER
        if n > MAX_ENTRY or end > len(data):
            torn = True
            break
        body, lh = data[off + 4:off + 4 + n], data[off + 4 + n:off + 4 + n + 32]
        if merkle.leaf_hash(body) != lh:
            # A bad record in the middle is tampering; only the very last record may be torn.
            if end == len(data):
                torn = True
                break
            raise TamperError(f"entry {len(entries)} does not match its stored leaf hash")
        entries.append(body)
        hashes.append(lh)
        if macs is not None:
            macs.append(data[end - 32:end])
        off = end
    return entries, hashes, off, torn


def read_checkpoints(path: Path) -> tuple[list[Checkpoint], int, bool]:
    text = path.read_bytes() if path.exists() else b""
    cps, good = [], 0
    for line in text.split(b"\n")[:-1]:  # the last piece is "" or a torn, unterminated line
        cps.append(Checkpoint.from_json(line.decode()))
        good += len(line) + 1
    return cps, good, good != len(text)


def check_against_checkpoints(hashes: list[bytes], cps: list[Checkpoint], pub: Ed25519PublicKey) -> None:
    """Every checkpoint is validly signed and its root is the root of that prefix of entries."""
    by_size: dict[int, list[Checkpoint]] = {}
    for cp in cps:
        cp.verify(pub)
        if cp.size > len(hashes):
            raise TamperError(f"signed checkpoint covers {cp.size} entries but only {len(hashes)} "
                              "are on disk: entries were deleted")
        by_size.setdefault(cp.size, []).append(cp)
    rng = merkle.CompactRange()
    for want in by_size.get(0, []):
        if want.root != merkle.EMPTY_ROOT:
            raise TamperError("checkpoint of size 0 has a non-empty root")
    for i, lh in enumerate(hashes):
        rng.append(lh)
        for cp in by_size.get(i + 1, []):
            if cp.root != rng.root():
                raise TamperError(f"entries 0..{i} do not hash to the signed root of size {i + 1}: "
                                  "an entry was edited, deleted or reordered")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """The live log. Thread-safe; `append` blocks on fsync, so call it off the event loop."""

    def __init__(self, directory: str | Path, signing_key: Ed25519PrivateKey, origin: str = "privlm-audit"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.origin = origin
        self._key = signing_key
        self._mac_key = mac_key(signing_key)
        self.public_key = signing_key.public_key()
        self._lock = threading.Lock()        # file appends and in-memory state
        self._sync_lock = threading.Lock()   # one fsync at a time; waiters ride along (group commit)
        self._recover_and_check()

    def _recover_and_check(self) -> None:
        epath, cpath = self.dir / ENTRIES, self.dir / CHECKPOINTS
        macs: list[bytes] = []
        entries, hashes, good, torn = read_entries(epath, macs)
        cps, cgood, ctorn = read_checkpoints(cpath)
        check_against_checkpoints(hashes, cps, self.public_key)
        for i, (lh, mac) in enumerate(zip(hashes, macs)):
            if not hmac.compare_digest(mac, record_mac(self._mac_key, i, lh)):
                raise TamperError(f"entry {i} has no valid record MAC: it was not written by this log")
        if torn:
            log.warning("audit log: cutting a torn record after entry %d (crash during append)", len(entries))
            os.truncate(epath, good)
        if ctorn:
            log.warning("audit log: cutting a torn checkpoint line (crash during append)")
            os.truncate(cpath, cgood)
        # Only (offset, length) per entry stays in memory; entries are read back from disk.
        self._index: list[tuple[int, int]] = []
        off = 0
        for body in entries:
            self._index.append((off + 4, len(body)))
            off += 4 + len(body) + TRAILER
        self._end = self._synced = off
        self._tree = merkle.Tree()
        for lh in hashes:
            self._tree.append(lh)
        self._checkpoint = cps[-1] if cps else None
        self._file = open(epath, "ab")
        if self._checkpoint is None or self._tree.size > self._checkpoint.size:
            # Records made durable just before a crash lost their checkpoint line; their MACs
            # verified above, so they are ours: sign them now rather than lose them.
            self._write_checkpoint(self._tree.size)
            _fsync_dir(self.dir)

    def _write_checkpoint(self, size: int) -> Checkpoint:
        """Sign and append a checkpoint for the first `size` (durable) entries; call under _sync_lock."""
        with self._lock:
            if self._checkpoint is not None and self._checkpoint.size >= size:
                return self._checkpoint
            root = self._tree.root(size)
        cp = Checkpoint(self.origin, size, root, int(time.time() * 1000)).signed(self._key)
        with open(self.dir / CHECKPOINTS, "ab") as f:
            # No fsync: a checkpoint lost in a crash is re-signed from MAC-verified records on reopen.
            f.write(cp.to_json().encode() + b"\n")
        with self._lock:
            self._checkpoint = cp
        return cp

    def append(self, event: AuditEvent) -> tuple[int, Checkpoint]:
        """Persist one event; returns (its leaf index, a signed checkpoint that covers it)."""
        body = event.encode()
        if len(body) > MAX_ENTRY:
            raise ValueError("audit event too large")
        lh = merkle.leaf_hash(body)
        with self._lock:
            index = self._tree.size
            self._file.write(struct.pack(">I", len(body)) + body + lh + record_mac(self._mac_key, index, lh))
            self._file.flush()
            self._index.append((self._end + 4, len(body)))
            self._end += 4 + len(body) + TRAILER
            self._tree.append(lh)
            mine = self._end
        with self._sync_lock:
            with self._lock:
                covered, target, size = self._synced >= mine, self._end, self._tree.size
            if not covered:
                os.fsync(self._file.fileno())  # covers every record written so far (group commit)
                with self._lock:
                    self._synced = max(self._synced, target)
                self._write_checkpoint(size)
            cp = self.checkpoint()
        return index, cp

    def close(self) -> None:
        with self._lock:
            self._file.close()

    @property
    def size(self) -> int:
        return self._tree.size

    def checkpoint(self) -> Checkpoint:
        with self._lock:
            assert self._checkpoint is not None
            return self._checkpoint

    def entries(self, start: int, end: int) -> list[bytes]:
        with self._lock:
            spans = self._index[start:end]
        if not spans:
            return []
        out = []
        with open(self.dir / ENTRIES, "rb") as f:
            for off, n in spans:
                out.append(os.pread(f.fileno(), n, off))
        return out

    def inclusion(self, index: int, size: int) -> list[bytes]:
        with self._lock:
            return self._tree.inclusion(index, size)

    def consistency(self, first: int, second: int) -> list[bytes]:
        with self._lock:
            if second > self._tree.size:
                raise merkle.ProofError(f"tree size {second} is larger than the log ({self._tree.size})")
            if first == second or first == 0:
                return []
            return self._tree.consistency(first, second)


__all__ = ["AuditLog", "TamperError", "CheckpointError", "read_entries", "read_checkpoints",
           "check_against_checkpoints"]
