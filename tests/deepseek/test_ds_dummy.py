"""load_format "dummy" for DeepSeek: random FP8 weights with valid block scales (keep_fp8)."""
from __future__ import annotations

import json

import torch
from ds_tiny import build, prompts

from privlm.testing.engine import generate
from services.inference.config import EngineConfig
from services.inference.deepseek.fp8 import FP8, dequant_slice
from services.inference.deepseek.weights import Linear
from services.inference.engine import create_engine


def _fp8_config_folder(tmp_path):
    """A folder with only an FP8 config.json (quantization_config as R1 ships it), no weights."""
    build(tmp_path / "src", seed=3, eos_token_id=None)
    d = json.loads((tmp_path / "src" / "config.json").read_text())
    d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]}
    folder = tmp_path / "fp8cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    return folder


def test_dummy_fp8_weights_have_positive_scales_and_the_engine_runs(tmp_path):
    folder = _fp8_config_folder(tmp_path)
    cfg = EngineConfig(model=str(folder), dtype="bfloat16", load_format="dummy", keep_fp8=True, num_kv_blocks=64,
                       block_size=4, threads=1)
    engine = create_engine(cfg)
    try:
        model = engine.runner.model
        lins = [m for m in model.modules() if isinstance(m, Linear) and m.weight.dtype == FP8]
        assert len(lins) > 20                                   # attention, dense, shared and routed experts
        for m in lins:
            s = m.weight_scale_inv
            assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
            w = dequant_slice(m.weight.data, s.data, dtype=torch.float32)
            assert bool(torch.isfinite(w).all()) and float(w.abs().max()) <= 0.03 and float(w.abs().max()) > 0.005
        moe = next(l.mlp for l in model.model.layers if l.is_moe)
        assert moe.w13.dtype == FP8 and float(moe.w13.float().abs().max()) > 100     # the stacked experts filled
        out = generate(engine, prompts(2, seed=5), 4)
        assert [len(o) for o in out] == [4, 4]
    finally:
        engine.shutdown()


def test_dummy_weights_are_the_same_for_replicated_tensors_of_two_models(tmp_path):
    """Seeded by name: every rank draws the same router and norms (tp ranks must route alike)."""
    from services.inference.deepseek.config import DeepseekConfig
    from services.inference.deepseek.model import DeepseekV3ForCausalLM

    folder = _fp8_config_folder(tmp_path)
    a, b = (DeepseekV3ForCausalLM(DeepseekConfig.load(folder), dtype=torch.bfloat16, keep_fp8=True)
            for _ in range(2))
    a.init_dummy_weights()
    b.init_dummy_weights()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p.float(), q.float()), n
