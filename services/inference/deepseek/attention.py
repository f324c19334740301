"""Multi-head latent attention (MLA) with a latent-only paged cache and weight absorption on decode.

Per token the cache holds c_kv (kv_lora_rank, after kv_a_layernorm) and the rotated rope key
(qk_rope_head_dim, shared by all heads): 576 values for R1 instead of 128 heads x (192 + 128).

Prefill (any query longer than 1 token) expands the cached latent through kv_b_proj into per-head
K_nope and V and runs ordinary causal attention. Decode absorbs kv_b_proj into the query and output:
    score = (q_nope W_UK) . c_kv + q_rope . k_rope        (W_UK: [heads, nope, kv_lora])
    out   = (softmax(score) c_kv) W_UV^T                  (W_UV: [heads, v, kv_lora])
so decode reads only the latent cache and never builds per-head K/V.
Heads are split across tensor-parallel ranks; o_proj is row parallel (the caller all-reduces).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekConfig, RopeConfig


def _param(*shape: int, dtype=torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(r: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2]; YaRN blends interpolated and extrapolated ones (as transformers)."""
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if r.kind != "yarn":
        return 1.0 / pos_freqs

    def corr_dim(rot: float) -> float:
        return dim * math.log(r.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = corr_dim(r.beta_fast), corr_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    return (1.0 / (r.factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x: [N, ..., d]; cos/sin: [N, d/2] broadcast over the middle dims.

    interleave (DeepSeek's layout): pairs (x0, x1), (x2, x3)... rotate together and come out
    de-interleaved (evens then odds), exactly as transformers' apply_rotary_pos_emb_interleave; q and
    k get the same permutation so their dot product is unchanged.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class SeqChunk:
    """One sequence's share of a step: tokens [q_start, q_start + q_len) of the flat batch.

    ctx_len counts the sequence's tokens in the cache after this step (earlier ones + these);
    slots[t] is the flat cache slot of the sequence's token t, t < ctx_len.
    """
    q_start: int
    q_len: int
    ctx_len: int
    slots: torch.Tensor          # [ctx_len] int64


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekConfig, tp_rank: int, tp: int, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.h = cfg.num_attention_heads // tp            # local heads
        self.h0 = tp_rank * self.h
        H, qk = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = _param(cfg.q_lora_rank, H, dtype=dtype)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype)
            self.q_b_proj = _param(self.h * qk, cfg.q_lora_rank, dtype=dtype)
        else:
            self.q_proj = _param(self.h * qk, H, dtype=dtype)
        self.kv_a_proj_with_mqa = _param(cfg.kv_lora_rank + cfg.qk_rope_head_dim, H, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, dtype)
        self.kv_b_proj = _param(self.h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, dtype=dtype)
        self.o_proj = _param(H, self.h * cfg.v_head_dim, dtype=dtype)
        self.scale = cfg.softmax_scale

    def load(self, read, prefix: str) -> None:
        c, h0, h = self.cfg, self.h0, self.h
        qk, kvd = c.qk_head_dim, c.qk_nope_head_dim + c.v_head_dim
        if c.q_lora_rank:
            self.q_a_proj.copy_(read(prefix + "q_a_proj.weight"))
            self.q_a_layernorm.weight.copy_(read(prefix + "q_a_layernorm.weight"))
            self.q_b_proj.copy_(read(prefix + "q_b_proj.weight", rows=(h0 * qk, (h0 + h) * qk)))
        else:
            self.q_proj.copy_(read(prefix + "q_proj.weight", rows=(h0 * qk, (h0 + h) * qk)))
        self.kv_a_proj_with_mqa.copy_(read(prefix + "kv_a_proj_with_mqa.weight"))
        self.kv_a_layernorm.weight.copy_(read(prefix + "kv_a_layernorm.weight"))
        self.kv_b_proj.copy_(read(prefix + "kv_b_proj.weight", rows=(h0 * kvd, (h0 + h) * kvd)))
        self.o_proj.copy_(read(prefix + "o_proj.weight", cols=(h0 * c.v_head_dim, (h0 + h) * c.v_head_dim)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: list[SeqChunk],
                slot_mapping: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """x: [N, H]; cos/sin: [N, rope/2]; slot_mapping: [N]; cache: [slots, kv_lora + rope].

        Returns this rank's partial o_proj output [N, H] (sum over ranks = attention output).
        """
        c = self.cfg
        N = x.shape[0]
        nope, rope, kvl = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        if c.q_lora_rank:
            q = F.linear(self.q_a_layernorm(F.linear(x, self.q_a_proj)), self.q_b_proj)
        else:
            q = F.linear(x, self.q_proj)
        q = q.view(N, self.h, c.qk_head_dim)                                  # [N, h, nope+rope]
        q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin, c.rope_interleave)
        ckv = F.linear(x, self.kv_a_proj_with_mqa)                            # [N, kvl + rope]
        latent = self.kv_a_layernorm(ckv[:, :kvl])                            # [N, kvl]
        k_rope = apply_rope(ckv[:, kvl:], cos, sin, c.rope_interleave)        # [N, rope]
        cache[slot_mapping] = torch.cat([latent, k_rope], dim=-1).to(cache.dtype)

        w_kv = self.kv_b_proj.view(self.h, nope + c.v_head_dim, kvl)          # [h, nope+v, kvl]
        if all(s.q_len == 1 for s in seqs):
            out = self._decode(q_nope, q_rope, seqs, cache, w_kv)
        else:
            out = torch.cat([self._prefill(q_nope[s.q_start:s.q_start + s.q_len],
                                           q_rope[s.q_start:s.q_start + s.q_len], s, cache, w_kv)
                             for s in seqs])
        return F.linear(out.reshape(N, self.h * c.v_head_dim), self.o_proj)

    def _prefill(self, q_nope, q_rope, s: SeqChunk, cache, w_kv) -> torch.Tensor:
        """q_*: [T, h, *] -> [T, h, v]; K/V expanded from the latent of the whole context."""
        c = self.cfg
        nope, kvl = c.qk_nope_head_dim, c.kv_lora_rank
        lat = cache[s.slots[:s.ctx_len]].to(q_nope.dtype)                     # [C, kvl + rope]
        kv = torch.einsum("ck,hdk->hcd", lat[:, :kvl], w_kv)                  # [h, C, nope+v]
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k_rope = lat[:, kvl:].unsqueeze(0).expand(self.h, -1, -1)             # [h, C, rope]
        k = torch.cat([k_nope, k_rope], dim=-1)                               # [h, C, qk]
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(0, 1)               # [h, T, qk]
        T, C = q.shape[1], k.shape[1]
        qpos = torch.arange(C - T, C).unsqueeze(1)
        mask = torch.arange(C).unsqueeze(0) <= qpos                           # [T, C]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [h, T, v]
        return o.transpose(0, 1)

    def _decode(self, q_nope, q_rope, seqs: list[SeqChunk], cache, w_kv) -> torch.Tensor:
        """One query per sequence, absorbed weights: q_nope [B, h, nope] -> [B, h, v]."""
        c = self.cfg
        nope, kvl = c.qk_nope_head_dim, c.kv_lora_rank
        B, T = len(seqs), max(s.ctx_len for s in seqs)
        idx = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, s in enumerate(seqs):
            idx[b, :s.ctx_len] = s.slots[:s.ctx_len]
            valid[b, :s.ctx_len] = True
        lat = cache[idx].to(q_nope.dtype)                                     # [B, T, kvl + rope]
        c_kv, k_rope = lat[..., :kvl], lat[..., kvl:]
        q_lat = torch.einsum("bhn,hnk->bhk", q_nope, w_kv[:, :nope])          # [B, h, kvl]
        scores = (torch.einsum("bhk,btk->bht", q_lat, c_kv)
                  + torch.einsum("bhr,btr->bht", q_rope, k_rope)) * self.scale  # [B, h, T]
        scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
        p = scores.softmax(-1).to(c_kv.dtype)
        o_lat = torch.einsum("bht,btk->bhk", p, c_kv)                         # [B, h, kvl]
        return torch.einsum("bhk,hvk->bhv", o_lat, w_kv[:, nope:])            # [B, h, v]
