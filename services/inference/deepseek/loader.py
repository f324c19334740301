"""Reads one rank's slices of a (possibly sharded, possibly FP8) safetensors checkpoint.

Only the rows/columns asked for are read (safetensors get_slice), so a rank never materialises a
tensor it does not hold; FP8 slices are dequantized on CPU with the covering block scales.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .fp8 import FP8, SCALE_SUFFIX, block_range, dequant_slice


class WeightReader:
    def __init__(self, folder: str | Path, block: tuple[int, int] | None = None):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            self._where = {k: self.folder / v for k, v in wm.items()}
        else:
            self._where = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as sf:
                    self._where.update({k: f for k in sf.keys()})
        if not self._where:
            raise FileNotFoundError(f"no safetensors weights in {self.folder}")
        self.block = block or (128, 128)
        self._open: dict[Path, object] = {}
        self.bytes_read = 0          # bytes of stored tensor data this reader handed out

    def _file(self, name: str):
        try:
            path = self._where[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.folder} has no tensor {name!r}") from None
        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path]

    def has(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W[rows[0]:rows[1], cols[0]:cols[1]] (whole dims when None), as `dtype`."""
        sl = self._file(name).get_slice(name)
        shape = sl.get_shape()
        r0, r1 = rows or (0, shape[0])
        if len(shape) == 1:
            t = sl[r0:r1]
            self.bytes_read += t.numel() * t.element_size()
            return t.to(dtype)
        c0, c1 = cols or (0, shape[1])
        t = sl[r0:r1, c0:c1]
        self.bytes_read += t.numel() * t.element_size()
        if t.dtype == FP8:
            b0, b1 = self.block
            sr, sc = block_range(r0, r1, b0), block_range(c0, c1, b1)
            s = self._file(name + SCALE_SUFFIX).get_slice(name + SCALE_SUFFIX)[sr[0]:sr[1], sc[0]:sc[1]]
            self.bytes_read += s.numel() * s.element_size()
            return dequant_slice(t, s, r0, c0, self.block, dtype)
        return t.to(dtype)
