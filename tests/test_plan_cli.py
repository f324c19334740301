"""`privlm plan` as an operator runs it: bad input is exit 2 with one clear line, dense models plan.

Every case is a subprocess of the real CLI. The dense figures are checked against the engine's own
Llama/Qwen2 classes built on the meta device for each tensor-parallel rank (no weights read).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
R1 = ROOT / "data" / "deepseek-r1"


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privlm.cli", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def refused(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stdout == "", res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


@pytest.mark.parametrize("args,words", [
    (["--gpus", "0"], ["--gpus", "positive integer"]),
    (["--gpus", "-8"], ["--gpus", "positive integer"]),
    (["--gpus", "eight"], ["--gpus"]),
    (["--gpus", "8", "--tp", "0"], ["--tp"]),
    (["--gpus", "8", "--ep", "-1"], ["--ep"]),
    (["--gpus", "8", "--context", "0"], ["--context"]),
    (["--gpus", "8", "--reserve", "nan"], ["--reserve"]),
    (["--gpus", "8", "--reserve", "1"], ["--reserve"]),
])
def test_bad_deployment_arguments_exit_2(args, words):
    refused(plan("--config", str(R1), "--gpu-mem", "140GiB", *args), *words)


@pytest.mark.parametrize("mem", ["0GiB", "0", "0.1b", "eighty"])
def test_gpu_memory_must_be_positive(mem):
    refused(plan("--config", str(R1), "--gpus", "8", "--gpu-mem", mem), "--gpu-mem")


def _with_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,words", [
    ('{"architectures": [', ["not valid JSON"]),
    ("[1, 2]", ["expected a JSON object"]),
    ('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}',
     ["'GPT2LMHeadModel'", "LlamaForCausalLM", "DeepseekV3ForCausalLM"]),
    ('{"model_type": "mystery"}', ["no architecture", "'mystery'", "Qwen2ForCausalLM"]),
    ('{"architectures": "LlamaForCausalLM"}', ["architectures must be a list"]),
])
def test_malformed_or_foreign_config_exit_2(tmp_path, text, words):
    refused(plan("--config", str(_with_config(tmp_path, text)), "--gpus", "1", "--gpu-mem", "80GiB"), *words)


def test_missing_or_mistyped_fields_exit_2(tmp_path):
    r1 = json.loads((R1 / "config.json").read_text())
    for field, value in (("hidden_size", None), ("vocab_size", "129280"), ("num_hidden_layers", -1),
                         ("n_routed_experts", 2.5), ("kv_lora_rank", True)):
        d = dict(r1)
        if value is None:
            del d[field]
        else:
            d[field] = value
        refused(plan("--config", str(_with_config(tmp_path, json.dumps(d))), "--gpus", "8", "--gpu-mem", "140GiB"),
                field)
    d = dict(r1, rope_scaling={"type": "yarn", "factor": "forty"})
    refused(plan("--config", str(_with_config(tmp_path, json.dumps(d))), "--gpus", "8", "--gpu-mem", "140GiB"))
    refused(plan("--config", str(tmp_path / "nowhere"), "--gpus", "8", "--gpu-mem", "140GiB"), "no config.json")


def _engine_rank_figures(config: Path, tp: int) -> tuple[int, int]:
    """(largest rank's weight bytes, its KV bytes per token) of the engine's model class, bf16."""
    import torch
    from transformers import AutoConfig

    from services.inference.engine.comm import Comm
    from services.inference.engine.models import model_class

    cfg = AutoConfig.from_pretrained(config)
    weights = kv = 0
    for rank in range(tp):
        model = model_class(cfg.architectures[0])(cfg, Comm(rank, tp), torch.bfloat16, torch.device("meta"), 4096)
        unique = {id(p): p.numel() * p.element_size() for p in model.parameters()}   # tied: counted once
        layers, (two, heads, dim) = model.kv_cache_spec()
        weights, kv = max(weights, sum(unique.values())), max(kv, layers * two * heads * dim * 2)
    return weights, kv


def _dense_configs(tmp_path: Path) -> list[tuple[Path, int]]:
    smol = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
    out = [(smol, 1), (smol, 2)] if (smol / "config.json").exists() else []
    gqa = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1001, "hidden_size": 256,
           "intermediate_size": 700, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
           "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "hidden_act": "silu"}
    qwen = dict(gqa, architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=False, mlp_bias=False,
                tie_word_embeddings=True, num_key_value_heads=4, head_dim=48)
    for name, d in (("gqa", gqa), ("qwen", qwen)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(d))
        out += [(tmp_path / name, 1), (tmp_path / name, 4)]   # 2 KV heads over 4 ranks: replicated
    return out


def test_llama_family_is_planned_as_the_engine_places_it(tmp_path):
    for folder, tp in _dense_configs(tmp_path):
        res = plan("--config", str(folder), "--gpus", str(tp), "--gpu-mem", "1GiB", "--context", "4096", "--json")
        assert res.returncode in (0, 1), res.stderr
        p = json.loads(res.stdout)
        weights, kv = _engine_rank_figures(folder, tp)
        assert (p["weight_bytes_per_rank"], p["kv_bytes_per_token_per_rank"]) == (weights, kv), (folder, tp)
        assert p["architecture"] in ("LlamaForCausalLM", "Qwen2ForCausalLM") and p["dtype"] == "bf16"
        assert p["max_cached_tokens"] == max(p["kv_budget_bytes_per_rank"], 0) // kv
        if tp == 1:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
            assert p["params_total"] == sum(t.numel() for t in hf.parameters())


def test_llama_refusals_name_the_problem(tmp_path):
    smol = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
    if not (smol / "config.json").exists():
        pytest.skip("the embedded model is not prepared (make model)")
    refused(plan("--config", str(smol), "--gpus", "4", "--gpu-mem", "80GiB"), "9 heads / 3 KV heads", "tp=4")
    refused(plan("--config", str(smol), "--gpus", "1", "--gpu-mem", "80GiB", "--dtype", "fp8"), "bf16")
    refused(plan("--config", str(smol), "--gpus", "2", "--gpu-mem", "80GiB", "--ep", "2"), "experts")
    ok = plan("--config", str(smol), "--gpus", "1", "--gpu-mem", "80GiB")
    assert ok.returncode == 0 and "model: LlamaForCausalLM" in ok.stdout and "fits: yes" in ok.stdout, ok.stderr
