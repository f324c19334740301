"""Paged attention over a flat KV cache in plain torch (SDPA), for mixed decode + prefill steps.

A step's tokens are laid out flat: first one token per decoding sequence, then each prefill
chunk. The KV cache of one layer is [num_slots, 2, kv_heads, head_dim] with slot =
block_id * block_size + offset; `AttnMetadata` carries the slot indices so that every layer reuses
the same index tensors (built once per step by the runner).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.inference.engine import ops


@dataclass
class PrefillMeta:
    q_start: int                          # row range of this chunk in the flat token layout
    q_end: int
    start_pos: int                        # position of the chunk's first token
    ctx_slots: torch.Tensor | None        # [L] slots of positions 0..start_pos+T-1 (None if start_pos == 0)
    mask: torch.Tensor | None             # [T, L] bool, True = may attend (None if start_pos == 0)


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor            # [N] slot of each new token
    num_decode: int = 0
    decode_len: int = 0                        # Lmax: longest decoding context
    decode_slots: torch.Tensor | None = None   # [B * Lmax] slots of each decoding sequence's context
    decode_range: tuple[int, int] | None = None  # B == 1 with contiguous slots: cache[a:b], no gather
    decode_mask: torch.Tensor | None = None    # [B, 1, 1, Lmax] additive float mask (0 / -inf), None
                                               # when all lengths are equal
    prefills: list[PrefillMeta] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # per-step tensors a model wants to share across layers


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttnMetadata, scale: float) -> torch.Tensor:
    """q: [N, Hq, D], k/v: [N, Hkv, D], cache: [slots, 2, Hkv, D] -> out [N, Hq * D].

    Writes the new k/v into the cache, then attends each token to its sequence's context."""
    n, hq, d = q.shape
    cache.index_copy_(0, meta.slot_mapping, torch.stack((k, v), dim=1))
    outs = []
    b = meta.num_decode
    if b:
        outs.append(decode_attention(q[:b], cache, meta, scale))
    for p in meta.prefills:
        t = p.q_end - p.q_start
        qp = q[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
        if p.ctx_slots is None:                             # fresh prompt: causal over itself
            kk = k[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)
            vv = v[p.q_start:p.q_end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kv = cache[p.ctx_slots]                         # [L, 2, Hkv, D]
            kk = kv[:, 0].transpose(0, 1).unsqueeze(0)      # [1, Hkv, L, D]
            vv = kv[:, 1].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kk, vv, attn_mask=p.mask, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1).reshape(t, hq * d))  # [T, Hq * D]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def decode_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] -> [B, Hq * D].

    Plain matmul + softmax is several times cheaper than SDPA for a single query on CPU; grouped
    query heads are handled by viewing q as [B, Hkv, G, D] (no KV head repetition)."""
    b, hq, d = q.shape
    hkv = cache.shape[2]
    if meta.decode_range is not None:
        a, e = meta.decode_range
        kv = cache[a:e].unsqueeze(0)                            # [1, L, 2, Hkv, D] (a view)
    else:
        kv = cache.view(cache.shape[0], -1).index_select(0, meta.decode_slots)
        kv = kv.view(b, meta.decode_len, 2, hkv, d)             # [B, L, 2, Hkv, D]
    k = kv[:, :, 0].permute(0, 2, 3, 1)                         # [B, Hkv, D, L]
    v = kv[:, :, 1].transpose(1, 2)                             # [B, Hkv, L, D]
    s = torch.matmul(q.view(b, hkv, hq // hkv, d), k)           # [B, Hkv, G, L]
    p = ops.attn_softmax(s, scale, meta.decode_mask, q.dtype)
    return torch.matmul(p, v).view(b, hq * d)                   # [B, Hkv, G, D] -> [B, Hq * D]
