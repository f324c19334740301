"""Tiny random DeepSeek-V3 checkpoints built with transformers' own config class (test helper)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

YARN = {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


def tiny_config(**over) -> DeepseekV3Config:
    kw = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
              num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=64, kv_lora_rank=32,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_group=4, topk_group=2,
              first_k_dense_replace=1, num_mtp_layers=0, rope_parameters=dict(YARN),
              max_position_embeddings=2560, initializer_range=0.05)
    kw.update(over)
    return DeepseekV3Config(**kw)


def build(folder: Path, seed: int = 0, **over) -> DeepseekV3ForCausalLM:
    """Random fp32 model saved to `folder`; router biases are made non-zero so they matter."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(tiny_config(**over)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


def prompts(n: int, vocab: int = 512, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(l),), generator=g).tolist()
            for l in torch.randint(5, 24, (n,), generator=g)]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    # explicit mask: otherwise generate() treats prompt tokens equal to pad_token_id as padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def forward_last(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [V] of the last token of one fresh prompt (rank 0; None elsewhere)."""
    from services.inference.deepseek.generate import _prefill_meta

    T = len(ids)
    layers, shape = model.kv_cache_spec()
    cache = torch.zeros(layers, T, *shape, dtype=model.dtype)
    hidden = model(ids, torch.arange(T), _prefill_meta([0], [T], [torch.arange(T)]), cache)
    logits = model.compute_logits(hidden[-1:])
    return None if logits is None else logits[0]


def set_moe_impl(model, impl: str) -> None:
    for layer in model.model.layers:
        if layer.is_moe:
            layer.mlp.impl = impl


def ep_worker(rank: int, world: int, store: str, folder: str, prompts_: list[list[int]], n: int,
              out_dir: str, impl: str = "loop", keep_fp8: bool = False) -> None:
    """One rank of a real gloo group: load own slices/experts, generate, save results per rank."""
    import torch.distributed as dist

    from services.inference.deepseek.generate import greedy
    from services.inference.deepseek.model import DeepseekV3ForCausalLM, imbalance
    from services.inference.engine.comm import Comm

    torch.set_num_threads(1)
    comm = Comm.create(dist.FileStore(store, world), rank, world, "cpu")
    model = DeepseekV3ForCausalLM.from_pretrained(folder, comm, keep_fp8=keep_fp8)
    set_moe_impl(model, impl)
    tokens = greedy(model, prompts_, n)
    logits = forward_last(model, torch.tensor(prompts_[0]))
    load = model.expert_load()
    torch.save({"tokens": tokens, "logits": logits, "weight_bytes": model.weight_bytes(),
                "bytes_read": model.weight_bytes_read, "experts": sorted(model.held[1]), "held": model.held,
                "computed_pairs": model.computed_pairs(),
                "load": load, "imbalance": imbalance(load, world)}, f"{out_dir}/rank{rank}.pt")
