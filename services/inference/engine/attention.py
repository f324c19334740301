"""Paged attention over a flat KV cache in plain torch (SDPA), for mixed decode + prefill steps.

A step's tokens are laid out flat: first one token per decoding sequence, then each prefill
chunk. The KV cache of one layer is head-major, [2 * kv_heads, num_slots, head_dim] (K heads then
V heads), with slot = block_id * block_size + offset, so a gathered context is already
[heads, tokens, head_dim] for the matmuls (no transposing copies). `AttnMetadata` carries the slot
indices so that every layer reuses the same index tensors (built once per step by the runner).
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
    ctx_range: tuple[int, int] | None = None  # the context's slots are contiguous: cache[:, a:b], no gather


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor            # [N] slot of each new token
    num_decode: int = 0
    decode_len: int = 0                        # Lmax: longest decoding context
    decode_slots: torch.Tensor | None = None   # [B * Lmax] slots of each decoding sequence's context
    decode_range: tuple[int, int] | None = None  # B == 1 with contiguous slots: cache[a:b], no gather
    decode_mask: torch.Tensor | None = None    # [B, 1, 1, Lmax] additive float mask (0 / -inf), None
                                               # when all lengths are equal
    block_size: int = 0
    decode_block_mask: torch.Tensor | None = None  # [B, 1, 1, nblk * block_size] additive
    decode_block_rows: torch.Tensor | None = None  # [2 Hkv * B * nblk] each sequence's blocks (padded with
                                                   # a zero block) as rows of the layer cache viewed
                                                   # [2 Hkv * blocks, bs * D]: a block-granular dim-0 gather
                                                   # (16x fewer index ops than slots, ~35% faster than dim 1)
    decode_table: torch.Tensor | None = None   # [B, nblk] block table, [B] lengths: set when the decode
    decode_lens: torch.Tensor | None = None    # kernels run (triton_ops; pure-decode graph steps)
    prefills: list[PrefillMeta] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # per-step tensors a model wants to share across layers


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttnMetadata, scale: float) -> torch.Tensor:
    """q: [N, Hq, D], k/v: [N, Hkv, D], cache: [2 * Hkv, slots, D] -> out [N, Hq * D].

    Writes the new k/v into the cache, then attends each token to its sequence's context."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    cache.index_copy_(1, meta.slot_mapping, torch.cat((k, v), dim=1).transpose(0, 1))
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
            if p.ctx_range is not None:
                kv = cache[:, p.ctx_range[0]:p.ctx_range[1]]    # [2 Hkv, L, D] (a view)
            else:
                kv = cache.index_select(1, p.ctx_slots)     # [2 Hkv, L, D]
            o = F.scaled_dot_product_attention(qp, kv[:hkv].unsqueeze(0), kv[hkv:].unsqueeze(0),
                                               attn_mask=p.mask, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1).reshape(t, hq * d))  # [T, Hq * D]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def decode_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] -> [B, Hq * D].

    Plain matmul + softmax is several times cheaper than SDPA for a single query on CPU. Grouped
    query heads: q is viewed as [Hkv, B, G, D] against K [Hkv, B, L, D] (no KV head repetition).
    On CPU at batch 1 it runs in fp32 (the fast small-GEMM path there). It keeps the intra-op pool
    as it is: toggling torch.set_num_threads around it cost ~2 ms per decode step (30 layers)."""
    b, hq, d = q.shape
    hkv = cache.shape[0] // 2
    lctx = meta.decode_len
    cpu = q.device.type == "cpu"
    mask = meta.decode_mask
    if meta.decode_range is not None:
        a, e = meta.decode_range
        kv = cache[:, a:e]                                      # [2 Hkv, L, D] (a view, B == 1)
    elif meta.decode_block_rows is not None:                    # gather: memory-bound, all threads
        bs = meta.block_size
        kv = cache.view(-1, bs * d).index_select(0, meta.decode_block_rows)      # [2 Hkv * B * nblk, bs * D]
        kv = kv.view(2 * hkv, -1, bs * d)                                        # [2 Hkv, B * nblk, bs * D]
        lctx = kv.shape[1] // b * bs
        kv = kv.view(2 * hkv, b * lctx, d)
        mask = meta.decode_block_mask
    else:
        kv = cache.index_select(1, meta.decode_slots)           # [2 Hkv, B * L, D]
    qq = q.view(b, hkv, hq // hkv, d).transpose(0, 1)      # [Hkv, B, G, D]
    if cpu and b == 1:
        kv, qq = kv.float(), qq.float()
    k = kv[:hkv].view(hkv, b, lctx, d) if b > 1 else kv[:hkv].unsqueeze(1)   # [Hkv, B, L, D]
    v = kv[hkv:].view(hkv, b, lctx, d) if b > 1 else kv[hkv:].unsqueeze(1)
    s = torch.matmul(qq, k.transpose(-1, -2))               # [Hkv, B, G, L]
    mask = None if mask is None else mask.view(1, b, 1, lctx)
    p = ops.attn_softmax(s, scale, mask, qq.dtype)
    o = torch.matmul(p, v)                                  # [Hkv, B, G, D]
    return o.transpose(0, 1).reshape(b, hq * d).to(q.dtype)
