"""Sharded checkpoint loading: each rank reads only its own slices of the safetensors files."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn

from services.inference.engine.layers import default_weight_loader


class _CountingSlice:
    """Wraps a safetensors slice and counts the bytes actually read through it."""

    def __init__(self, sl, counter: list[int]):
        self._sl, self._counter = sl, counter

    def get_shape(self):
        return self._sl.get_shape()

    def __getitem__(self, idx):
        t = self._sl[idx]
        self._counter[0] += t.numel() * t.element_size()
        return t


def load_weights(model: nn.Module, folder: str | Path) -> int:
    """Fill every parameter of `model` from the folder's *.safetensors; returns bytes read."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    skip = getattr(model, "skip_checkpoint_tensor", lambda name: False)
    loaded: set[str] = set()
    counter = [0]
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if skip(name):
                    continue
                target, shard_id = name, None
                for src, (dst, sid) in packed.items():
                    if f".{src}." in name:
                        target, shard_id = name.replace(f".{src}.", f".{dst}."), sid
                        break
                param = params.get(target)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter ({target!r})")
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, _CountingSlice(f.get_slice(name), counter), shard_id)
                loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"parameters missing from the checkpoint: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return counter[0]
