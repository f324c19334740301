"""Batch-1 GEMV (services/inference/engine/gemv.py) against torch, on CPU under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton defines the kernel, so the cases run in a subprocess
(this file as a script) that prints one JSON line of measured errors; the tests assert on them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)


def _cases() -> dict:
    import torch

    from services.inference.engine import gemv as G
    from services.inference.engine import layers

    g = torch.Generator().manual_seed(0)
    out = {}
    # (m, k, dtype, tile override): even tiles, ragged rows, K not a multiple of the K tile,
    # a "large" shape (m >= LARGE_M picks the other tile), fp32 and bf16.
    for m, k, dt, over in [(64, 128, "float32", None), (37, 100, "float32", None), (48, 96, "bfloat16", (16, 64)),
                           (G.LARGE_M + 5, 40, "float32", None), (40, 300, "bfloat16", (8, 128))]:
        dtype = getattr(torch, dt)
        x = torch.randn(1, k, generator=g).to(dtype)
        w = torch.randn(m, k, generator=g).to(dtype)
        ref = x.double() @ w.double().t()
        y = G.gemv(x, w, None, *(over or ()))
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        out[f"{m}x{k}.{dt}"] = {"rel": rel, "shape": list(y.shape), "dtype": str(y.dtype)}
    # into a slice of a larger buffer (the symmetric-memory paths write there), and the bias add
    buf = torch.full((200,), 7.0)
    x, w, b = torch.randn(1, 32, generator=g), torch.randn(50, 32, generator=g), torch.randn(50, generator=g)
    G.mm_out(x, w, buf[10:60].view(1, 50), True)
    out["out_slice"] = {"err": (buf[10:60] - (x @ w.t())[0]).abs().max().item(),
                        "untouched": bool((buf[:10] == 7).all() and (buf[60:] == 7).all())}
    lin = layers._Linear(50, 32, True, layers.Comm(), torch.float32, "cpu")
    lin.weight.data.copy_(w)
    lin.bias.data.copy_(b)
    lin.gemv = True
    out["bias"] = {"err": (lin(x) - (x @ w.t() + b)).abs().max().item(),
                   "batch2_err": (lin(torch.cat([x, x])) - (torch.cat([x, x]) @ w.t() + b)).abs().max().item()}
    out["applies"] = {"batch2": G.applies(torch.zeros(2, 8), torch.zeros(4, 8)),
                      "dtype": G.applies(torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.bfloat16)),
                      "transposed_w": G.applies(torch.zeros(1, 8), torch.zeros(8, 4).t()),
                      "ok": G.applies(torch.zeros(1, 8), torch.zeros(4, 8))}
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, p.stderr[-3000:]
    return json.loads(lines[-1][7:])


def test_gemv_matches_torch_on_even_ragged_and_large_shapes(results):
    for name, r in results.items():
        if "x" not in name:
            continue
        m = int(name.split("x")[0])
        assert r["shape"] == [1, m], name
        assert r["rel"] < (1e-6 if "float32" in name else 5e-3), (name, r)   # bf16: one output rounding
        assert r["dtype"] == ("torch.float32" if "float32" in name else "torch.bfloat16"), name


def test_gemv_writes_only_its_out_slice_and_linear_adds_bias(results):
    assert results["out_slice"]["err"] < 1e-5 and results["out_slice"]["untouched"]
    assert results["bias"]["err"] < 1e-5 and results["bias"]["batch2_err"] < 1e-5


def test_gemv_applies_only_to_batch1_same_dtype_row_major(results):
    assert results["applies"] == {"batch2": False, "dtype": False, "transposed_w": False, "ok": True}


if __name__ == "__main__":
    print("RESULT " + json.dumps(_cases()))
