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
    # gated: silu(gate) * up folded into the input load, vs ops.silu_mul then the matmul (eager)
    from services.inference.engine import ops

    for k, dt in ((96, "float32"), (100, "float32"), (128, "bfloat16")):
        dtype = getattr(torch, dt)
        gu = (2 * torch.randn(1, 2 * k, generator=g)).to(dtype)
        w = torch.randn(24, k, generator=g).to(dtype)
        act = ops.silu_mul(gu, k)                                        # [1, K] in the model dtype
        ref = act.double() @ w.double().t()
        y = G.gemv(gu, w, gated=True)
        buf = torch.empty(1, 24, dtype=dtype)
        G.mm_out(gu, w, buf, False, gated=True)                          # the fallback: silu_mul + mm
        out[f"gated_{k}_{dt}"] = {"rel": ((y.double() - ref).norm() / ref.norm()).item(),
                                  "fallback_rel": ((buf.double() - ref).norm() / ref.norm()).item()}
    row = layers.RowParallelLinear(20, 12, False, layers.Comm(), torch.float32, "cpu")
    row.weight.data.copy_(torch.randn(12, 20, generator=g))
    gu = torch.randn(1, 40, generator=g)
    plain = row(ops.silu_mul(gu, 20))
    row.gemv = True
    out["gated_row_linear"] = {"err": (row(gu, gated=True) - plain).abs().max().item(),
                               "batch2_err": (row(torch.cat([gu, gu]), gated=True) - plain.repeat(2, 1)).abs().max().item()}
    out["applies"] = {"gated_ok": G.applies(torch.zeros(1, 16), torch.zeros(4, 8), gated=True),
                      "gated_wrong_k": G.applies(torch.zeros(1, 8), torch.zeros(4, 8), gated=True),
                      "batch2": G.applies(torch.zeros(2, 8), torch.zeros(4, 8)),
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
    assert results["applies"] == {"gated_ok": True, "gated_wrong_k": False, "batch2": False, "dtype": False,
                                  "transposed_w": False, "ok": True}


def test_gated_gemv_applies_silu_mul_like_eager(results):
    for name, r in results.items():
        if name.startswith("gated_") and name != "gated_row_linear":
            tol = 1e-6 if "float32" in name else 5e-3                   # bf16: the output rounding
            assert r["rel"] < tol and r["fallback_rel"] < tol, (name, r)
    r = results["gated_row_linear"]                                     # RowParallelLinear(gu, gated=True)
    assert r["err"] < 1e-5 and r["batch2_err"] < 1e-5


def test_gemv_compiles_for_sm90_with_pdl(tmp_path):
    """The PDL variant's prologue and griddepcontrol instructions, in real sm_90 PTX (no GPU)."""
    from tests.inference.sm90 import compile_json

    got = compile_json(__file__, tmp_path, 300)
    assert got["pdl"]["wait"] == 1 and got["pdl"]["launch"] == 1 and got["plain"]["wait"] == 0
    # the first weight tile is loaded before the wait (its ld.global precedes griddepcontrol.wait)
    assert got["pdl"]["loads_before_wait"] >= 1


def _compile_sm90() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from services.inference.engine import gemv as G

    kern = G._kernel()
    out = {}
    for name, pdl in (("pdl", True), ("plain", False)):
        sig = {n: t for n, t in zip(kern.arg_names, ["*bf16", "*bf16", "*bf16", "i32", "i32", "i32"])}
        const = dict(BLOCK_M=16, BLOCK_K=1024, EVEN=True, GATED=True, ROUND=1, PDL=pdl)
        full = {n: "constexpr" if n in const else sig[n] for n in kern.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
        k = triton.compile(triton.compiler.ASTSource(kern, full, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 8})
        lines = [ln.strip() for ln in k.asm["ptx"].splitlines()]
        wait = [i for i, ln in enumerate(lines) if ln.startswith("griddepcontrol.wait")]
        out[name] = {"wait": len(wait), "launch": sum(ln.startswith("griddepcontrol.launch_dependents") for ln in lines),
                     "loads_before_wait": sum(ln.startswith("ld.global") for ln in lines[:wait[0]]) if wait else 0}
    return out


if __name__ == "__main__":
    print(json.dumps(_compile_sm90()) if sys.argv[1:] == ["--sm90"] else "RESULT " + json.dumps(_cases()))
