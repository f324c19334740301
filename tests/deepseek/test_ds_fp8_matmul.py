"""keep_fp8 matmul: activation 1x128 quantization, the reference FP8 GEMM, the kernel's scale layouts
(emulated on CPU), mode selection (tensor cores only on CUDA, never for unaligned tp slices).

The real kernel (torch scaled_mm on an H100) is checked against fp8_block_matmul_reference by
bench/gpu_deepseek_check.py; here everything runs on CPU."""
from __future__ import annotations

import pytest
import torch
from ds_tiny import build, hf_greedy, prompts
from transformers import DeepseekV3ForCausalLM

from services.inference.deepseek.fp8 import (
    FP8,
    FP8_MAX,
    dequant_slice,
    dequantize_checkpoint,
    quantize_block,
    quantize_checkpoint,
)
from services.inference.deepseek.fp8_matmul import (
    TENSOR_CORE,
    WEIGHT_ONLY,
    Backend,
    blockwise_linear,
    dequant_act_1x128,
    fp8_block_matmul_reference,
    prepare_weight,
    probe,
    quantize_act_1x128,
)
from services.inference.deepseek.generate import greedy
from services.inference.deepseek.model import DeepseekV3ForCausalLM as DeepseekV3
from services.inference.deepseek.weights import Linear

E4M3_REL = 2.0 ** -4          # round to nearest with 3 mantissa bits: half an ulp of a normal
E4M3_SUB = 2.0 ** -9          # absolute step of subnormals, in scaled units


def test_activation_quantization_round_trip():
    torch.manual_seed(0)
    x = torch.randn(5, 300) * torch.logspace(-4, 2, 300)              # groups of very different scale
    x[2] = 0.0                                                         # an all-zero token
    q, s = quantize_act_1x128(x)
    assert q.dtype == FP8 and q.shape == (5, 384) and s.shape == (5, 3) and s.dtype == torch.float32
    groups = torch.nn.functional.pad(x, (0, 84)).view(5, 3, 128)
    amax = groups.abs().amax(-1)
    assert torch.allclose(s[amax > 0], amax[amax > 0] / FP8_MAX)       # scale = amax / 448
    qf = q.float().view(5, 3, 128)
    assert torch.equal(qf.abs().amax(-1)[amax > 0], torch.full_like(amax[amax > 0], FP8_MAX))  # amax -> 448
    assert (q.float()[2] == 0).all() and (q.float()[:, 300:] == 0).all()   # zero token and padding stay 0
    back = dequant_act_1x128(q, s, 300)
    bound = x.abs() * E4M3_REL + s.repeat_interleave(128, 1)[:, :300] * E4M3_SUB
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert (back - x).abs().max() > 0


@pytest.mark.parametrize("M,N,K", [(7, 256, 512), (3, 200, 300), (1, 48, 64)])
def test_reference_matmul_vs_dequantized_fp32(M, N, K):
    """The reference differs from x @ dequant(W)^T only by the activation's e4m3 rounding:
    |y_ref - y| <= sum_k (2^-4 |x_k| + s_g 2^-9) |w_k|  (+ float32 accumulation slack)."""
    torch.manual_seed(M)
    x = torch.randn(2, M, K)
    wq, ws = quantize_block(torch.randn(N, K) * 0.05)
    w = dequant_slice(wq, ws)                                           # [N, K] float32
    exact = x @ w.t()                                                   # [2, M, N]
    ref = fp8_block_matmul_reference(x, wq, ws)
    assert ref.shape == (2, M, N) and ref.dtype == torch.float32
    _, s = quantize_act_1x128(x.reshape(-1, K))
    per_elem = (x.reshape(-1, K).abs() * E4M3_REL + s.repeat_interleave(128, 1)[:, :K] * E4M3_SUB)
    bound = (per_elem @ w.abs().t()).view(2, M, N) + 1e-5 * (x.abs() @ w.abs().t())
    err = (ref - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0                                                # the activation was quantized
    # typical size: about 2% of the output's spread for random data (bound is the worst case)
    assert err.max() / exact.abs().max() < 0.05


@pytest.mark.parametrize("pad_l4,m_align", [(True, 1), (True, 16), (False, 4)])
@pytest.mark.parametrize("N,K", [(256, 384), (48, 256), (200, 300), (256, 1024)])
def test_kernel_layouts_emulated(N, K, pad_l4, m_align):
    """prepare_weight + blockwise_linear build exactly the operands the blockwise GEMM documents
    (outer-dim-major activation scales, L4-padded transposed weight scales, padded M/N/K); the CPU
    emulation of the kernel's contract then equals the reference up to bf16 output rounding."""
    torch.manual_seed(N + K)
    be = Backend("emulate", pad_l4, m_align)
    wq, ws = quantize_block(torch.randn(N, K) * 0.05)
    w, sb = prepare_weight(wq, ws, be)
    L = -(-K // 128)
    assert w.shape == (-(-N // 16) * 16, L * 128) and w.is_contiguous()
    assert sb.shape == ((-(-L // 4) * 4) if pad_l4 else L, -(-N // 128)) and sb.stride(0) == 1
    assert (sb[L:] == 0).all()
    x = torch.randn(5, K, dtype=torch.bfloat16)
    y = blockwise_linear(x, w, sb, N, be, torch.float32)
    ref = fp8_block_matmul_reference(x, wq, ws)
    assert y.shape == (5, N)
    assert ((y - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()       # bf16 output rounding only


def test_mode_cpu_is_weight_only_and_unaligned_tp_slice_never_tensor_core():
    lin = Linear(256, 256, torch.bfloat16, "cpu", block=(128, 128), keep_fp8=True)
    assert lin.fp8_mode == WEIGHT_ONLY and "cpu" in lin.fp8_reason
    assert probe("cpu")[0] is None
    # rows 96..192 of a [330, 256] weight: its scales straddle the kernel's 128-row blocks, so this
    # slice is dequantized per call (documented choice), on any device, with the reason stated
    part = Linear(96, 256, torch.float32, "cpu", rows=(96, 192), block=(128, 128), keep_fp8=True)
    assert part.fp8_mode == WEIGHT_ONLY and "not on a 128x128 block boundary" in part.fp8_reason
    col = Linear(256, 64, torch.float32, "cpu", cols=(64, 128), block=(128, 128), keep_fp8=True)
    assert "column 64" in col.fp8_reason
    # and it computes that slice right: same as the whole weight's rows
    torch.manual_seed(3)
    full = torch.randn(330, 256)
    wq, ws = quantize_block(full)
    part.weight.weight_loader(part.weight, wq)
    part.weight_scale_inv.weight_loader(part.weight_scale_inv, ws)
    x = torch.randn(4, 256)
    assert torch.allclose(part(x), x @ dequant_slice(wq, ws)[96:192].t(), atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def fp8_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8mm")
    build(tmp / "src", seed=4)
    quantize_checkpoint(tmp / "src", tmp / "fp8")
    dequantize_checkpoint(tmp / "fp8", tmp / "deq")
    return tmp / "fp8", tmp / "deq"


def test_keep_fp8_on_cpu_says_weight_only_and_matches_dequantized_model(fp8_folders):
    """On CPU keep_fp8 is weight-only FP8 and the model says so; greedy tokens equal transformers'
    generate() on the dequantized checkpoint in fp32 (same weights, dequantized per call)."""
    fp8, deq = fp8_folders
    model = DeepseekV3.from_pretrained(fp8, keep_fp8=True)
    assert model.fp8_matmul == WEIGHT_ONLY and model.fp8_matmul != TENSOR_CORE
    assert model.fp8_tensor_core_fraction == 0.0
    assert model.engine_stats()["fp8_tensor_core_fraction"] == 0.0
    assert all("cpu" in k or "absorbed" in k for k in model.fp8_linears), model.fp8_linears
    # 4 layers x (q_a, q_b, kv_a, kv_b, o) + dense (3) + 3 MoE x (8 experts + shared) x 3
    assert sum(model.fp8_linears.values()) == 4 * 5 + 3 + 3 * 9 * 3
    reference = DeepseekV3ForCausalLM.from_pretrained(deq).eval()
    ps = prompts(2, seed=41)
    assert greedy(model, ps, 8) == [hf_greedy(reference, p, 8) for p in ps]
    plain = DeepseekV3.from_pretrained(fp8)
    assert plain.fp8_matmul is None and "fp8_tensor_core_fraction" not in plain.engine_stats()


def test_published_expert_load_is_a_snapshot(fp8_folders):
    """engine_stats() reads the copy published after each forward, never the live counters."""
    fp8, _ = fp8_folders
    model = DeepseekV3.from_pretrained(fp8)
    assert "tokens_routed" not in model.engine_stats()                 # nothing published before a step
    greedy(model, [[1, 2, 3, 4, 5]], 3)                                # 5 prefill + 2 decode tokens fed
    st = model.engine_stats()
    assert st["tokens_routed"] == 7 * 2 * 3                            # tokens x top-2 x 3 MoE layers
    assert st["expert_max_over_mean"] >= 1.0 and st["rank_max_over_mean"] == 1.0   # one rank
    snap = model._published_load
    model.model.layers[1].mlp.tokens_per_expert += 100                 # live counters move ...
    assert model.engine_stats()["tokens_routed"] == 42 and torch.equal(snap, model._published_load)


@pytest.mark.parametrize("keep", [False, True])
def test_masked_moe_equals_loop(fp8_folders, keep):
    """The capturable MoE path (every local expert, weighted by the routing) gives the loop's output
    up to fp32 GEMM blocking (the GEMMs see all rows instead of the routed ones): it is what a CUDA
    graph captures for FP8 (keep_fp8) and fp32 experts."""
    from ds_tiny import forward_last, set_moe_impl

    fp8, _ = fp8_folders
    model = DeepseekV3.from_pretrained(fp8, keep_fp8=keep)
    ids = torch.tensor(prompts(1, seed=47)[0])
    want = forward_last(model, ids)
    set_moe_impl(model, "masked")
    got = forward_last(model, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5) and not torch.equal(got, torch.zeros_like(got))


def test_gpu_check_script_smoke(capsys):
    """bench/gpu_deepseek_check.py --smoke: every part runs on CPU (kernel emulated, engine on CPU,
    2 gloo ranks) and passes, so the GPU run fails only for GPU reasons."""
    import json
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.gpu_deepseek_check import main

    threads = torch.get_num_threads()
    try:
        rc = main(["--smoke", "--new", "8"])
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    summary = lines[-1]
    assert summary["part"] == "summary" and rc == 0, summary
    assert set(summary["verdicts"]) >= {"env", "a_scaled_mm", "b_tiny_float32", "b_tiny_bfloat16", "b_engine_float32",
                                        "b_engine_bfloat16", "c_fp8", "c_engine", "c_engine_tp2"}
    fp32 = next(x for x in lines if x["part"] == "b_tiny_float32")
    assert all(fp32["tokens_equal"]) and fp32["router_topk_sets_differing"] == 0
