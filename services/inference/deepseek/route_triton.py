"""DeepSeek-V3's router in two Triton kernels for decode-sized batches (moe.Router's arithmetic).

Why: the torch router is ~15 small kernels per MoE layer (linear, sigmoid, group top-2 sums, group
mask, top-k, gather, normalisation, the expert-parallel slot lookup, the load counters): at batch 1
they cost more than the experts' weights take to read.
  logits   per (16 experts, K split): float32 x . W^T partial sums [S, N, E] (exact fp32 dot)
  select   one program for all N tokens: sum of the partials, sigmoid, bias for choice only, the
           n_group groups scored by their top-2 sum, topk_group groups kept, top-k experts
           (iterative argmax), the unbiased scores normalised and scaled; then this rank's local
           slot of each pair (moe.MoE's owner / local_index tables) and the load counters
           (tokens_per_expert, computed_pairs: atomic adds)
Ties between equal scores break towards the lower expert id (torch.topk's order is unspecified).
"""
from __future__ import annotations

import functools

import torch

MAX_N = 64
BLOCK_E = 16
SPLIT_K = 256
triton = tl = None


@functools.cache
def _kernels():
    global triton, tl
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl

    @triton.jit
    def logits_kernel(x_ptr, w_ptr, part_ptr, N, E, H, stride_x,
                      BT: tl.constexpr, BE: tl.constexpr, SPLIT: tl.constexpr, BK: tl.constexpr):
        e = tl.program_id(0) * BE + tl.arange(0, BE)
        s = tl.program_id(1)
        t = tl.arange(0, BT)
        em, tm = e < E, t < N
        acc = tl.zeros([BT, BE], tl.float32)
        for k0 in range(s * SPLIT, tl.minimum(s * SPLIT + SPLIT, H), BK):
            c = k0 + tl.arange(0, BK)
            cm = c < H
            x = tl.load(x_ptr + t[:, None] * stride_x + c[None, :], mask=tm[:, None] & cm[None, :], other=0.0)
            w = tl.load(w_ptr + e.to(tl.int64)[:, None] * H + c[None, :], mask=em[:, None] & cm[None, :], other=0.0)
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        tl.store(part_ptr + (s * N + t[:, None]) * E + e[None, :], acc, mask=tm[:, None] & em[None, :])

    @triton.jit
    def select_kernel(part_ptr, S, N, bias_ptr, w_out, lid_out, local_index_ptr, owners_ptr, n_rep_ptr,
                      width, rank, n_local, counts_ptr, computed_ptr, scaling,
                      E: tl.constexpr, EP: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, NORM: tl.constexpr):
        t = tl.arange(0, BT)
        e = tl.arange(0, EP)
        tm, em = t < N, e < E
        m2 = tm[:, None] & em[None, :]
        logits = tl.zeros([BT, EP], tl.float32)
        for s in range(S):
            logits += tl.load(part_ptr + (s * N + t[:, None]) * E + e[None, :], mask=m2, other=0.0)
        scores = 1.0 / (1.0 + tl.exp(-logits))
        choice = scores + tl.load(bias_ptr + e, mask=em, other=0.0)[None, :]
        choice = tl.where(em[None, :], choice, float("-inf"))
        if G > 1:                                 # E == EP here (a power of two, checked by the caller)
            EG: tl.constexpr = EP // G
            c3 = tl.reshape(choice, [BT, G, EG])
            i3 = tl.arange(0, EG)[None, None, :]
            top1 = tl.max(c3, axis=2)
            arg1 = tl.argmax(c3, axis=2)
            top2 = tl.max(tl.where(i3 == arg1[:, :, None], float("-inf"), c3), axis=2)
            gs = top1 + top2 if EG > 1 else top1                               # [BT, G]
            gi = tl.arange(0, G)[None, :]
            keep = gi < 0
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.argmax(tl.where(keep, float("-inf"), gs), axis=1)
                keep = keep | (gi == best[:, None])
            allowed = tl.reshape(tl.broadcast_to(keep[:, :, None], [BT, G, EG]), [BT, EP])
            choice = tl.where(allowed, choice, float("-inf"))
        kk = tl.arange(0, KP)[None, :]
        ids = tl.zeros([BT, KP], tl.int32)
        ws = tl.zeros([BT, KP], tl.float32)
        for j in tl.static_range(K):
            best = tl.argmax(choice, axis=1).to(tl.int32)                       # [BT]
            sel = e[None, :] == best[:, None]
            wj = tl.sum(tl.where(sel, scores, 0.0), axis=1)
            choice = tl.where(sel, float("-inf"), choice)
            ids = tl.where(kk == j, best[:, None], ids)
            ws = tl.where(kk == j, wj[:, None], ws)
        if NORM:
            ws = ws / (tl.sum(ws, axis=1)[:, None] + 1e-20)
        ws = ws * scaling
        pm = tm[:, None] & (kk < K)
        pair = t[:, None] * K + kk                                              # [BT, KP]
        tok = t[:, None] + kk * 0
        rep = tl.load(n_rep_ptr + ids, mask=pm, other=1)
        owner = tl.load(owners_ptr + ids.to(tl.int64) * width + tok % rep, mask=pm, other=-1)
        lid = tl.where(owner == rank, tl.load(local_index_ptr + ids, mask=pm, other=0), n_local)
        tl.store(w_out + pair, ws, mask=pm)
        tl.store(lid_out + pair, lid.to(tl.int32), mask=pm)
        tl.atomic_add(counts_ptr + ids, tl.full([BT, KP], 1, tl.int64), mask=pm)
        tl.atomic_add(computed_ptr, tl.sum(tl.sum(((lid < n_local) & pm).to(tl.int64), axis=1), axis=0))

    return logits_kernel, select_kernel


def applies(x: torch.Tensor, n_experts: int, n_group: int) -> bool:
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_N and x.stride(1) == 1
            and (n_group == 1 or n_experts & (n_experts - 1) == 0))


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, n_group: int, topk_group: int, top_k: int,
          norm_topk_prob: bool, scaling: float, local_index: torch.Tensor, owners: torch.Tensor,
          n_rep: torch.Tensor, rank: int, n_local: int, counts: torch.Tensor,
          computed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (weights [N, k] float32, local slot of each pair [N, k] int32, n_local = elsewhere);
    adds the pairs to counts [E] and the local ones to computed [] (int64)."""
    logits_k, select_k = _kernels()
    N, H = x.shape
    E = weight.shape[0]
    S = triton.cdiv(H, SPLIT_K)
    bt = max(16, triton.next_power_of_2(N))
    part = torch.empty(S, N, E, dtype=torch.float32, device=x.device)
    logits_k[(triton.cdiv(E, BLOCK_E), S)](x, weight, part, N, E, H, x.stride(0), BT=bt, BE=BLOCK_E,
                                           SPLIT=SPLIT_K, BK=64, num_warps=4)
    w = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    lid = torch.empty(N, top_k, dtype=torch.int32, device=x.device)
    select_k[(1,)](part, S, N, bias, w, lid, local_index, owners, n_rep, owners.shape[1], rank, n_local,
                   counts, computed, float(scaling), E=E, EP=triton.next_power_of_2(E), G=n_group,
                   TOPK_GROUP=topk_group, K=top_k, KP=triton.next_power_of_2(top_k), BT=bt, NORM=norm_topk_prob,
                   num_warps=4)
    return w, lid
