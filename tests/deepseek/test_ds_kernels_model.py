"""The DeepSeek decode kernels (route_triton, mla_triton, norm_triton, engine/moe_triton.py and the
GEMVs) against the torch path of the same model, on CPU under Triton's interpreter: one decode
step over a paged cache with scattered blocks, sequences of different lengths and a CUDA-graph
padding row (block table -1), as the engine's graphed steps give it. Runs in a subprocess
(TRITON_INTERPRET=1 must be set before the kernels are defined); prints one JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)


def _step(model, folder_cache, ids, lens, tables, bs):
    """Prefill each sequence through the torch path, then one decode step with a block table."""
    import torch

    from services.inference.deepseek.generate import _prefill_meta
    from services.inference.engine.attention import AttnMetadata

    cache = folder_cache.clone()
    B = len(lens)
    for b in range(B):
        if lens[b] <= 1:
            continue
        n = lens[b] - 1
        pos = torch.arange(n)
        slots = torch.tensor(tables[b])[pos // bs] * bs + pos % bs
        model(torch.tensor(ids[b][:n]), pos, _prefill_meta([0], [n], [slots]), cache)
    nblk = max(len(t) for t in tables)
    table = torch.tensor([t + [-1] * (nblk - len(t)) for t in tables])
    own = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs if t else cache.shape[1] - 1
                        for t, n in zip(tables, lens)])
    meta = AttnMetadata(slot_mapping=own, num_decode=B, decode_len=nblk * bs, block_size=bs, decode_table=table,
                        decode_lens=torch.tensor(lens))
    tok = torch.tensor([s[n - 1] for s, n in zip(ids, lens)])
    hidden = model(tok, torch.tensor(lens) - 1, meta, cache)
    return model.compute_logits(hidden).float(), cache


def _cases() -> dict:
    import torch
    from ds_tiny import build

    from services.inference.deepseek.fp8 import quantize_checkpoint
    from services.inference.deepseek.model import DeepseekV3ForCausalLM as M

    torch.set_num_threads(2)
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build(d / "src", seed=7, eos_token_id=None, q_lora_rank=64, kv_lora_rank=32)
        quantize_checkpoint(d / "src", d / "fp8")
        bs = 4
        g = torch.Generator().manual_seed(3)
        lens = [9, 3, 1]                                     # the last row: graph padding (no blocks)
        tables = [[5, 2, 9], [7], []]
        ids = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lens]
        for name, folder, dt, fp8 in (("fp32", "src", torch.float32, False), ("bf16", "src", torch.bfloat16, False),
                                      ("fp8_fp32", "fp8", torch.float32, True)):
            res = {}
            for kern in (False, True):
                m = M.from_pretrained(d / folder, dtype=dt, keep_fp8=fp8, decode_kernels=kern)
                layers, shape = m.kv_cache_spec()
                cache0 = torch.zeros(layers, 16 * bs, *shape, dtype=dt)
                res[kern] = _step(m, cache0, ids, lens, tables, bs)
                res[f"counts_{kern}"] = int(m.expert_load().sum())      # the padding row may route elsewhere
                if kern:
                    res["fused"] = sum(getattr(x, "fused", None) is not None for x in m.modules())
            (lt, ct), (lk, ck) = res[False], res[True]
            rows = lt[:2]
            ck, ct = ck[:, :-1], ct[:, :-1]   # the padding row's scratch slot: it attends to nothing there
            out[name] = {"logits_rel": float((lk[:2] - rows).abs().max() / rows.abs().max()),
                         "argmax_equal": bool((lk[:2].argmax(-1) == rows.argmax(-1)).all()),
                         "cache_rel": float((ck.float() - ct.float()).abs().max() / ct.float().abs().max()),
                         "finite": bool(torch.isfinite(lk).all()), "fused_modules": res["fused"],
                         "counts_equal": res["counts_False"] == res["counts_True"]}
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}:{HERE}"}
    p = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, p.stderr[-3000:]
    return json.loads(lines[-1][7:])


@pytest.mark.parametrize("name,tol", [("fp32", 1e-4), ("fp8_fp32", 1e-4), ("bf16", 0.1)])
def test_decode_kernels_match_the_torch_path(results, name, tol):
    r = results[name]
    # MoE layers and dense MLPs took the kernels
    assert r["finite"] and r["fused_modules"] >= 4 and r["counts_equal"], r
    assert r["logits_rel"] < tol and r["cache_rel"] < tol, r
    if name != "bf16":                                           # bf16: a random model's near-ties may flip
        assert r["argmax_equal"], r


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print("RESULT " + json.dumps(_cases()))
