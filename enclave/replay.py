"""Replay protection for sealed requests: a time window plus a memory of the enc values seen in it.

Every sealed request has a fresh ephemeral key (enc), so a repeated enc is a replay. Requests
outside the window are refused by timestamp, so the memory only has to span the window.
"""
from __future__ import annotations

import hashlib
import threading
import time

from enclave.hpke import SealError


class ReplayGuard:
    def __init__(self, window_s: float, max_entries: int = 1_000_000):
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._seen: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def check_and_remember(self, enc: bytes, sent_at_ms: int, now_ms: int | None = None) -> None:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now_ms - sent_at_ms) > self.window_ms:
            raise SealError("stale_request", "sealed request timestamp is outside the replay window")
        key = hashlib.sha256(enc).digest()
        with self._lock:
            if len(self._seen) >= self.max_entries:
                self._prune(now_ms)
                if len(self._seen) >= self.max_entries:
                    raise SealError("replay_cache_full", "too many sealed requests in the replay window")
            if key in self._seen:
                raise SealError("replayed", "sealed request was already used")
            self._seen[key] = sent_at_ms + self.window_ms

    def _prune(self, now_ms: int) -> None:
        for k in [k for k, exp in self._seen.items() if exp < now_ms]:
            del self._seen[k]
