"""MLA decode with weight absorption over the paged latent cache in three Triton kernels.

Why: attention.MLAttention's absorbed decode in torch is ~25 small kernels per layer (two RMSNorm /
RoPE chains, cat + index_copy_, the context gather, five einsums, masking, softmax); at batch 1 they
cost several times the layer's weight reads. Here (one query per sequence, its block table and
length as the engine's CUDA-graph steps give them):
  prep   per (head, 128 latent columns, 16 sequences): q_lat = q_nope . W_UK[head] (absorbed query)
         and RoPE of q_rope; one more "head" normalises the new latent (kv_a_layernorm), ropes the
         new rope key and writes both to the cache at the sequence's slot
  attn   per (sequence, 16 heads, context partition): scores q_lat . c_kv + q_rope . k_rope read
         through the block table, online softmax, p . c_kv (flash-decoding partials, fp32)
  out    per (head, 16 sequences): merge of the partitions, then o = o_lat . W_UV[head]^T
kv_b_proj's weight [heads * (nope + v), kv_lora] is read in place: bf16, or e4m3 with its 128x128
block scales dequantized in registers (rounded to the model dtype, as Linear.dense_weight does).
Roundings follow the torch path where it rounds (q_lat, RoPE, the latent norm, o_lat, the output);
scores and softmax are fp32. Blocks < 0 (CUDA-graph padding rows) are skipped.
"""
from __future__ import annotations

import functools

import torch

from services.inference.engine import triton_ops

BLOCK_N = 32        # context positions per attention tile
HEADS_BLOCK = 16    # heads per attention program
ROWS_BLOCK = 16     # sequences per prep / out program
triton = tl = round_to = _rope = _w_tile = None


@functools.cache
def _kernels():
    global triton, tl, round_to, _rope, _w_tile
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    round_to = triton_ops.jit_helpers()["round_to"]

    @triton.jit
    def _rope(src, b, bm, cos_ptr, sin_ptr, s_cos, ROPE: tl.constexpr, INTERLEAVE: tl.constexpr,
              ROUND: tl.constexpr):
        # src: [BB, 1] row pointers of the rope part -> (first half, second half) [BB, ROPE/2] fp32,
        # attention.apply_rope with its per-op roundings
        HALF: tl.constexpr = ROPE // 2
        i = tl.arange(0, HALF)[None, :]
        m = bm[:, None]
        if INTERLEAVE:
            x1 = tl.load(src + 2 * i, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + b[:, None] * s_cos + i, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b[:, None] * s_cos + i, mask=m, other=0.0).to(tl.float32)
        y1 = round_to(round_to(x1 * c, ROUND) - round_to(x2 * s, ROUND), ROUND)
        y2 = round_to(round_to(x2 * c, ROUND) + round_to(x1 * s, ROUND), ROUND)
        return y1, y2

    @triton.jit
    def _w_tile(w_ptr, s_ptr, rows, cols, s_w, s_s, row0, FP8: tl.constexpr, DT: tl.constexpr):
        # kv_b weight tile [R, C] in the model dtype (e4m3 * block scale, rounded, when FP8)
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * s_w + cols[None, :])
        if FP8:
            sc = tl.load(s_ptr + ((rows + row0) // 128)[:, None] * s_s + (cols // 128)[None, :])
            w = (w.to(tl.float32) * sc).to(DT)
        return w.to(DT)

    @triton.jit
    def prep_kernel(q_ptr, ckv_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr, slot_ptr, w_ptr, s_ptr, qlat_ptr, qr_ptr,
                    B, eps, s_q, s_ckv, s_cos, s_c, s_w, s_s, row0,
                    HEADS: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, KVL: tl.constexpr,
                    V: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, FP8: tl.constexpr, F32DOT: tl.constexpr,
                    ROUND: tl.constexpr, INTERLEAVE: tl.constexpr, PDL: tl.constexpr):
        h = tl.program_id(0)
        cb = tl.program_id(1)
        b = tl.program_id(2) * BB + tl.arange(0, BB)
        bm = b < B
        HALF: tl.constexpr = ROPE // 2
        DT = cache_ptr.dtype.element_ty
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if h < HEADS:
            rows = h * (NOPE + V) + tl.arange(0, NOPE)
            cols = cb * BC + tl.arange(0, BC)
            w = _w_tile(w_ptr, s_ptr, rows, cols, s_w, s_s, row0, FP8, DT)           # [NOPE, BC]
            q_row = q_ptr + b.to(tl.int64)[:, None] * s_q + h * (NOPE + ROPE)
            qn = tl.load(q_row + tl.arange(0, NOPE)[None, :], mask=bm[:, None], other=0.0)   # [BB, NOPE]
            if F32DOT:
                ql = tl.dot(qn.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                ql = tl.dot(qn, w)
            ql = round_to(ql, ROUND)
            tl.store(qlat_ptr + (b[:, None] * HEADS + h) * KVL + cols[None, :], ql, mask=bm[:, None])
            if cb == 0:
                y1, y2 = _rope(q_row + NOPE, b, bm, cos_ptr, sin_ptr, s_cos, ROPE, INTERLEAVE, ROUND)
                i = tl.arange(0, HALF)[None, :]
                dst = qr_ptr + (b[:, None] * HEADS + h) * ROPE
                tl.store(dst + i, y1, mask=bm[:, None])
                tl.store(dst + HALF + i, y2, mask=bm[:, None])
        elif cb == 0:                    # the new latent and rope key -> the cache
            kk = tl.arange(0, KVL)[None, :]
            row = ckv_ptr + b.to(tl.int64)[:, None] * s_ckv
            x = tl.load(row + kk, mask=bm[:, None], other=0.0).to(tl.float32)       # [BB, KVL]
            inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / KVL + eps)
            nw = tl.load(nw_ptr + kk).to(tl.float32)
            y = round_to(nw * round_to(x * inv[:, None], ROUND), ROUND)
            slot = tl.load(slot_ptr + b, mask=bm, other=0).to(tl.int64)
            dst = cache_ptr + slot[:, None] * s_c
            tl.store(dst + kk, y.to(DT), mask=bm[:, None])
            y1, y2 = _rope(row + KVL, b, bm, cos_ptr, sin_ptr, s_cos, ROPE, INTERLEAVE, ROUND)
            i = tl.arange(0, HALF)[None, :]
            tl.store(dst + KVL + i, y1.to(DT), mask=bm[:, None])
            tl.store(dst + KVL + HALF + i, y2.to(DT), mask=bm[:, None])

    @triton.jit
    def attn_kernel(qlat_ptr, qr_ptr, cache_ptr, table_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, scale_log2, part_size,
                    s_c, s_tb, n_parts,
                    HEADS: tl.constexpr, HB: tl.constexpr, KVL: tl.constexpr, ROPE: tl.constexpr,
                    BS: tl.constexpr, BLOCK: tl.constexpr, F32DOT: tl.constexpr, ROUND: tl.constexpr,
                    PDL: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        hh = tl.program_id(1) * HB + tl.arange(0, HB)
        part = tl.program_id(2)
        hm = hh < HEADS
        DT = cache_ptr.dtype.element_ty
        kk = tl.arange(0, KVL)
        rr = tl.arange(0, ROPE)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        ql = tl.load(qlat_ptr + (b * HEADS + hh)[:, None] * KVL + kk[None, :], mask=hm[:, None], other=0.0)
        qr = tl.load(qr_ptr + (b * HEADS + hh)[:, None] * ROPE + rr[None, :], mask=hm[:, None], other=0.0)
        if not F32DOT:
            ql = ql.to(DT)
            qr = qr.to(DT)
        length = tl.load(lens_ptr + b).to(tl.int32)
        p_start = part * part_size
        p_end = tl.minimum(p_start + part_size, length)
        m_i = tl.full([HB], float("-inf"), tl.float32)
        l_i = tl.zeros([HB], tl.float32)
        acc = tl.zeros([HB, KVL], tl.float32)
        for start in range(p_start, p_end, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < p_end
            blk = tl.load(table_ptr + b * s_tb + pos // BS, mask=valid, other=-1)
            valid = valid & (blk >= 0)
            slot = blk.to(tl.int64) * BS + pos % BS
            lat = tl.load(cache_ptr + slot[:, None] * s_c + kk[None, :], mask=valid[:, None], other=0.0)
            kr = tl.load(cache_ptr + slot[:, None] * s_c + KVL + rr[None, :], mask=valid[:, None], other=0.0)
            if F32DOT:
                s = (tl.dot(ql, tl.trans(lat.to(tl.float32)), input_precision="ieee")
                     + tl.dot(qr, tl.trans(kr.to(tl.float32)), input_precision="ieee"))
            else:
                s = tl.dot(ql, tl.trans(lat)) + tl.dot(qr, tl.trans(kr))                  # [HB, BLOCK]
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32DOT:
                pv = tl.dot(round_to(p, ROUND), lat.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(DT), lat)                                               # [HB, KVL]
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        row = (b * HEADS + hh) * n_parts + part
        tl.store(m_ptr + row, m_i, mask=hm)
        tl.store(l_ptr + row, l_i, mask=hm)
        tl.store(acc_ptr + row[:, None] * KVL + kk[None, :], acc, mask=hm[:, None])

    @triton.jit
    def out_kernel(m_ptr, l_ptr, acc_ptr, w_ptr, s_ptr, out_ptr, B, n_parts, s_w, s_s, row0, s_o,
                   HEADS: tl.constexpr, NOPE: tl.constexpr, V: tl.constexpr, KVL: tl.constexpr,
                   BB: tl.constexpr, BC: tl.constexpr, NPP: tl.constexpr, FP8: tl.constexpr,
                   F32DOT: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr):
        h = tl.program_id(0)
        b = tl.program_id(1) * BB + tl.arange(0, BB)
        bm = b < B
        DT = out_ptr.dtype.element_ty
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pp = tl.arange(0, NPP)
        base = (b.to(tl.int64) * HEADS + h) * n_parts                                # [BB]
        pm = bm[:, None] & (pp[None, :] < n_parts)
        m = tl.load(m_ptr + base[:, None] + pp[None, :], mask=pm, other=float("-inf"))
        l = tl.load(l_ptr + base[:, None] + pp[None, :], mask=pm, other=0.0)
        m_max = tl.max(m, 1)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
        denom = tl.sum(tl.where(pm, tl.exp2(m - m_ref[:, None]), 0.0) * l, 1)
        denom = tl.where(denom > 0, denom, 1.0)
        vr = h * (NOPE + V) + NOPE + tl.arange(0, V)
        o = tl.zeros([BB, V], tl.float32)
        for kc in range(0, KVL, BC):
            cols = kc + tl.arange(0, BC)
            a = tl.zeros([BB, BC], tl.float32)
            for p in range(n_parts):
                wp = tl.exp2(tl.load(m_ptr + base + p, mask=bm, other=float("-inf")) - m_ref)
                a += wp[:, None] * tl.load(acc_ptr + (base + p)[:, None] * KVL + cols[None, :], mask=bm[:, None],
                                           other=0.0)
            a = round_to(a / denom[:, None], ROUND)                                   # o_lat [BB, BC]
            w = _w_tile(w_ptr, s_ptr, vr, cols, s_w, s_s, row0, FP8, DT)              # [V, BC]
            if F32DOT:
                o += tl.dot(a, tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                o += tl.dot(a.to(DT), tl.trans(w))
        tl.store(out_ptr + b.to(tl.int64)[:, None] * s_o + h * V + tl.arange(0, V)[None, :],
                 round_to(o, ROUND).to(DT), mask=bm[:, None])

    interpreted = type(prep_kernel).__name__ == "InterpretedFunction"
    return prep_kernel, attn_kernel, out_kernel, interpreted


def applies(heads: int, nope: int, rope: int, kvl: int, v: int) -> bool:
    """Power-of-two head widths (>= 16, tl.dot and tl.arange) as R1 and V2-Lite have."""
    return all(d >= 16 and d & (d - 1) == 0 for d in (nope, rope, kvl, v))


def mla_decode(q: torch.Tensor, ckv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_w: torch.Tensor,
               eps: float, cache: torch.Tensor, slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
               block_size: int, w_kv: torch.Tensor, w_scale: torch.Tensor | None, w_row0: int, *, heads: int,
               nope: int, rope: int, kvl: int, v: int, scale: float, interleave: bool) -> torch.Tensor:
    """q [B, heads * (nope + rope)] (rows unit-stride), ckv [B, kvl + rope] (kv_a output, before its
    norm and RoPE), cos/sin [B, rope/2], cache [slots, kvl + rope], slots [B] (the new token's slot),
    table [B, nblk], lens [B] (context lengths, the new token included), w_kv [heads * (nope + v), kvl]
    (e4m3 with w_scale [.., ceil(kvl/128)] and w_row0 = this slice's first row within its scale
    block, when FP8) -> attention output [B, heads * v] in the model dtype. Writes the cache slots."""
    prep, attn, outk, interpreted = _kernels()
    B = q.shape[0]
    dev, dt = q.device, cache.dtype
    fp8 = w_kv.dtype == torch.float8_e4m3fn
    ws = w_scale if fp8 else w_kv
    pdl = triton_ops.pdl_launch(dev)
    common = dict(F32DOT=dt == torch.float32 or interpreted, ROUND=triton_ops.round_mode(dt), PDL=bool(pdl), **pdl)
    bc = min(128, kvl)
    qlat = torch.empty(B, heads, kvl, dtype=torch.float32, device=dev)
    qr = torch.empty(B, heads, rope, dtype=torch.float32, device=dev)
    prep[(heads + 1, kvl // bc, triton.cdiv(B, ROWS_BLOCK))](
        q, ckv, cos, sin, norm_w, cache, slots, w_kv, ws, qlat, qr, B, eps, q.stride(0), ckv.stride(0), cos.stride(0),
        cache.stride(0), w_kv.stride(0), ws.stride(0), w_row0, HEADS=heads, NOPE=nope, ROPE=rope, KVL=kvl, V=v,
        BB=ROWS_BLOCK, BC=bc, FP8=fp8, INTERLEAVE=interleave, num_warps=4, **common)
    hb = triton.cdiv(heads, HEADS_BLOCK)
    max_ctx = table.shape[1] * block_size
    part = triton_ops.partition_size(max_ctx, B, hb, dev)
    n_parts = triton.cdiv(max_ctx, part)
    m = torch.empty(B, heads, n_parts, dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, heads, n_parts, kvl, dtype=torch.float32, device=dev)
    attn[(B, hb, n_parts)](qlat, qr, cache, table, lens, m, lsum, acc, scale * 1.4426950408889634, part,
                           cache.stride(0), table.stride(0), n_parts, HEADS=heads, HB=HEADS_BLOCK, KVL=kvl, ROPE=rope,
                           BS=block_size, BLOCK=BLOCK_N, num_warps=8, **common)
    out = torch.empty(B, heads * v, dtype=dt, device=dev)
    outk[(heads, triton.cdiv(B, ROWS_BLOCK))](m, lsum, acc, w_kv, ws, out, B, n_parts, w_kv.stride(0), ws.stride(0),
                                              w_row0, out.stride(0), HEADS=heads, NOPE=nope, V=v, KVL=kvl,
                                              BB=ROWS_BLOCK, BC=bc, NPP=triton.next_power_of_2(n_parts), FP8=fp8,
                                              num_warps=4, **common)
    return out
