"""Rank 0's view of a launched step's greedy tokens, without stalling the host on the device.

On CUDA the argmax [S] is copied to pinned host memory behind an event; `.tokens()` waits for that
event only, so the engine can enqueue the next step first (overlapped decoding) and the GPU never
idles while rank 0 samples, schedules and publishes. Two pinned buffers alternate: a buffer is
reused two steps later, after its previous copy's tokens were read.
"""
from __future__ import annotations

import torch


class _Ready:
    def __init__(self, ids: list[int]):
        self._ids = ids

    def tokens(self) -> list[int]:
        return self._ids


class _Pending:
    def __init__(self, host: torch.Tensor, n: int, event):
        self._host, self._n, self._event = host, n, event

    def tokens(self) -> list[int]:
        self._event.synchronize()
        return self._host[:self._n].tolist()


class StepTokens:
    def __init__(self, device: torch.device):
        self.device = device
        self._ring: list[torch.Tensor] = []
        self._next = 0

    def start(self, ids: torch.Tensor):
        """ids: [S] int64 on the device -> handle with .tokens() -> list[int] of length S."""
        if self.device.type != "cuda":
            return _Ready(ids.tolist())
        n = ids.numel()
        if not self._ring or self._ring[0].numel() < n:
            size = max(n, 128)
            self._ring = [torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        host = self._ring[self._next]
        self._next ^= 1
        host[:n].copy_(ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Pending(host, n, event)
