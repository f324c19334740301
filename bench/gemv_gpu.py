"""Batch-1 GEMV (services/inference/engine/gemv.py) against cuBLAS on Llama-3.1-8B layer shapes.

    PYTHONPATH=. python3 bench/gemv_gpu.py            # H100/H200: tile sweep, check, per-step estimate
    PYTHONPATH=. python3 bench/gemv_gpu.py --smoke    # CPU, Triton interpreter, tiny shapes

Each timing is one CUDA graph of 32 calls cycling over copies of the weight (together > 256 MB, so
nothing is L2 resident, as in a model; bench/triton_ops_gpu.graph_us), in us per call; bandwidth = weight bytes / time. Prints a
JSON line per shape (best tile config, cuBLAS, ratio, error vs an fp32 reference) and a last line
with the per-decode-step sums (32 layers + lm_head) at TP=1 and TP=2 shard shapes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

LAYERS = 32
SHAPES = {          # name -> (M, K) of one rank's weight, Llama-3.1-8B
    "tp1.qkv": (6144, 4096), "tp1.o": (4096, 4096), "tp1.gate_up": (28672, 4096), "tp1.down": (4096, 14336),
    "tp1.lm_head": (128256, 4096),
    "tp2.qkv": (3072, 4096), "tp2.o": (4096, 2048), "tp2.gate_up": (14336, 4096), "tp2.down": (4096, 7168),
    "tp2.lm_head": (64128, 4096),
}
GRID = {"block_m": (4, 8, 16, 32), "block_k": (256, 512, 1024), "num_warps": (4, 8), "num_stages": (1, 3)}


def main(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from bench.triton_ops_gpu import graph_us
    from services.inference.engine import gemv as G

    if args.smoke:
        x, w = torch.randn(1, 96), torch.randn(40, 96)
        err = (G.gemv(x, w, block_m=16, block_k=64) - x @ w.t()).abs().max().item()
        print(json.dumps({"name": "gemv.smoke", "max_abs_err": err}))
        return 0 if err < 1e-4 else 1
    dev = torch.device("cuda")
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(0)
    best_us, cublas_us, failures = {}, {}, 0
    for name, (m, k) in SHAPES.items():
        nbytes = m * k * 2
        copies = max(4, math.ceil((256 << 20) / nbytes))
        ws = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, m, device=dev, dtype=torch.bfloat16)
        ref = (x.float() @ ws[0].float().t())
        cublas = graph_us([lambda w=w: torch.mm(x, w.t(), out=out) for w in ws], dev)
        rows = []
        for bm, bk, nw, ns in itertools.product(*GRID.values()):
            try:
                us = graph_us([lambda w=w: G.gemv(x, w, out, bm, bk, nw, ns) for w in ws], dev)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                rows.append({"cfg": [bm, bk, nw, ns], "error": repr(exc)[:120]})
                continue
            rows.append({"cfg": [bm, bk, nw, ns], "us": round(us, 2)})
        ok = [r for r in rows if "us" in r]
        best = min(ok, key=lambda r: r["us"])
        default = next((r for r in ok if r["cfg"] == [*G.tile(m, k), G.NUM_STAGES]), None)
        y = G.gemv(x, ws[0], None, *best["cfg"]).float()
        rel = ((y - ref).norm() / ref.norm()).item()
        failures += rel > 1e-2
        best_us[name], cublas_us[name] = best["us"], cublas
        print(json.dumps({"name": f"gemv.{name}", "m": m, "k": k, "best_cfg": best["cfg"], "gemv_us": best["us"],
                          "default_cfg_us": default and default["us"], "cublas_us": round(cublas, 2),
                          "ratio": round(cublas / best["us"], 3), "gemv_gb_s": round(nbytes / best["us"] / 1e3, 1),
                          "cublas_gb_s": round(nbytes / cublas / 1e3, 1), "rel_err": rel,
                          "top5": sorted(ok, key=lambda r: r["us"])[:5], "gpu": gpu}), flush=True)
        del ws
        torch.cuda.empty_cache()
    for tp in ("tp1", "tp2"):
        def step(t):
            return LAYERS * sum(t[f"{tp}.{p}"] for p in ("qkv", "o", "gate_up", "down")) + t[f"{tp}.lm_head"]
        print(json.dumps({"name": f"gemv.{tp}_step_linear_us", "unit": "us", "value": round(step(best_us), 1),
                          "baseline": round(step(cublas_us), 1), "ratio": round(step(cublas_us) / step(best_us), 3),
                          "better": "lower", "gpu": gpu}), flush=True)
    failures += pdl_chain(dev, gpu, graph_us, G)
    print(json.dumps({"name": "gemv.failures", "value": failures}))
    return 1 if failures else 0


def pdl_chain(dev, gpu, graph_us, G) -> int:
    """A TP=2 layer's four GEMVs (down gated: SiLU in its input load) chained 8 layers deep, with
    and without programmatic dependent launch (triton_ops.PDL); plus the gated GEMV's error."""
    import torch

    from services.inference.engine import ops, triton_ops

    shapes = [SHAPES[f"tp2.{p}"] for p in ("qkv", "o", "gate_up", "down")]
    layers = [[torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 0.02 for m, k in shapes] for _ in range(8)]
    xs = [torch.randn(1, k * (2 if i == 3 else 1), device=dev, dtype=torch.bfloat16) for i, (_, k) in enumerate(shapes)]
    outs = [torch.empty(1, m, device=dev, dtype=torch.bfloat16) for m, _ in shapes]

    def layer(ws):
        for i, w in enumerate(ws):
            G.gemv(xs[i], w, outs[i], gated=i == 3)
    res = {}
    for pdl in (False, True):
        triton_ops.PDL = pdl
        res["pdl" if pdl else "plain"] = graph_us([lambda ws=ws: layer(ws) for ws in layers], dev)
    triton_ops.PDL = True
    ref = ops.silu_mul(xs[3], shapes[3][1]).float() @ layers[0][3].float().t()
    rel = ((G.gemv(xs[3], layers[0][3], gated=True).float() - ref).norm() / ref.norm()).item()
    print(json.dumps({"name": "gemv.tp2_layer_pdl_us", "unit": "us", "value": res["pdl"], "baseline": res["plain"],
                      "ratio": round(res["plain"] / res["pdl"], 3), "better": "lower", "gated_rel_err": rel,
                      "gpu": gpu}), flush=True)
    return int(rel > 1e-2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
