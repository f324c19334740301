"""Rotary position embedding with the scaling variants transformers supports (llama3, yarn, linear)."""
from __future__ import annotations

import torch


def inv_freq_and_scale(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq [D/2] and the attention scaling factor, computed exactly as transformers does."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if getattr(hf_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"rope_type {rope_type!r} is not supported (length-dependent frequencies)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv.float(), float(scale)


class RotaryEmbedding:
    """Precomputed cos / sign-folded sin tables so that rotation is roll, two muls and an add."""

    def __init__(self, hf_config, head_dim: int, max_pos: int, dtype, device):
        inv, scale = inv_freq_and_scale(hf_config, head_dim)
        t = torch.arange(max_pos, dtype=torch.float32)
        freqs = torch.outer(t, inv)                               # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                   # [P, D]
        half = head_dim // 2
        cos = emb.cos() * scale
        sin = emb.sin() * scale
        sin[:, :half] = -sin[:, :half]                            # rotate_half's sign, folded in
        self.cos = cos.to(dtype=dtype, device=device)
        self.sin = sin.to(dtype=dtype, device=device)
        self.half = half

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for a step: [N, 1, D] each (computed once per step, shared by all layers)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
