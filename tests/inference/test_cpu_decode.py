"""The fused CPU decode (one C++ call per decode step) against the per-op Python path, on the default
model and a tiny Qwen2 (q/k/v biases): with the ATen ops (loops off) the logits are bit-identical
at every step, fp32 and bf16, batch 1 and batched; at batch 1 the loops (the default) give the
same logits up to fp32 summation order (fp32: 1e-5 relative, same greedy tokens; bf16: rounding-level)
and really replace the small ops (no attention matmul in the profile)."""
from __future__ import annotations

import pytest
import torch

from services.inference.config import EngineConfig
from services.inference.engine.comm import Comm
from services.inference.engine.cpu_decode import extension
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.scheduler import Chunk, StepPlan

pytestmark = pytest.mark.skipif(extension() is None, reason="no C++ toolchain to build the extension")


def _logits(runner, prompt, steps, tokens=None):
    """Prefill, then `steps` decode steps fed greedy tokens (or `tokens`, to compare two paths on the
    same inputs); returns (logits of every decode step, tokens fed)."""
    blocks = tuple(range(8))
    out, fed = [], []
    logits = runner.execute(StepPlan((Chunk(0, tuple(prompt), 0, blocks, True),), 0))
    pos = len(prompt)
    for i in range(steps):
        tok = tokens[i] if tokens else int(logits[-1].float().argmax())
        fed.append(tok)
        logits = runner.execute(StepPlan((Chunk(0, (tok,), pos, blocks, True),), 1))
        out.append(logits.clone())
        pos += 1
    return out, fed


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_equals_python_path(default_model, dtype):
    runner = ModelRunner(EngineConfig(model=str(default_model), dtype=dtype, threads=1, num_kv_blocks=16), Comm())
    fd = runner.model.fused_decode
    assert fd is not None and fd.loops
    prompt = [1, 504, 3458, 282, 253, 1345, 30]
    fast, fast_tokens = _logits(runner, prompt, 6)
    fd.loops = False
    aten, _ = _logits(runner, prompt, 6)
    runner.model.fused_decode = None
    plain, plain_tokens = _logits(runner, prompt, 6)
    for a, b in zip(aten, plain):
        assert torch.equal(a, b)
    runner.model.fused_decode, fd.loops = fd, True
    fast_same_inputs, _ = _logits(runner, prompt, 6, plain_tokens)
    for a, b in zip(fast_same_inputs, plain):
        assert _rel(a, b) < (1e-5 if dtype == "float32" else 3e-2)
    if dtype == "float32":
        assert fast_tokens == plain_tokens


def test_batch1_loops_replace_the_small_ops(default_model):
    from torch.profiler import ProfilerActivity, profile

    runner = ModelRunner(EngineConfig(model=str(default_model), dtype="bfloat16", threads=1, num_kv_blocks=16), Comm())
    fd = runner.model.fused_decode
    blocks, names = tuple(range(8)), {}
    runner.execute(StepPlan((Chunk(0, (1, 504, 3458, 282), 0, blocks, True),), 0))     # prefill: Python path
    for pos, fast in ((4, True), (5, False)):
        fd.loops = fast
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.execute(StepPlan((Chunk(0, (30,), pos, blocks, True),), 1))
        names[fast] = {e.key for e in prof.key_averages()}
    assert "aten::bmm" in names[False] and "aten::softmax" in names[False]
    assert not {"aten::bmm", "aten::softmax", "aten::index_copy_", "aten::silu"} & names[True]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_batched_decode_equals_python_path(default_model, dtype):
    """Several sequences with interleaved (non-contiguous) blocks: the block-gather path."""
    runner = ModelRunner(EngineConfig(model=str(default_model), dtype=dtype, threads=1, num_kv_blocks=64), Comm())
    prompts = [[1, 504, 3458, 282], [1, 77, 88, 99, 100, 101, 102], [1, 9]]
    tables = [tuple(range(k, 48, 3)) for k in range(3)]                     # interleaved blocks

    def run(fed=None):
        """Logits of 5 batched steps, each fed the previous step's greedy tokens, or fed[step]."""
        outs, toks, pos, used = [], [], [], []
        for i, p in enumerate(prompts):
            lg = runner.execute(StepPlan((Chunk(i, tuple(p), 0, tables[i], True),), 0))
            toks.append(int(lg[-1].float().argmax()))
            pos.append(len(p))
        for step in range(5):
            toks = fed[step] if fed else toks
            used.append(toks)
            plan = StepPlan(tuple(Chunk(i, (toks[i],), pos[i], tables[i], True) for i in range(3)), 3)
            lg = runner.execute(plan)
            outs.append(lg.clone())
            toks = [int(t) for t in lg.float().argmax(-1)]
            pos = [x + 1 for x in pos]
        return outs, used

    keep = runner.model.fused_decode
    assert keep is not None and keep.loops
    keep.loops = False
    aten, _ = run()                    # batched, the ATen ops in C++: bit-identical to Python
    runner.model.fused_decode = None
    plain, fed = run()
    runner.model.fused_decode, keep.loops = keep, True
    fast, _ = run(fed)                 # bf16 with AVX512-BF16: attention in place (same inputs as plain)
    assert all(torch.equal(a, b) for a, b in zip(aten, plain))
    if dtype == "float32" or not keep.ext.has_paged_attention():
        assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    else:                              # fp32 scores/probabilities instead of bf16-rounded ones
        assert all(_rel(a, b) < 3e-2 for a, b in zip(fast, plain))


def test_batched_bf16_attention_reads_the_context_in_place(default_model):
    from torch.profiler import ProfilerActivity, profile

    runner = ModelRunner(EngineConfig(model=str(default_model), dtype="bfloat16", threads=2, num_kv_blocks=64), Comm())
    fd = runner.model.fused_decode
    if not fd.ext.has_paged_attention():
        pytest.skip("this CPU has no AVX512-BF16: batched attention keeps the gather + bmm")
    tables = [tuple(range(k, 48, 3)) for k in range(3)]
    prompts = [[1, 504 + i, 3458, 282] + list(range(40, 40 + 20 * i)) for i in range(3)]   # 4, 24, 44 tokens
    for i, p in enumerate(prompts):
        runner.execute(StepPlan((Chunk(i, tuple(p), 0, tables[i], True),), 0))
    plan = StepPlan(tuple(Chunk(i, (30,), len(p), tables[i], True) for i, p in enumerate(prompts)), 3)
    counts, logits = {}, {}
    for fast in (True, False):
        fd.loops = fast
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            logits[fast] = runner.execute(plan)
        counts[fast] = {e.key: e.count for e in prof.key_averages()}
    layers = len(runner.model.model.layers)
    assert counts[True]["privlm::attention_blocks_bf16"] == layers
    assert counts[False]["aten::bmm"] == 2 * layers and "aten::bmm" not in counts[True]
    # one context gather per layer gone (the embedding and RoPE tables keep theirs)
    assert counts[False]["aten::index_select"] - counts[True].get("aten::index_select", 0) == layers
    assert _rel(logits[True], logits[False]) < 3e-2


def test_fused_with_qkv_bias(tmp_path):
    from privlm.testing.tiny_models import build

    path = build("qwen2", tmp_path / "qwen2")
    runner = ModelRunner(EngineConfig(model=str(path), dtype="float32", threads=1, num_kv_blocks=16), Comm())
    assert runner.model.fused_decode is not None and runner.model.model.layers[0].self_attn.qkv_proj.bias is not None
    fd = runner.model.fused_decode
    fast, fast_tokens = _logits(runner, [1, 5, 9, 33], 5)
    fd.loops = False
    aten, _ = _logits(runner, [1, 5, 9, 33], 5)
    runner.model.fused_decode = None
    plain, plain_tokens = _logits(runner, [1, 5, 9, 33], 5)
    assert all(torch.equal(a, b) for a, b in zip(aten, plain))
    assert fast_tokens == plain_tokens and all(_rel(a, b) < 1e-5 for a, b in zip(fast, plain))


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
