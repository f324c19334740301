"""DeepSeek-V3 served by the native engine: create_engine(EngineConfig(model=<deepseek folder>))."""
from __future__ import annotations

import pytest
from ds_tiny import build, hf_greedy, prompts

from privlm.testing.engine import generate  # all prompts at once: mixed prefill + decode steps
from services.inference.config import EngineConfig
from services.inference.engine import create_engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds_engine")
    return folder, build(folder, seed=11, eos_token_id=None)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_engine_serves_deepseek_v3_greedy_equal_to_transformers(tiny, tp):
    folder, ref = tiny
    ps = prompts(3, seed=13)
    want = [hf_greedy(ref, p, 10) for p in ps]
    engine = create_engine(EngineConfig(model=str(folder), tp=tp, dtype="float32", max_num_batched_tokens=16,
                                        block_size=4, num_kv_blocks=64, threads=1))
    try:
        assert engine.info.architecture == "DeepseekV3ForCausalLM"
        # 16-token step budget: prompts are prefilled in chunks while others decode
        assert generate(engine, ps, 10) == want
        stats = engine.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total
    finally:
        engine.shutdown()


def test_engine_serves_an_fp8_checkpoint(tmp_path):
    """R1's on-disk format through the engine: FP8 e4m3 + 128x128 weight_scale_inv, dequantized per
    slice at load; tokens equal transformers on the dequantized copy."""
    from transformers import DeepseekV3ForCausalLM

    from services.inference.deepseek.fp8 import dequantize_checkpoint, quantize_checkpoint

    build(tmp_path / "src", seed=23, eos_token_id=None)
    quantize_checkpoint(tmp_path / "src", tmp_path / "fp8")
    ref = DeepseekV3ForCausalLM.from_pretrained(dequantize_checkpoint(tmp_path / "fp8", tmp_path / "deq")).eval()
    ps = prompts(2, seed=29)
    engine = create_engine(EngineConfig(model=str(tmp_path / "fp8"), dtype="float32", num_kv_blocks=64,
                                        block_size=4, threads=1))
    try:
        assert generate(engine, ps, 8) == [hf_greedy(ref, p, 8) for p in ps]
    finally:
        engine.shutdown()


def test_engine_stats_report_expert_load_and_fp8_mode(tmp_path):
    """keep_fp8 through the engine (EngineConfig.keep_fp8): on CPU weight-only FP8, reported as
    fp8_tensor_core_fraction 0; tokens equal transformers on the dequantized copy; after the
    requests the stats carry the expert load of every routed token."""
    from transformers import DeepseekV3ForCausalLM

    from services.inference.deepseek.fp8 import dequantize_checkpoint, quantize_checkpoint

    build(tmp_path / "src", seed=37, eos_token_id=None)
    quantize_checkpoint(tmp_path / "src", tmp_path / "fp8")
    ref = DeepseekV3ForCausalLM.from_pretrained(dequantize_checkpoint(tmp_path / "fp8", tmp_path / "deq")).eval()
    ps = prompts(2, seed=43)
    engine = create_engine(EngineConfig(model=str(tmp_path / "fp8"), dtype="float32", num_kv_blocks=64,
                                        block_size=4, threads=1, keep_fp8=True))
    try:
        assert "tokens_routed" not in engine.stats().extra            # no step yet
        assert generate(engine, ps, 6) == [hf_greedy(ref, p, 6) for p in ps]
        ex = engine.stats().extra
        assert ex["fp8_tensor_core_fraction"] == 0.0                   # CPU: dequantized per call
        fed = sum(len(p) + 6 - 1 for p in ps)                          # prompt + generated but the last
        assert ex["tokens_routed"] == fed * 2 * 3                      # top-2, 3 MoE layers
        assert ex["expert_max_over_mean"] >= 1.0 and ex["rank_max_over_mean"] == 1.0
    finally:
        engine.shutdown()
