"""FP8 block-scaled small-batch matmul (engine/fp8_gemv.py) and the fused MoE (engine/moe_triton.py)
against torch, on CPU under Triton's interpreter (run in a subprocess: TRITON_INTERPRET=1 must be
set before the kernels are defined; the script prints one JSON line of measured errors)."""
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


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _moe_ref(x, lid, rw, w13, w2, sw13, sw2, n_local):
    """The torch MoE arithmetic on dense weights (fp32 reference)."""
    import torch
    import torch.nn.functional as F

    N, k = lid.shape
    out = torch.zeros(N, x.shape[1], dtype=torch.float64)
    I = w2.shape[2] if w2 is not None else 0
    for n in range(N):
        for j in range(k):
            e = int(lid[n, j])
            if e >= n_local:
                continue
            gu = x[n].double() @ w13[e].double().t()
            out[n] += rw[n, j].double() * ((F.silu(gu[:I]) * gu[I:]) @ w2[e].double().t())
        if sw13 is not None:
            Is = sw2.shape[1]
            gu = x[n].double() @ sw13.double().t()
            out[n] += (F.silu(gu[:Is]) * gu[Is:]) @ sw2.double().t()
    return out


def _cases() -> dict:
    import torch

    from services.inference.deepseek.fp8 import dequant_slice, quantize_block
    from services.inference.engine import fp8_gemv, moe_triton

    g = torch.Generator().manual_seed(0)
    out = {}
    for M, N, K, dt in [(1, 200, 300, "float32"), (1, 256, 512, "bfloat16"), (3, 136, 384, "float32"),
                        (20, 64, 256, "bfloat16")]:
        dtype = getattr(torch, dt)
        wq, ws = quantize_block(torch.randn(N, K, generator=g) * 0.05)
        ws = ws * (0.5 + torch.rand(ws.shape, generator=g))              # varied block scales
        x = torch.randn(M, K, generator=g).to(dtype)
        ref = x.double() @ dequant_slice(wq, ws, dtype=torch.float64).t()
        y = fp8_gemv.fp8_linear(x, wq, ws)
        out[f"fp8_{M}x{N}x{K}_{dt}"] = {"rel": _rel(y, ref), "dtype": str(y.dtype), "shape": list(y.shape)}
    for name, (N, E, k, H, I, Is, fp8, dt, rank_frac) in {
            "bf16_n1": (1, 8, 2, 64, 32, 64, False, "bfloat16", 1.0),
            "fp32_n5_elsewhere": (5, 8, 3, 96, 48, 0, False, "float32", 0.6),
            "fp8_n3": (3, 4, 2, 256, 128, 256, True, "float32", 1.0),
            "fp8_n2_bf16": (2, 4, 2, 128, 128, 128, True, "bfloat16", 0.7),
            "shared_only_fp32": (4, 0, 0, 64, 0, 96, False, "float32", 1.0)}.items():
        dtype = getattr(torch, dt)
        x = torch.randn(N, H, generator=g).to(dtype)
        ex = sh = None
        w13 = w2 = sw13 = sw2 = None
        if E:
            w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
            w2 = torch.randn(E, H, I, generator=g) * 0.1
            lid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).to(torch.int32)
            lid[torch.rand(N, k, generator=g) > rank_frac] = E                  # computed on another rank
            rw = torch.rand(N, k, generator=g)
        else:
            lid = rw = None
        if Is:
            sw13 = torch.randn(2 * Is, H, generator=g) * 0.1
            sw2 = torch.randn(H, Is, generator=g) * 0.1
        if fp8:
            def q(w):
                qs = [quantize_block(m) for m in w]
                return (torch.stack([a for a, _ in qs]), torch.stack([b for _, b in qs]),
                        torch.stack([dequant_slice(a, b) for a, b in qs]))
            if E:
                q13, s13, w13 = q(w13)
                q2, s2, w2 = q(w2)
                ex = moe_triton.Experts(q13, q2, s13, s2)
            qs13, ss13, d13 = q(sw13[None])
            qs2, ss2, d2 = q(sw2[None])
            sw13, sw2 = d13[0], d2[0]
            sh = moe_triton.Experts(qs13, qs2, ss13, ss2)
        else:
            if E:
                w13, w2 = w13.to(dtype), w2.to(dtype)
                ex = moe_triton.Experts(w13, w2)
            if Is:
                sw13, sw2 = sw13.to(dtype), sw2.to(dtype)
                sh = moe_triton.Experts(sw13[None], sw2[None])
        ref = _moe_ref(x, lid if lid is not None else torch.zeros(N, 0, dtype=torch.int32),
                       rw if rw is not None else torch.zeros(N, 0), w13, w2, sw13, sw2, E)
        y = moe_triton.fused_moe(x, lid, rw, ex, sh)
        out[f"moe_{name}"] = {"rel": _rel(y, ref), "dtype": str(y.dtype), "applies": moe_triton.applies(x, ex, sh)}
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, p.stderr[-3000:]
    return json.loads(lines[-1][7:])


def test_fp8_linear_matches_dequantized_matmul(results):
    cases = {k: v for k, v in results.items() if k.startswith("fp8_")}
    assert len(cases) == 4
    for name, r in cases.items():
        assert r["rel"] < (1e-5 if "float32" in name else 5e-3), (name, r)   # bf16: input + output roundings
        assert r["dtype"] == ("torch.float32" if "float32" in name else "torch.bfloat16")


def test_fused_moe_matches_torch_experts(results):
    cases = {k: v for k, v in results.items() if k.startswith("moe_")}
    assert len(cases) == 5
    for name, r in cases.items():
        assert r["applies"], name
        assert r["rel"] < (1e-5 if "fp32" in name or ("fp8" in name and "bf16" not in name) else 1.5e-2), (name, r)


if __name__ == "__main__":
    print("RESULT " + json.dumps(_cases()))
