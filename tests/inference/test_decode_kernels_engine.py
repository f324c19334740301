"""The engine with decode_kernels="triton" (triton_ops in pure-decode graph steps, engine/gemv.py for
batch-1 linear layers), run on CPU under
Triton's interpreter through the padded graph path (capture=False): greedy tokens must equal
transformers'. On a GPU the same wiring runs compiled (bench/bench_engine_gpu.py --check)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
from services.inference.config import EngineConfig
from services.inference.engine import create_engine, gemv
from services.inference.engine.cuda_graphs import DecodeGraphs
from privlm.testing.engine import generate
from privlm.testing.tiny_models import build, hf_greedy

calls = {"gemv": 0, "gated": 0}
_gemv = gemv.gemv
def counted(*a, **k):                      # counts the batch-1 GEMV launches (the real kernel runs)
    calls["gemv"] += 1
    calls["gated"] += bool(k.get("gated"))
    return _gemv(*a, **k)
gemv.gemv = counted
prompts = [[1, 17, 99, 23, 5], [1] + list(range(30, 70)), [1, 200, 201]]
out = {}
with tempfile.TemporaryDirectory() as d:
    for kind in ("llama", "qwen2"):
        path = build(kind, Path(d) / kind)
        refs = [hf_greedy(path, p, 12) for p in prompts]
        eng = create_engine(EngineConfig(model=str(path), dtype="float32", threads=1, decode_kernels="triton",
                                         overlap_decode="on"))
        try:
            eng.runner.graphs = DecodeGraphs(eng.runner, capture=False)
            out[kind] = {"alone": [generate(eng, [p], 12)[0] for p in prompts] == refs,
                         "batched": generate(eng, prompts, 12) == refs,
                         "kernel_shapes": [st.kernels for st in eng.runner.graphs.shapes.values()],
                         **calls}
            calls.update(gemv=0, gated=0)
        finally:
            eng.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_engine_with_triton_decode_kernels_equals_transformers():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, p.stderr[-3000:]
    res = json.loads(lines[-1][7:])
    for kind, r in res.items():
        assert r["kernel_shapes"] and all(r["kernel_shapes"]), (kind, r)
        assert r["alone"] and r["batched"], (kind, r)
        assert r["gemv"] > 0 and r["gated"] > 0, (kind, r)   # batch-1 linear layers, SiLU in the down GEMV
