"""DeepSeek-V3/R1 model configuration, read from a Hugging Face config.json.

Accepts both spellings of the rope settings: DeepSeek's own `rope_scaling` + `rope_theta` (how R1
ships) and transformers 5's `rope_parameters` (what `save_pretrained` writes today).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlm.base.config import ConfigError

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"                  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    attention_factor: float | None = None  # cos/sin multiplier; None: derived from mscale

    @property
    def cos_sin_scale(self) -> float:
        """YaRN's attention factor applied to cos/sin (1.0 for R1: mscale == mscale_all_dim)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


@dataclass(frozen=True)
class DeepseekConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0       # MTP modules stored in the checkpoint (not served)
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    fp8_block: tuple[int, int] | None = None  # (128, 128) for R1's FP8 checkpoints
    moe_layer_freq: int = 1
    keep_fp8: bool = False                  # serving choice, not from config.json: FP8 weights stay FP8

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (as R1 does)."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.kind == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepseekConfig":
        arch = (d.get("architectures") or ["DeepseekV3ForCausalLM"])[0]
        if d.get("model_type") not in ("deepseek_v3", "deepseek_v2", None) or arch not in ARCHITECTURES:
            raise ConfigError(f"not a DeepSeek-V3 config: model_type={d.get('model_type')!r} arch={arch!r}")
        if d.get("scoring_func", "sigmoid") != "sigmoid" or d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError("only the DeepSeek-V3 router (sigmoid scores, noaux_tc top-k) is supported")
        rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
        kind = rp.get("rope_type") or rp.get("type") or "default"
        theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        if kind not in ("default", "yarn"):
            raise ConfigError(f"unsupported rope type {kind!r} (default and yarn are)")
        rope = RopeConfig(theta=theta, kind=kind)
        if kind == "yarn":
            factor = rp.get("factor")
            omax = int(rp.get("original_max_position_embeddings", 4096))
            rope = RopeConfig(
                theta=theta, kind=kind,
                factor=float(factor if factor is not None else d["max_position_embeddings"] / omax),
                original_max_position_embeddings=omax,
                beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                mscale=float(rp.get("mscale") or 0.0), mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
                truncate=bool(rp.get("truncate", True)),
                attention_factor=rp.get("attention_factor"))
        eos = d.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        q = d.get("quantization_config") or {}
        fp8 = None
        if q:
            if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"unsupported quantization_config {q} (fp8 e4m3 block is)")
            fp8 = tuple(q.get("weight_block_size") or (128, 128))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], moe_intermediate_size=d["moe_intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"], n_routed_experts=d.get("n_routed_experts") or 0,
            n_shared_experts=d.get("n_shared_experts") or 0,
            num_experts_per_tok=d.get("num_experts_per_tok") or 0,
            n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
            first_k_dense_replace=d.get("first_k_dense_replace") or 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d["max_position_embeddings"], rope=rope,
            rope_interleave=bool(d.get("rope_interleave", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=int(d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids, fp8_block=fp8,
            moe_layer_freq=int(d.get("moe_layer_freq", 1) or 1),
        )

    @classmethod
    def load(cls, path: str | Path) -> "DeepseekConfig":
        """`path` is a model folder or a config.json file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

