"""Model registry: Hugging Face `architectures[0]` -> model class.

A model class is built as cls(hf_config, comm, dtype, device, max_pos) and provides:
  packed_modules_mapping            checkpoint sub-name -> (fused parameter sub-name, shard id)
  kv_cache_spec() -> (layers, per-slot shape)   sizes the cache (bytes per block)
  allocate_kv_cache(slots, dtype, device)        optional: the cache tensor, first dim = layers
                                                 (default: zeros [layers, slots, *per-slot shape])
  forward(input_ids [N], positions [N], meta: AttnMetadata, caches) -> hidden [N, H]
  compute_logits(hidden [S, H]) -> logits [S, vocab] on rank 0 (None on other ranks)
  skip_checkpoint_tensor(name) -> bool
Parameters carry `weight_loader(param, safetensors_slice, shard_id)` (see engine/layers.py).
"""
from __future__ import annotations

from services.inference.engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM

MODELS: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}
from services.inference.deepseek.model import DeepseekV3ForCausalLM  # noqa: E402 (owned by services/inference/deepseek)

MODELS["DeepseekV3ForCausalLM"] = DeepseekV3ForCausalLM


def register(architecture: str, cls: type) -> None:
    MODELS[architecture] = cls


def model_class(architecture: str) -> type:
    try:
        return MODELS[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(MODELS)}") from None
