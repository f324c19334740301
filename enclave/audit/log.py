"""Crash-safe, append-only persistent Merkle log of audit events.

On disk (one directory):
  entries.bin       records: u32 big-endian length || event bytes || RFC 6962 leaf hash (32 bytes)
  checkpoints.jsonl one signed checkpoint per line, written after each append
Each append is write + fsync of the entry, then sign + write + fsync of the checkpoint, so an
acknowledged event is always covered by a signed checkpoint. On open, an incomplete record or line
after the last checkpoint (a torn tail from a crash) is cut off; anything else that does not match
the signed checkpoints (an edited, deleted or reordered entry) is refused as tampering.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enclave.audit import merkle
from enclave.audit.checkpoint import Checkpoint, CheckpointError
from enclave.audit.events import AuditEvent

log = logging.getLogger("privlm.enclave.audit")
ENTRIES = "entries.bin"
CHECKPOINTS = "checkpoints.jsonl"
MAX_ENTRY = 64 * 1024


class TamperError(RuntimeError):
    """The log on disk disagrees with its own signed checkpoints."""


def read_entries(path: Path) -> tuple[list[bytes], list[bytes], int, bool]:
    """(entries, leaf hashes, bytes of whole records, torn) without repairing anything."""
    data = path.read_bytes() if path.exists() else b""
    entries, hashes, off, torn = [], [], 0, False
    while off < len(data):
        if off + 4 > len(data):
            torn = True
            break
        (n,) = struct.unpack(">I", data[off:off + 4])
        end = off + 4 + n + 32
        if n > MAX_ENTRY or end > len(data):
            torn = True
            break
        body, lh = data[off + 4:off + 4 + n], data[off + 4 + n:end]
        if merkle.leaf_hash(body) != lh:
            # A bad record in the middle is tampering; only the very last record may be torn.
            if end == len(data):
                torn = True
                break
            raise TamperError(f"entry {len(entries)} does not match its stored leaf hash")
        entries.append(body)
        hashes.append(lh)
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
        self.public_key = signing_key.public_key()
        self._lock = threading.Lock()
        self._recover_and_check()

    def _recover_and_check(self) -> None:
        epath, cpath = self.dir / ENTRIES, self.dir / CHECKPOINTS
        entries, hashes, good, torn = read_entries(epath)
        cps, cgood, ctorn = read_checkpoints(cpath)
        check_against_checkpoints(hashes, cps, self.public_key)
        signed_size = cps[-1].size if cps else 0
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
            off += 4 + len(body) + 32
        self._end = off
        self._tree = merkle.Tree()
        for lh in hashes:
            self._tree.append(lh)
        self._checkpoint = cps[-1] if cps else None
        if self._tree.size > signed_size or self._checkpoint is None:
            # Entries written but not yet checkpointed before a crash: they were never
            # acknowledged, but they are intact, so sign them now rather than lose them.
            self._write_checkpoint()

    def _write_checkpoint(self) -> Checkpoint:
        cp = Checkpoint(self.origin, self._tree.size, self._tree.root(), int(time.time() * 1000)).signed(self._key)
        with open(self.dir / CHECKPOINTS, "ab") as f:
            f.write(cp.to_json().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._checkpoint = cp
        return cp

    def append(self, event: AuditEvent) -> tuple[int, Checkpoint]:
        """Persist one event; returns (its leaf index, the signed checkpoint that covers it)."""
        body = event.encode()
        if len(body) > MAX_ENTRY:
            raise ValueError("audit event too large")
        lh = merkle.leaf_hash(body)
        with self._lock:
            new_file = not (self.dir / ENTRIES).exists()
            with open(self.dir / ENTRIES, "ab") as f:
                f.write(struct.pack(">I", len(body)) + body + lh)
                f.flush()
                os.fsync(f.fileno())
            if new_file:
                _fsync_dir(self.dir)
            index = self._tree.size
            self._index.append((self._end + 4, len(body)))
            self._end += 4 + len(body) + 32
            self._tree.append(lh)
            return index, self._write_checkpoint()

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
