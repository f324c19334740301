"""The fused CPU decode (one C++ call per batch-1 step) is bit-identical to the per-op Python path:
the same logits at every step, fp32 and bf16, on the default model and a tiny Qwen2 (q/k/v biases)."""
from __future__ import annotations

import pytest
import torch

from services.inference.config import EngineConfig
from services.inference.engine.comm import Comm
from services.inference.engine.cpu_decode import extension
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.scheduler import Chunk, StepPlan

pytestmark = pytest.mark.skipif(extension() is None, reason="no C++ toolchain to build the extension")


def _logits(runner, prompt, steps):
    """Prefill, then `steps` greedy decode steps; returns the logits of every decode step."""
    blocks = tuple(range(8))
    out = []
    logits = runner.execute(StepPlan((Chunk(0, tuple(prompt), 0, blocks, True),), 0))
    pos = len(prompt)
    for _ in range(steps):
        tok = int(logits[-1].argmax())
        logits = runner.execute(StepPlan((Chunk(0, (tok,), pos, blocks, True),), 1))
        out.append(logits.clone())
        pos += 1
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_equals_python_path(default_model, dtype):
    runner = ModelRunner(EngineConfig(model=str(default_model), dtype=dtype, threads=1, num_kv_blocks=16), Comm())
    assert runner.model.fused_decode is not None
    prompt = [1, 504, 3458, 282, 253, 1345, 30]
    fused = _logits(runner, prompt, 6)
    runner.model.fused_decode = None
    plain = _logits(runner, prompt, 6)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_batched_decode_equals_python_path(default_model, dtype):
    """Several sequences with interleaved (non-contiguous) blocks: the block-gather path."""
    runner = ModelRunner(EngineConfig(model=str(default_model), dtype=dtype, threads=1, num_kv_blocks=64), Comm())
    prompts = [[1, 504, 3458, 282], [1, 77, 88, 99, 100, 101, 102], [1, 9]]
    tables = [tuple(range(k, 48, 3)) for k in range(3)]                     # interleaved blocks

    def run():
        outs, toks, pos = [], [], []
        for i, p in enumerate(prompts):
            lg = runner.execute(StepPlan((Chunk(i, tuple(p), 0, tables[i], True),), 0))
            toks.append(int(lg[-1].argmax()))
            pos.append(len(p))
        for _ in range(5):
            plan = StepPlan(tuple(Chunk(i, (toks[i],), pos[i], tables[i], True) for i in range(3)), 3)
            lg = runner.execute(plan)
            outs.append(lg.clone())
            toks = [int(t) for t in lg.argmax(-1)]
            pos = [x + 1 for x in pos]
        return outs

    fused = run()
    runner.model.fused_decode, keep = None, runner.model.fused_decode
    plain = run()
    assert keep is not None and all(torch.equal(a, b) for a, b in zip(fused, plain))


def test_fused_with_qkv_bias(tmp_path):
    from tests.inference.tiny_models import build

    path = build("qwen2", tmp_path / "qwen2")
    runner = ModelRunner(EngineConfig(model=str(path), dtype="float32", threads=1, num_kv_blocks=16), Comm())
    assert runner.model.fused_decode is not None and runner.model.model.layers[0].self_attn.qkv_proj.bias is not None
    fused = _logits(runner, [1, 5, 9, 33], 5)
    runner.model.fused_decode = None
    assert all(torch.equal(a, b) for a, b in zip(fused, _logits(runner, [1, 5, 9, 33], 5)))


def test_disabled_by_config(default_model):
    cfg = EngineConfig(model=str(default_model), dtype="float32", threads=1, num_kv_blocks=4, cpu_fused_decode=False)
    assert ModelRunner(cfg, Comm()).model.fused_decode is None


def test_stale_build_lock_is_cleared(tmp_path):
    import os
    import time

    from services.inference.engine.cpu_decode import _clear_stale_lock

    lock = tmp_path / "lock"
    lock.write_text("")
    _clear_stale_lock(lock)
    assert lock.exists()                                   # fresh: another build may hold it
    old = time.time() - 3600
    os.utime(lock, (old, old))
    _clear_stale_lock(lock)
    assert not lock.exists()
