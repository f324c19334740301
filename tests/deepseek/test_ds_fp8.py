"""FP8 e4m3 128x128 block weights: quantizer, per-slice dequantization, FP8 checkpoint loading."""
from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from ds_tiny import build, ep_worker, forward_last, hf_greedy, prompts
from safetensors import safe_open
from transformers import DeepseekV3ForCausalLM

from services.inference.deepseek.fp8 import FP8, dequant_slice, dequantize_checkpoint, quantize_block, quantize_checkpoint
from services.inference.deepseek.generate import greedy
from services.inference.deepseek.model import DeepseekV3ForCausalLM as DeepseekV3


def test_block_quantization_error_within_e4m3_precision():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)             # columns of very different scale
    q, s = quantize_block(w)
    assert q.dtype == FP8 and s.shape == (3, 2) and s.dtype == torch.float32
    back = dequant_slice(q, s)
    block_scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normals; subnormals (below
    # 2^-6 in scaled units) have an absolute step of 2^-9 in scaled units
    assert ((back - w).abs() <= w.abs() * 2**-4 + block_scale * 2**-9).all()
    assert (back - w).abs().max() > 0                                   # it did quantize


def test_unaligned_slices_dequantize_like_the_whole_tensor():
    torch.manual_seed(1)
    w = torch.randn(330, 270)
    q, s = quantize_block(w)
    full = dequant_slice(q, s)
    for r0, r1, c0, c1 in [(96, 192, 0, 270), (0, 330, 135, 270), (130, 131, 5, 260), (250, 330, 129, 257)]:
        sr, sc = slice(r0 // 128, -(-r1 // 128)), slice(c0 // 128, -(-c1 // 128))
        part = dequant_slice(q[r0:r1, c0:c1], s[sr, sc], r0, c0)
        assert torch.equal(part, full[r0:r1, c0:c1])


def _fp8_folders(tmp_path):
    src, fp8, deq = tmp_path / "fp32", tmp_path / "fp8", tmp_path / "deq"
    orig = build(src, seed=4)
    quantize_checkpoint(src, fp8)
    dequantize_checkpoint(fp8, deq)
    return orig, src, fp8, deq


def test_fp8_checkpoint_has_r1_layout_and_loads_like_its_dequantized_reference(tmp_path):
    orig, src, fp8, deq = _fp8_folders(tmp_path)
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:
        kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
        assert f.get_slice(kv_a).get_dtype() == "F8_E4M3"
        assert f.get_slice(kv_a + "_scale_inv").get_shape() == [1, 2]            # [48, 256] -> 1 x 2 blocks
        assert f.get_slice("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv").get_shape() == [2, 1]
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"  # router not quantized
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    model = DeepseekV3.from_pretrained(fp8)
    reference = DeepseekV3ForCausalLM.from_pretrained(deq).eval()
    ps = prompts(3, seed=7)
    ids = torch.tensor(ps[0])
    with torch.no_grad():
        want = reference(ids[None]).logits[0, -1]
        exact = orig(ids[None]).logits[0, -1]
    got = forward_last(model, ids)
    # FP8 load == dequantized reference up to fp32 rounding (same weights, same math)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)
    assert greedy(model, ps, 8) == [hf_greedy(reference, p, 8) for p in ps]
    # vs the unquantized model (information, not the tolerance of the load): e4m3 rounding
    # (<= 6.25% per weight) moves this 4-layer random model's logits by ~8% of their spread
    rel = (got - exact).abs().max() / (exact.max() - exact.min())
    assert 0 < rel < 0.15, rel
    # stored bytes: FP8 linears take 1/4 of the fp32 ones, and the loader reads them as such
    assert (fp8 / "model.safetensors").stat().st_size < 0.45 * (src / "model.safetensors").stat().st_size
    assert model.weight_bytes_read < 0.45 * DeepseekV3.from_pretrained(src).weight_bytes_read


def test_fp8_weights_can_stay_fp8_in_memory(tmp_path):
    """keep_fp8: linear weights stay float8 (1 byte) and are dequantized per call; same tokens."""
    _, _, fp8, deq = _fp8_folders(tmp_path)
    reference = DeepseekV3ForCausalLM.from_pretrained(deq).eval()
    kept = DeepseekV3.from_pretrained(fp8, keep_fp8=True)
    loaded = DeepseekV3.from_pretrained(fp8)
    assert kept.model.layers[2].mlp.w13.dtype == FP8
    assert kept.model.layers[0].self_attn.q_b_proj.weight.dtype == FP8
    ps = prompts(2, seed=31)
    assert greedy(kept, ps, 8) == [hf_greedy(reference, p, 8) for p in ps]
    ids = torch.tensor(ps[0])
    assert torch.allclose(forward_last(kept, ids), forward_last(loaded, ids), atol=1e-5, rtol=1e-5)
    # linears at 1 byte + block scales vs 4 bytes: the tiny model's fp32 embeddings/norms remain
    assert kept.weight_bytes() < 0.45 * loaded.weight_bytes()


@pytest.mark.slow
def test_fp8_checkpoint_two_ranks_unaligned_tp_slices(tmp_path):
    """At 2 ranks q_b_proj/kv_b_proj split at row 96/128 and dense MLP columns at 256: block scales
    are sliced with an offset. Weights stay FP8 in memory (keep_fp8), so every matmul dequantizes
    the rank's slice with offset scales; tokens still equal the dequantized reference's generate()."""
    _, _, fp8, deq = _fp8_folders(tmp_path)
    reference = DeepseekV3ForCausalLM.from_pretrained(deq).eval()
    ps = prompts(2, seed=9)
    mp.start_processes(ep_worker, args=(2, str(tmp_path / "store"), str(fp8), ps, 8, str(tmp_path), "loop", True),
                       nprocs=2, join=True, start_method="spawn")
    want = [hf_greedy(reference, p, 8) for p in ps]
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt")["tokens"] == want


def test_plan_byte_accounting_equals_what_the_loader_holds(tmp_path):
    """`privlm plan`'s per-rank bytes are those of the real model: FP8 kept (keep_fp8) and bf16."""
    from services.inference.deepseek.config import DeepseekConfig
    from services.inference.deepseek.plan import make_plan

    _, _, fp8, _ = _fp8_folders(tmp_path)
    cfg = DeepseekConfig.load(fp8)
    for keep, dtype in ((True, "fp8"), (False, "bf16")):
        model = DeepseekV3.from_pretrained(fp8, dtype=torch.bfloat16, keep_fp8=keep)
        assert model.weight_bytes() == make_plan(cfg, 1, 2**30, dtype).weight_bytes_per_rank
