"""`privlm plan` figures for DeepSeek-R1, checked against a hand computation written out here."""
import json
from math import ceil
from pathlib import Path

import pytest

from privlm.base.config import ConfigError
from services.inference.deepseek.config import DeepseekConfig
from services.inference.deepseek.plan import main, make_plan, parse_bytes

R1 = Path(__file__).resolve().parents[2] / "data" / "deepseek-r1"
GiB = 2**30

# --- hand computation of DeepSeek-R1 (config.json numbers) -------------------------------------
H, V, L, NH = 7168, 129280, 61, 128
QL, KVL, NOPE, ROPE, VD = 1536, 512, 128, 64, 128
I_DENSE, I_MOE, E, K, DENSE_LAYERS = 18432, 2048, 256, 8, 3
MOE_LAYERS = L - DENSE_LAYERS

ATTN_LINEAR = {  # (out, in) of every attention projection, FP8 in the checkpoint
    "q_a": (QL, H), "q_b": (NH * (NOPE + ROPE), QL), "kv_a": (KVL + ROPE, H),
    "kv_b": (NH * (NOPE + VD), KVL), "o": (H, NH * VD)}
ATTN_NORMS = QL + KVL
LAYER_NORMS = 2 * H
EXPERT = 3 * H * I_MOE                       # gate, up, down of one routed or shared expert
DENSE_MLP = 3 * H * I_DENSE
ROUTER = E * H + E                           # gate weight + e_score_correction_bias

ATTN = sum(o * i for o, i in ATTN_LINEAR.values()) + ATTN_NORMS
TOTAL = (2 * V * H + H                      # embed, lm_head, final norm
         + L * (ATTN + LAYER_NORMS)
         + DENSE_LAYERS * DENSE_MLP
         + MOE_LAYERS * ((E + 1) * EXPERT + ROUTER))
ACTIVE = TOTAL - MOE_LAYERS * (E - K) * EXPERT


def test_parameter_counts_match_hand_count_and_published_671b():
    cfg = DeepseekConfig.load(R1)
    p = make_plan(cfg, 8, parse_bytes("80GiB"), "fp8")
    assert ATTN == 187_107_328
    assert p.params_total == TOTAL == 671_026_419_200       # DeepSeek's "671B total"
    assert p.params_active_per_token == ACTIVE
    assert 37.0e9 < ACTIVE < 38.0e9                           # DeepSeek's "37B activated"
    # the stored MTP module adds one MoE layer + its own embed/head + eh_proj: 685B on the hub
    mtp = ATTN + LAYER_NORMS + (E + 1) * EXPERT + ROUTER + 2 * V * H + 3 * H + H * 2 * H
    assert p.params_checkpoint == TOTAL + mtp
    assert 684e9 < p.params_checkpoint < 685e9             # listed as ~685B on the hub


def _fp8_rank_bytes(tp: int, ep: int) -> int:
    """Bytes rank 0 holds: FP8 linears (1 B) + f32 block scales, bf16 embed/head/norms, f32 router."""
    def fp8(o, i):
        return o * i + 4 * ceil(o / 128) * ceil(i / 128)
    attn = (fp8(*ATTN_LINEAR["q_a"]) + fp8(*ATTN_LINEAR["kv_a"])                # replicated
            + fp8(NH * (NOPE + ROPE) // tp, QL) + fp8(NH * (NOPE + VD) // tp, KVL)  # heads split
            + fp8(H, NH * VD // tp) + 2 * (ATTN_NORMS + LAYER_NORMS))
    dense = 2 * fp8(I_DENSE // tp, H) + fp8(H, I_DENSE // tp)
    moe = ((E // ep) * (2 * fp8(I_MOE, H) + fp8(H, I_MOE))                     # own experts
           + 2 * fp8(I_MOE // tp, H) + fp8(H, I_MOE // tp)                     # shared, tp split
           + 4 * ROUTER)
    return L * attn + DENSE_LAYERS * dense + MOE_LAYERS * moe + 2 * 2 * (V // tp) * H + 2 * H


@pytest.mark.parametrize("gpus,mem,fits", [(8, "80GiB", False), (8, "140GiB", True), (4, "80GiB", False)])
def test_fp8_per_rank_weights_kv_and_fit(gpus, mem, fits):
    cfg = DeepseekConfig.load(R1)
    p = make_plan(cfg, gpus, parse_bytes(mem), "fp8")
    assert p.weight_bytes_per_rank == _fp8_rank_bytes(gpus, gpus)
    kv = (KVL + ROPE) * L * 2                                   # bf16 latent + rope key
    assert p.kv_bytes_per_token == kv == 70_272
    assert p.kv_bytes_per_token_non_mla == NH * (NOPE + ROPE + VD) * L * 2 == 4_997_120
    reserve = int(parse_bytes(mem) * 0.10)
    budget = parse_bytes(mem) - reserve - _fp8_rank_bytes(gpus, gpus)
    assert p.max_cached_tokens == max(budget, 0) // kv
    assert p.fits is fits


def test_guide_claim_640gb_is_short_of_r1_fp8_weights():
    """The guide says >= 640 GB of GPU memory holds R1's full parameters; FP8 weights alone are more."""
    cfg = DeepseekConfig.load(R1)
    p = make_plan(cfg, 8, parse_bytes("140GiB"), "fp8")
    fp8_elems = sum(o * i for o, i in ATTN_LINEAR.values()) * L + DENSE_LAYERS * DENSE_MLP \
        + MOE_LAYERS * (E + 1) * EXPERT
    assert p.weight_bytes_total > fp8_elems > 640e9
    assert 670e9 < p.weight_bytes_total < 675e9


def test_bf16_needs_twice_the_memory_and_does_not_fit_8x_h200():
    cfg = DeepseekConfig.load(R1)
    p = make_plan(cfg, 8, parse_bytes("140GiB"), "bf16")
    assert p.weight_bytes_total > 2 * 670e9 - 5e9
    assert not p.fits


def test_cli_prints_json_and_exit_code_reflects_fit(capsys):
    assert main(["--config", str(R1 / "config.json"), "--gpus", "8", "--gpu-mem", "140GiB",
                 "--dtype", "fp8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["max_cached_tokens"] > 5 * 131072
    assert main(["--config", str(R1), "--gpus", "8", "--gpu-mem", "80GiB"]) == 1
    assert "fits: no" in capsys.readouterr().out
    assert main(["--config", str(R1), "--gpus", "6", "--gpu-mem", "80GiB"]) == 2   # 256 % 6 != 0


def test_bad_inputs():
    with pytest.raises(ConfigError):
        parse_bytes("eighty gigs")
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("141GB") == 141 * 10**9


def test_r1_rope_and_softmax_scale_match_transformers():
    """R1's YaRN (factor 40, original 4096, mscale = mscale_all_dim = 1) as transformers computes it."""
    import math

    import torch
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    from services.inference.deepseek.attention import rope_inv_freq

    hf = DeepseekV3Config.from_pretrained(R1)
    cfg = DeepseekConfig.load(R1)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert torch.allclose(rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim), inv_freq, rtol=1e-6, atol=0)
    assert cfg.rope.cos_sin_scale == pytest.approx(attention_factor) == 1.0
    want = yarn_apply_mscale(hf.rope_parameters, (128 + 64) ** -0.5)
    assert cfg.softmax_scale == pytest.approx(want)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_privlm_cli_runs_plan(capsys):
    from privlm.cli import main as cli

    assert cli(["plan", "--config", str(R1), "--gpus", "8", "--gpu-mem", "140GiB"]) == 0
    assert "max cached tokens 710,645" in capsys.readouterr().out
