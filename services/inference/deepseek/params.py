"""Inventory of a DeepSeek-V3 checkpoint's tensors, derived from its config alone.

One list serves both the memory planner (count parameters and bytes per rank without the weights)
and the loader (which slice of which key each rank reads). Names are the checkpoint's own
(`model.layers.L.mlp.experts.E.gate_proj.weight`, as R1 ships and as transformers saves).

How each tensor is placed across ranks (attention tensor parallel, routed experts expert parallel):
  rep     replicated: norms, q_a_proj / kv_a_proj_with_mqa (the low-rank down projections feed every
          head, so each rank needs all of them), the router and its bias
  col     rows split by tp: q_b_proj, kv_b_proj (by heads), dense/shared gate_proj and up_proj
  row     columns split by tp: o_proj, dense/shared down_proj
  vocab   rows split by tp: embed_tokens, lm_head (vocab parallel)
  expert  whole tensor on the one rank that owns expert E (E // (n_routed_experts / ep))
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

from .config import DeepseekConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    split: str            # rep | col | row | vocab | expert
    fp8: bool             # stored as float8_e4m3fn with a weight_scale_inv in FP8 checkpoints
    expert: int = -1      # routed expert id for split == "expert"
    mtp: bool = False     # belongs to the multi-token-prediction module (stored, not served)

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _layer(cfg: DeepseekConfig, i: int, mtp: bool = False) -> list[TensorSpec]:
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    p = f"model.layers.{i}."
    out: list[TensorSpec] = []

    def add(name, shape, split, fp8=True, expert=-1):
        out.append(TensorSpec(p + name, tuple(shape), split, fp8, expert, mtp))

    add("input_layernorm.weight", [H], "rep", False)
    add("post_attention_layernorm.weight", [H], "rep", False)
    a = "self_attn."
    if cfg.q_lora_rank:
        add(a + "q_a_proj.weight", [cfg.q_lora_rank, H], "rep")
        add(a + "q_a_layernorm.weight", [cfg.q_lora_rank], "rep", False)
        add(a + "q_b_proj.weight", [nh * cfg.qk_head_dim, cfg.q_lora_rank], "col")
    else:
        add(a + "q_proj.weight", [nh * cfg.qk_head_dim, H], "col")
    add(a + "kv_a_proj_with_mqa.weight", [cfg.kv_lora_rank + cfg.qk_rope_head_dim, H], "rep")
    add(a + "kv_a_layernorm.weight", [cfg.kv_lora_rank], "rep", False)
    add(a + "kv_b_proj.weight", [nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank], "col")
    add(a + "o_proj.weight", [H, nh * cfg.v_head_dim], "row")
    if cfg.is_moe_layer(i) or mtp:
        I, E = cfg.moe_intermediate_size, cfg.n_routed_experts
        add("mlp.gate.weight", [E, H], "rep", False)
        add("mlp.gate.e_score_correction_bias", [E], "rep", False)
        for e in range(E):
            for n, shape in (("gate_proj", [I, H]), ("up_proj", [I, H]), ("down_proj", [H, I])):
                add(f"mlp.experts.{e}.{n}.weight", shape, "expert", True, e)
        if cfg.n_shared_experts:
            Is = I * cfg.n_shared_experts
            add("mlp.shared_experts.gate_proj.weight", [Is, H], "col")
            add("mlp.shared_experts.up_proj.weight", [Is, H], "col")
            add("mlp.shared_experts.down_proj.weight", [H, Is], "row")
    else:
        I = cfg.intermediate_size
        add("mlp.gate_proj.weight", [I, H], "col")
        add("mlp.up_proj.weight", [I, H], "col")
        add("mlp.down_proj.weight", [H, I], "row")
    return out


def tensor_specs(cfg: DeepseekConfig, include_mtp: bool = False) -> list[TensorSpec]:
    """Every weight of the model (and of the stored MTP modules when include_mtp)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", (V, H), "vocab", False)]
    for i in range(cfg.num_hidden_layers):
        specs += _layer(cfg, i)
    specs.append(TensorSpec("model.norm.weight", (H,), "rep", False))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (V, H), "vocab", False))
    if include_mtp:
        for j in range(cfg.num_nextn_predict_layers):
            i = cfg.num_hidden_layers + j
            p = f"model.layers.{i}."
            specs += _layer(cfg, i, mtp=True)
            specs += [TensorSpec(p + "embed_tokens.weight", (V, H), "vocab", False, mtp=True),
                      TensorSpec(p + "enorm.weight", (H,), "rep", False, mtp=True),
                      TensorSpec(p + "hnorm.weight", (H,), "rep", False, mtp=True),
                      TensorSpec(p + "eh_proj.weight", (H, 2 * H), "rep", True, mtp=True),
                      TensorSpec(p + "shared_head.norm.weight", (H,), "rep", False, mtp=True),
                      TensorSpec(p + "shared_head.head.weight", (V, H), "vocab", False, mtp=True)]
    return specs


def shard_range(n: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's part when n is split in `parts` near-equal contiguous parts."""
    per = ceil(n / parts)
    start = min(rank * per, n)
    return start, min(start + per, n)


def experts_of_rank(cfg: DeepseekConfig, ep: int, rank: int) -> range:
    """Contiguous block of routed experts owned by `rank` (n_routed_experts must divide by ep)."""
    per = cfg.n_routed_experts // ep
    return range(rank * per, (rank + 1) * per)


def rank_shape(spec: TensorSpec, cfg: DeepseekConfig, tp: int, ep: int, rank: int) -> tuple[int, ...] | None:
    """Shape of this tensor on tp rank `rank % tp` / ep rank `rank % ep`; None when not held."""
    s = spec.shape
    if spec.split == "rep":
        return s
    if spec.split in ("col", "vocab"):
        a, b = shard_range(s[0], tp, rank % tp)
        return (b - a,) + s[1:]
    if spec.split == "row":
        a, b = shard_range(s[1], tp, rank % tp)
        return (s[0], b - a)
    if spec.split == "expert":
        return s if spec.expert in experts_of_rank(cfg, ep, rank % ep) else None
    raise ValueError(spec.split)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """weight_scale_inv shape of a 2-D FP8 weight: one float32 per 128x128 block (edges rounded up)."""
    return ceil(shape[0] / block[0]), ceil(shape[1] / block[1])
