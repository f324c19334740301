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

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.engine.attention import AttnMetadata

from . import mla_triton, norm_triton
from .config import DeepseekConfig, RopeConfig
from .fp8 import FP8
from .weights import Linear, sharded_param


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device=None):
        super().__init__()
        self.weight = sharded_param((dim,), dtype, device)
        self.weight.data.fill_(1.0)
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


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekConfig, tp_rank: int, tp: int, dtype, device=None, kernels: bool = False):
        """kernels: decode steps that carry a block table (the engine's CUDA-graph steps) run
        mla_triton.mla_decode, and linears take the decode GEMVs (weights.Linear)."""
        super().__init__()
        self.cfg = cfg
        self.h = cfg.num_attention_heads // tp            # local heads
        h0, h = tp_rank * self.h, self.h
        H, qk, kvl = cfg.hidden_size, cfg.qk_head_dim, cfg.kv_lora_rank
        kvd = cfg.qk_nope_head_dim + cfg.v_head_dim
        b = cfg.fp8_block

        def lin(o, i, rows=None, cols=None, tensor_core=True):
            return Linear(o, i, dtype, device, rows, cols, b, cfg.keep_fp8, tensor_core, kernels)
        if cfg.q_lora_rank:
            self.q_a_proj = lin(cfg.q_lora_rank, H)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype, device)
            self.q_b_proj = lin(h * qk, cfg.q_lora_rank, rows=(h0 * qk, (h0 + h) * qk))
        else:
            self.q_proj = lin(h * qk, H, rows=(h0 * qk, (h0 + h) * qk))
        self.kv_a_proj_with_mqa = lin(kvl + cfg.qk_rope_head_dim, H)
        self.kv_a_layernorm = RMSNorm(kvl, 1e-6, dtype, device)
        # read only through dense_weight() (absorbed into q / the output): never an FP8 GEMM
        self.kv_b_proj = lin(h * kvd, kvl, rows=(h0 * kvd, (h0 + h) * kvd), tensor_core=False)
        self.o_proj = lin(H, h * cfg.v_head_dim, cols=(h0 * cfg.v_head_dim, (h0 + h) * cfg.v_head_dim))
        self.scale = cfg.softmax_scale
        self.kernels = kernels and mla_triton.applies(self.h, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, kvl,
                                                      cfg.v_head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        """x: [N, H] laid out decode rows first, then prefill chunks (the engine's AttnMetadata);
        cos/sin: [N, rope/2]; cache: [slots, kv_lora + rope].

        Returns this rank's partial o_proj output [N, H] (sum over ranks = attention output).
        """
        c = self.cfg
        N = x.shape[0]
        nope, kvl = c.qk_nope_head_dim, c.kv_lora_rank
        if self.kernels and meta.decode_table is not None and N == meta.num_decode and not meta.prefills:
            return self.o_proj(self._decode_kernels(x, cos, sin, meta, cache))
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if c.q_lora_rank else self.q_proj(x)
        q = q.view(N, self.h, c.qk_head_dim)                                  # [N, h, nope+rope]
        q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin, c.rope_interleave)
        ckv = self.kv_a_proj_with_mqa(x)                                      # [N, kvl + rope]
        new = torch.cat([self.kv_a_layernorm(ckv[:, :kvl]),
                         apply_rope(ckv[:, kvl:], cos, sin, c.rope_interleave)], dim=-1)  # [N, kvl+rope]
        cache.index_copy_(0, meta.slot_mapping, new.to(cache.dtype))

        w_kv = self.kv_b_proj.dense_weight().view(self.h, nope + c.v_head_dim, kvl)  # [h, nope+v, kvl]
        outs = []
        B = meta.num_decode
        if B:
            outs.append(self._decode(q_nope[:B], q_rope[:B], decode_context(cache, meta), meta.decode_mask, w_kv))
        for p in meta.prefills:
            lat = new[p.q_start:p.q_end] if p.ctx_slots is None else cache[p.ctx_slots]
            outs.append(self._prefill(q_nope[p.q_start:p.q_end], q_rope[p.q_start:p.q_end], lat, p.mask, w_kv))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)                 # [N, h, v]
        return self.o_proj(out.reshape(N, self.h * c.v_head_dim))

    def _decode_kernels(self, x, cos, sin, meta: AttnMetadata, cache) -> torch.Tensor:
        """Pure decode through mla_triton: x [B, H] -> attention output [B, h * v] (cache written)."""
        c = self.cfg
        if c.q_lora_rank:
            qa = self.q_a_proj(x)
            q = self.q_b_proj(norm_triton.rms_norm(qa, self.q_a_layernorm.weight, self.q_a_layernorm.eps))
        else:
            q = self.q_proj(x)                                                # [B, h * (nope + rope)]
        ckv = self.kv_a_proj_with_mqa(x)                                      # [B, kvl + rope]
        w = self.kv_b_proj.weight
        fp8 = w.dtype == FP8
        r0 = (w.rows or (0, 0))[0]
        return mla_triton.mla_decode(
            q, ckv, cos, sin, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cache, meta.slot_mapping,
            meta.decode_table, meta.decode_lens, meta.block_size, w, self.kv_b_proj.weight_scale_inv if fp8 else None,
            r0 % 128, heads=self.h, nope=c.qk_nope_head_dim, rope=c.qk_rope_head_dim, kvl=c.kv_lora_rank,
            v=c.v_head_dim, scale=self.scale, interleave=c.rope_interleave)

    def _prefill(self, q_nope, q_rope, lat, mask, w_kv) -> torch.Tensor:
        """q_*: [T, h, *], lat: [C, kvl + rope] of the context -> [T, h, v]; K/V expanded per head.
        mask: [T, C] bool (None: the chunk is the whole context, causal)."""
        nope, kvl = self.cfg.qk_nope_head_dim, self.cfg.kv_lora_rank
        lat = lat.to(q_nope.dtype)
        kv = torch.einsum("ck,hdk->hcd", lat[:, :kvl], w_kv)                  # [h, C, nope+v]
        k_rope = lat[:, kvl:].unsqueeze(0).expand(self.h, -1, -1)             # [h, C, rope]
        k = torch.cat([kv[..., :nope], k_rope], dim=-1)                       # [h, C, qk]
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(0, 1)               # [h, T, qk]
        o = F.scaled_dot_product_attention(q, k, kv[..., nope:], attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale)                 # [h, T, v]
        return o.transpose(0, 1)

    def _decode(self, q_nope, q_rope, lat, mask, w_kv) -> torch.Tensor:
        """One query per sequence with absorbed weights. q_nope: [B, h, nope], lat: [B, L, kvl+rope],
        mask: [B, 1, 1, L] (bool keep-mask or additive float) or None -> [B, h, v]."""
        nope, kvl = self.cfg.qk_nope_head_dim, self.cfg.kv_lora_rank
        lat = lat.to(q_nope.dtype)
        c_kv, k_rope = lat[..., :kvl], lat[..., kvl:]
        q_lat = torch.einsum("bhn,hnk->bhk", q_nope, w_kv[:, :nope])          # [B, h, kvl]
        scores = (torch.einsum("bhk,btk->bht", q_lat, c_kv)
                  + torch.einsum("bhr,btr->bht", q_rope, k_rope)).float() * self.scale  # [B, h, L]
        if mask is not None:                                                  # [B, 1, 1, L]
            mask = mask[:, 0]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        p = scores.softmax(-1).to(c_kv.dtype)
        o_lat = torch.einsum("bht,btk->bhk", p, c_kv)                         # [B, h, kvl]
        return torch.einsum("bhk,hvk->bhv", o_lat, w_kv[:, nope:])            # [B, h, v]


def decode_context(cache: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
    """Latent context of the decoding sequences [B, L, kv_lora + rope] from the step metadata:
    a contiguous range (one sequence, no gather) or gathered slots ([B, L] or flat [B * L])."""
    rng = getattr(meta, "decode_range", None)
    if rng is not None:
        return cache[rng[0]:rng[1]].unsqueeze(0)
    if meta.decode_slots is None and meta.decode_table is not None:     # a kernel-style step on this path
        p = torch.arange(meta.decode_len, device=cache.device)
        blk = meta.decode_table[:, p // meta.block_size]                 # [B, L]
        valid = p[None, :] < meta.decode_lens[:, None]                   # a padding row: its own slot alone
        slots = torch.where(valid & (blk >= 0), blk * meta.block_size + p % meta.block_size,
                            meta.slot_mapping[:, None])
        meta.decode_mask = torch.zeros(valid.shape, device=cache.device).masked_fill(~valid, float("-inf"))[:, None, None]
        return cache[slots]
    slots = meta.decode_slots
    if slots.dim() == 1:
        slots = slots.view(meta.num_decode, -1)
    return cache[slots]
