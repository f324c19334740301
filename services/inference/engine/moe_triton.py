"""Fused mixture-of-experts for decode-sized batches (N <= MAX_N tokens) in Triton.

Why: at batch 1 a torch MoE layer is a sort, a histogram, gathers, two grouped GEMMs over one row
each, SiLU-mul, scaling and an index_add: ~15 small kernels whose launches cost more than the
expert weights take to read. Here it is four kernels and only the experts that were hit are read:
  align     one program: (token, expert) pairs sorted by local expert (tl.sort of expert * P + pair),
            the list of experts hit, each one's first pair and pair count
  gate_up   per (expert hit, BLOCK_M rows): every pair of that expert in one tl.dot against the
            gate and up rows, silu(gate) * up stored per pair (the shared expert is one more
            "expert" whose pairs are all tokens)
  down      per (expert hit, BLOCK_M rows): the pairs' activations times the down rows, times the
            pair's routing weight, stored per pair in fp32
  combine   per (token, columns): the sum of the token's pairs and its shared-expert row
So each expert's weights are read once per step whatever the number of its tokens. No host
synchronisation and grids from shapes only (CUDA-graph capturable): programs of slots past the
number of experts hit return at once.

Weights: stacked per expert, w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], in the model
dtype or float8_e4m3fn with 128x128 block scales s13 [E, 2I/128, ceil(H/128)], s2 [E, ceil(H/128),
I/128] (I a multiple of 128), dequantized in registers and rounded to the model dtype as
Linear.dense_weight does; the activation stays in the model dtype.
Roundings follow the torch path: gate and up rounded to the model dtype, silu rounded, the product
rounded; the down product rounded before its routing weight; sums in fp32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from services.inference.engine import triton_ops

MAX_N = 64          # tokens per call (one tl.dot block of pairs per expert)
BLOCK_M_UP = 16     # gate/up rows per program
BLOCK_M_DOWN = 16   # down rows per program
BLOCK_H = 512       # combine columns per program
triton = tl = round_to = _pairs = None     # set by _kernels(): jit callees resolve in module globals


@dataclass(frozen=True)
class Experts:
    """Stacked expert weights (views of the model's parameters, see the module doc)."""
    w13: torch.Tensor                      # [E, 2I, H]
    w2: torch.Tensor                       # [E, H, I]
    s13: torch.Tensor | None = None        # [E, 2I/128, ceil(H/128)] float32 (FP8 only)
    s2: torch.Tensor | None = None         # [E, ceil(H/128), I/128]

    @property
    def fp8(self) -> bool:
        return self.w13.dtype == torch.float8_e4m3fn

    @property
    def inter(self) -> int:
        return self.w2.shape[2]


@functools.cache
def _kernels():
    global triton, tl, round_to, _pairs
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    round_to = triton_ops.jit_helpers()["round_to"]

    @triton.jit
    def align_kernel(lid_ptr, P, n_local, order_ptr, active_ptr, starts_ptr, counts_ptr, nact_ptr,
                     PP: tl.constexpr, EP: tl.constexpr, PDL: tl.constexpr):
        # lid: [P] local expert slot of each pair (n_local: computed elsewhere)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        p = tl.arange(0, PP)
        lid = tl.load(lid_ptr + p, mask=p < P, other=n_local)
        lid = tl.minimum(lid, n_local)
        srt = tl.sort(lid * PP + p)                                          # by expert, then pair
        tl.store(order_ptr + p, srt % PP, mask=p < P)
        hist = tl.histogram(lid, EP)                                         # [EP] pairs per slot
        e = tl.arange(0, EP)
        starts = tl.cumsum(hist, 0) - hist
        hit = (hist > 0) & (e < n_local)
        pos = tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(active_ptr + pos, e, mask=hit)
        tl.store(starts_ptr + pos, starts, mask=hit)
        tl.store(counts_ptr + pos, hist, mask=hit)
        tl.store(nact_ptr, tl.sum(hit.to(tl.int32), 0))

    @triton.jit
    def _pairs(j, order_ptr, active_ptr, starts_ptr, counts_ptr, N, TOPK: tl.constexpr, BT: tl.constexpr,
               NS: tl.constexpr):
        # (expert slot, pair ids [BT], token ids [BT], valid [BT]) of program slot j; slot NS is
        # the shared expert, whose pairs are the tokens
        t = tl.arange(0, BT)
        if j < NS:
            e = tl.load(active_ptr + j)
            cnt = tl.load(counts_ptr + j)
            valid = t < cnt
            pair = tl.load(order_ptr + tl.load(starts_ptr + j) + t, mask=valid, other=0)
            tok = pair // TOPK
        else:
            e = j * 0
            valid = t < N
            pair = t
            tok = t
        return e, pair, tok, valid

    @triton.jit
    def gate_up_kernel(x_ptr, w_ptr, s_ptr, act_ptr, sw_ptr, ss_ptr, sact_ptr,
                       order_ptr, active_ptr, starts_ptr, counts_ptr, nact_ptr,
                       N, H, I, IS, stride_x, s_we, s_wr, s_se, s_sr, s_swr, s_ssr,
                       NS: tl.constexpr, TOPK: tl.constexpr, FP8: tl.constexpr, BT: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, F32DOT: tl.constexpr, ROUND: tl.constexpr,
                       PDL: tl.constexpr):
        j = tl.program_id(0)
        r0 = tl.program_id(1) * BM
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if (j < NS) & (j >= tl.load(nact_ptr)):
            return
        e, pair, tok, valid = _pairs(j, order_ptr, active_ptr, starts_ptr, counts_ptr, N, TOPK, BT, NS)
        if j < NS:
            inter = I
            w_base = w_ptr + e.to(tl.int64) * s_we
            s_base = s_ptr + e.to(tl.int64) * s_se
            wr, sr, dst, dst_stride = s_wr, s_sr, act_ptr, I
        else:
            inter = IS
            w_base, s_base, wr, sr, dst, dst_stride = sw_ptr, ss_ptr, s_swr, s_ssr, sact_ptr, IS
        if r0 >= inter:
            return
        rows = r0 + tl.arange(0, BM)
        rm = rows < inter
        cols = tl.arange(0, BK)
        g_rows = w_base + rows.to(tl.int64)[:, None] * wr
        u_rows = w_base + (rows + inter).to(tl.int64)[:, None] * wr
        x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_x
        acc_g = tl.zeros([BT, BM], tl.float32)
        acc_u = tl.zeros([BT, BM], tl.float32)
        for k0 in range(0, H, BK):
            c = k0 + cols
            cm = c < H
            x = tl.load(x_rows + c[None, :], mask=valid[:, None] & cm[None, :], other=0.0)   # [BT, BK]
            wg = tl.load(g_rows + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)   # [BM, BK]
            wu = tl.load(u_rows + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
            if FP8:                  # dequantized in registers, rounded to the model dtype (dense_weight)
                sg = tl.load(s_base + (r0 // 128) * sr + c // 128, mask=cm, other=0.0)
                su = tl.load(s_base + ((r0 + inter) // 128) * sr + c // 128, mask=cm, other=0.0)
                wg = (wg.to(tl.float32) * sg[None, :]).to(x.dtype)
                wu = (wu.to(tl.float32) * su[None, :]).to(x.dtype)
            if F32DOT:
                pg = tl.dot(x.to(tl.float32), tl.trans(wg.to(tl.float32)), input_precision="ieee")
                pu = tl.dot(x.to(tl.float32), tl.trans(wu.to(tl.float32)), input_precision="ieee")
            else:
                pg = tl.dot(x, tl.trans(wg.to(x.dtype)))
                pu = tl.dot(x, tl.trans(wu.to(x.dtype)))
            acc_g += pg
            acc_u += pu
        g = round_to(acc_g, ROUND)
        u = round_to(acc_u, ROUND)
        a = round_to(round_to(g / (1.0 + tl.exp(-g)), ROUND) * u, ROUND)
        tl.store(dst + pair.to(tl.int64)[:, None] * dst_stride + rows[None, :], a.to(dst.dtype.element_ty),
                 mask=valid[:, None] & rm[None, :])

    @triton.jit
    def down_kernel(act_ptr, w_ptr, s_ptr, y_ptr, rw_ptr, sact_ptr, sw_ptr, ss_ptr, sy_ptr,
                    order_ptr, active_ptr, starts_ptr, counts_ptr, nact_ptr,
                    N, H, I, IS, s_we, s_wr, s_se, s_sr, s_swr, s_ssr,
                    NS: tl.constexpr, TOPK: tl.constexpr, FP8: tl.constexpr, BT: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, F32DOT: tl.constexpr, ROUND: tl.constexpr,
                    PDL: tl.constexpr):
        j = tl.program_id(0)
        r0 = tl.program_id(1) * BM
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if (j < NS) & (j >= tl.load(nact_ptr)):
            return
        e, pair, tok, valid = _pairs(j, order_ptr, active_ptr, starts_ptr, counts_ptr, N, TOPK, BT, NS)
        if j < NS:
            inter = I
            w_base = w_ptr + e.to(tl.int64) * s_we
            s_base = s_ptr + e.to(tl.int64) * s_se
            wr, sr, src, dst = s_wr, s_sr, act_ptr, y_ptr
        else:
            inter = IS
            w_base, s_base, wr, sr, src, dst = sw_ptr, ss_ptr, s_swr, s_ssr, sact_ptr, sy_ptr
        rows = r0 + tl.arange(0, BM)
        rm = rows < H
        cols = tl.arange(0, BK)
        w_rows = w_base + rows.to(tl.int64)[:, None] * wr
        a_rows = src + pair.to(tl.int64)[:, None] * inter
        acc = tl.zeros([BT, BM], tl.float32)
        for k0 in range(0, inter, BK):
            c = k0 + cols
            cm = c < inter
            a = tl.load(a_rows + c[None, :], mask=valid[:, None] & cm[None, :], other=0.0)   # [BT, BK]
            w = tl.load(w_rows + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)     # [BM, BK]
            if FP8:
                sw = tl.load(s_base + (r0 // 128) * sr + c // 128, mask=cm, other=0.0)
                w = (w.to(tl.float32) * sw[None, :]).to(a.dtype)
            if F32DOT:
                part = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(a, tl.trans(w.to(a.dtype)))
            acc += part
        y = round_to(acc, ROUND)
        if j < NS:
            y = y * tl.load(rw_ptr + pair, mask=valid, other=0.0)[:, None]
        tl.store(dst + pair.to(tl.int64)[:, None] * H + rows[None, :], y, mask=valid[:, None] & rm[None, :])

    @triton.jit
    def combine_kernel(y_ptr, sy_ptr, lid_ptr, out_ptr, H, n_local, stride_o,
                       TOPK: tl.constexpr, ROUTED: tl.constexpr, SHARED: tl.constexpr, BH: tl.constexpr,
                       PDL: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BH + tl.arange(0, BH)
        cm = c < H
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BH], tl.float32)
        if ROUTED:
            for j in tl.static_range(TOPK):
                here = (c * 0 + tl.load(lid_ptr + n * TOPK + j)) < n_local          # [BH]
                acc += tl.load(y_ptr + (n * TOPK + j) * H + c, mask=cm & here, other=0.0)
        if SHARED:
            acc += tl.load(sy_ptr + n * H + c, mask=cm, other=0.0)
        tl.store(out_ptr + n * stride_o + c, acc.to(out_ptr.dtype.element_ty), mask=cm)

    interpreted = type(align_kernel).__name__ == "InterpretedFunction"
    return align_kernel, gate_up_kernel, down_kernel, combine_kernel, interpreted


def applies(x: torch.Tensor, routed: Experts | None, shared: Experts | None) -> bool:
    """N <= MAX_N rows; FP8 needs intermediate sizes that are multiples of 128 (block-aligned)."""
    if not (x.dim() == 2 and 0 < x.shape[0] <= MAX_N and x.stride(1) == 1):
        return False
    for ex in (routed, shared):
        if ex is not None and (ex.w13.dtype != x.dtype and not ex.fp8 or ex.fp8 and ex.inter % 128):
            return False
    return routed is not None or shared is not None


def fused_moe(x: torch.Tensor, lid: torch.Tensor | None, rw: torch.Tensor | None, routed: Experts | None,
              shared: Experts | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H]; lid [N, k] int32 local expert slot per pair (routed.w13.shape[0]: not on this
    rank); rw [N, k] float32 routing weights -> [N, H] in x.dtype: sum over the token's local pairs
    of rw * expert(x) plus shared(x) (see the module doc). routed None: the shared (or dense) MLP only."""
    align_k, gate_up_k, down_k, combine_k, interpreted = _kernels()
    N, H = x.shape
    dev, dt = x.device, x.dtype
    pdl = triton_ops.pdl_launch(dev)
    kw = dict(F32DOT=dt == torch.float32 or interpreted, ROUND=triton_ops.round_mode(dt), PDL=bool(pdl), **pdl)
    bt = max(16, triton.next_power_of_2(N))
    if routed is not None:
        n_local, k = routed.w13.shape[0], lid.shape[1]
        P = N * k
        ns = min(P, n_local)
        I = routed.inter
        i32 = dict(dtype=torch.int32, device=dev)
        order, meta = torch.empty(P, **i32), torch.empty(3 * ns + 1, **i32)
        active, starts, counts, nact = meta[:ns], meta[ns:2 * ns], meta[2 * ns:3 * ns], meta[3 * ns:]
        align_k[(1,)](lid, P, n_local, order, active, starts, counts, nact, PP=triton.next_power_of_2(P),
                      EP=triton.next_power_of_2(n_local + 1), PDL=bool(pdl), **pdl)
        act = torch.empty(P, I, dtype=dt, device=dev)                   # [P, I]
        y = torch.empty(P, H, dtype=torch.float32, device=dev)          # [P, H] weighted
        w13, w2 = routed.w13, routed.w2
        s13, s2 = (routed.s13, routed.s2) if routed.fp8 else (w13, w2)
    else:                    # unused pointers of the same types as the shared ones (branches merge)
        n_local, k, ns, I = 0, 1, 0, 0
        order = active = starts = counts = nact = torch.empty(1, dtype=torch.int32, device=dev)
        act, y = x, torch.empty(1, dtype=torch.float32, device=dev)
        w13, w2 = shared.w13[0], shared.w2[0]
        s13, s2 = (shared.s13[0], shared.s2[0]) if shared.fp8 else (w13, w2)
    if shared is not None:
        IS = shared.inter
        sact = torch.empty(N, IS, dtype=dt, device=dev)
        sy = torch.empty(N, H, dtype=torch.float32, device=dev)
        sw13, sw2 = shared.w13[0], shared.w2[0]
        ss13, ss2 = (shared.s13[0], shared.s2[0]) if shared.fp8 else (sw13, sw2)
    else:
        IS, sact, sy = 0, x, y
        sw13, sw2, ss13, ss2 = routed.w13[0], routed.w2[0], s13[0], s2[0]
    fp8 = (routed or shared).fp8
    bk = 256
    slots = ns + (shared is not None)
    inter_max = max(I, IS)
    if slots:
        gate_up_k[(slots, triton.cdiv(inter_max, BLOCK_M_UP))](
            x, w13, s13, act, sw13, ss13, sact, order, active, starts, counts, nact,
            N, H, I, IS, x.stride(0), w13.stride(0), w13.stride(-2), s13.stride(0), s13.stride(-2),
            sw13.stride(0), ss13.stride(0),
            NS=ns, TOPK=k, FP8=fp8, BT=bt, BM=BLOCK_M_UP, BK=bk, num_warps=4, **kw)
        down_k[(slots, triton.cdiv(H, BLOCK_M_DOWN))](
            act, w2, s2, y, rw if rw is not None else y, sact, sw2, ss2, sy, order, active, starts, counts, nact,
            N, H, I, IS, w2.stride(0), w2.stride(-2), s2.stride(0), s2.stride(-2), sw2.stride(0), ss2.stride(0),
            NS=ns, TOPK=k, FP8=fp8, BT=bt, BM=BLOCK_M_DOWN, BK=bk, num_warps=4, **kw)
    if out is None:
        out = torch.empty(N, H, dtype=dt, device=dev)
    combine_k[(N, triton.cdiv(H, BLOCK_H))](y, sy, lid if lid is not None else order, out, H, n_local, out.stride(0),
                                           TOPK=k, ROUTED=routed is not None, SHARED=shared is not None, BH=BLOCK_H,
                                           PDL=bool(pdl), **pdl)
    return out
