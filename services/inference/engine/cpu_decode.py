"""CPU decode steps of Llama-family models through one C++ call per step (csrc/decode_cpu.cpp).

The extension runs the same ATen ops in the same order as the Python path, so results are
bit-identical (tests/inference/test_cpu_decode.py checks it); it removes ~2 us of interpreter
overhead from each of ~240 ops of a step. At batch 1, `loops` (default) also replaces the small
ATen calls between a layer's GEMVs with loops: same formulas and roundings, fp32 sums in its own
order, so last-bit differences from the Python path (bounded by the tests, greedy tokens agree).
Batched bf16 steps with `loops` on a CPU with AVX512-BF16 read the paged context in place for
attention instead of gathering it (same kind of last-bit differences). It is built on first use
with the system C++ compiler and -fopenmp (ATen's parallel_for is header code: without the flag it
runs serially) into .cache/torch_extensions (~25 s, once; `make model` does it). Without a compiler, or if the build fails,
the engine logs that and keeps the Python path: only speed differs.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from privlm.base.config import cache_dir

log = logging.getLogger(__name__)
_SRC = Path(__file__).resolve().parent / "csrc" / "decode_cpu.cpp"
_lock = threading.Lock()
_ext: list = []                 # [module or None] once tried


def extension():
    """The compiled module, or None when it cannot be built here (reason logged once)."""
    with _lock:
        if not _ext:
            try:
                from torch.utils.cpp_extension import load

                build = cache_dir() / "torch_extensions" / "privlm_decode_cpu"
                build.mkdir(parents=True, exist_ok=True)
                _clear_stale_lock(build / "lock")
                _ext.append(load(name="privlm_decode_cpu", sources=[str(_SRC)], extra_cflags=["-O3", "-fopenmp"],
                                 extra_ldflags=["-fopenmp"],
                                 build_directory=str(build), verbose=False))
            except Exception as exc:  # noqa: BLE001 - speed only: the Python path stays correct
                log.warning("fused CPU decode unavailable (%s: %s); using the per-op Python path",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                _ext.append(None)
        return _ext[0]


def _clear_stale_lock(lock: Path, max_age_s: float = 600.0) -> None:
    """torch waits forever on a build lock left by a killed build (Ctrl-C, a CI timeout); a build
    takes ~25 s, so a lock older than max_age_s is stale."""
    import time

    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            log.warning("removed a stale extension build lock: %s", lock)
    except FileNotFoundError:
        pass


class FusedDecode:
    """Holds the per-layer weight lists of a LlamaForCausalLM (tp = 1) for the extension's decode()."""

    loops = True         # batch 1: norms, RoPE + KV write, attention, SiLU-mul as loops; batched bf16:
                         # attention in place (AVX512-BF16) (decode_cpu.cpp)

    def __init__(self, model, ext):
        self.ext, self.model = ext, model
        layers = model.model.layers
        lins = [(l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj) for l in layers]
        packed = {m.packed is not None for ls in lins for m in ls}
        if len(packed) != 1:
            raise ValueError("mixed packed/plain linear weights")
        self.packed = packed.pop()
        empty = self.empty = torch.empty(0)

        def w(m):
            return m.packed if self.packed else m.weight

        def b(m):
            return m.bias if m.bias is not None else empty

        self.weights, self.biases = [], []
        for l, (qkv, o, gu, down) in zip(layers, lins):
            self.weights += [l.input_layernorm.weight, w(qkv), w(o), l.post_attention_layernorm.weight, w(gu),
                             w(down)]
            self.biases += [b(qkv), b(o), b(gu), b(down)]
        a = layers[0].self_attn
        self.hq, self.hkv, self.d = a.hq, a.hkv, a.head_dim
        self.inter, self.scale = layers[0].mlp.inter, a.scale
        self.eps = layers[0].input_layernorm.eps

    def can_run(self, input_ids: torch.Tensor, meta) -> bool:
        """Pure decode steps whose context is a slot range (batch 1) or the block-gather layout."""
        return (meta.num_decode == input_ids.shape[0] and not meta.prefills
                and (meta.decode_range is not None or meta.decode_block_rows is not None))

    def __call__(self, input_ids, positions, meta, caches) -> torch.Tensor:
        m = self.model
        cos, sin = m.rope.tables(positions)                                   # [B, 1, D] each
        residual = m.model.embed_tokens(input_ids)                            # [B, H]
        a, e = meta.decode_range or (0, 0)
        blocks = meta.decode_block_rows if meta.decode_range is None else self.empty
        mask = meta.decode_block_mask if meta.decode_range is None else self.empty
        return self.ext.decode(residual, self.weights, self.biases, m.model.norm.weight, cos, sin, caches,
                               meta.slot_mapping, a, e - a, blocks, mask, meta.block_size, self.hq, self.hkv,
                               self.d, self.inter, m.rope.half, self.eps, self.scale, self.packed, self.loops)


if __name__ == "__main__":            # `make model` builds it ahead of the first worker
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("fused CPU decode extension:", "ready" if extension() is not None else "unavailable (Python path)")
