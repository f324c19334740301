"""Tiny random checkpoints built with transformers' own config classes (saved as safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch


def build(kind: str, folder: Path, **overrides) -> Path:
    """kind: 'llama' (untied, 6 heads / 3 KV heads), 'llama_tied_rope' (llama3 rope scaling,
    tied embeddings, odd vocab), 'qwen2' (q/k/v biases)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=16, vocab_size=256, max_position_embeddings=512,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "llama_tied_rope":
        common.update(vocab_size=251)
        cfg = LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def hf_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
