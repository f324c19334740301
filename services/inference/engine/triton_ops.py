"""Triton kernels for the GPU decode step: fused RoPE + KV-cache write, paged decode attention.

Why: at batch 1 a decode layer's attention is ~7 tiny kernels (cat + index_copy_, context gather,
q.K^T, softmax, p.V, copies, RoPE) whose launch and gather cost dominate its few microseconds of
real work. `rope_kv_write` is one launch for RoPE on q and k plus the cache write of k and v;
`paged_decode_attention` reads K/V straight from the paged cache through the block table
(flash-decoding: the context is split into partitions so that batch 1 still fills the GPU, then a
small kernel merges the partials), so there is no gather and no per-step slot/mask metadata.

Layouts (see attention.py): one layer's cache is head-major [2 * Hkv, num_slots, D] (K heads, then
V heads), slot = block_id * block_size + offset; qkv is [N, (Hq + 2 Hkv) * D] (q | k | v heads).

triton is imported lazily (on the first call, or `available()`), so this module imports without it
and TRITON_INTERPRET=1, read when the kernels are defined, can be set by the caller beforehand.
Both wrappers are CUDA-graph capturable: no host syncs, and launch grids depend on shapes only.

Programmatic dependent launch (`pdl_launch`: sm90+, while PDL is on): the decode kernels here, in
gemv.py and in fused_all_reduce.py are launched with the programmatic-serialization attribute and
call griddepcontrol.wait before touching anything an earlier kernel writes, then
launch_dependents, so each launch (and the GEMV's weight-only prologue) overlaps the tail of the
kernel before it. Tried and dropped (docs/engine.md): RoPE + KV write + attention + merge in one
kernel, the last program of each (sequence, kv head) merging; it was slower than these three.
"""
from __future__ import annotations

import functools

import torch

triton = None        # set by _kernels()
tl = None
round_to = None

# Tunables of paged_decode_attention, read at each call (bench/triton_ops_gpu.py sweeps them on a GPU).
BLOCK_N = 64         # context positions per tile (one tl.dot)
NUM_WARPS = 4
NUM_STAGES = 3       # cp.async pipelining of the K/V tile loads
MIN_PARTITION = 128  # fewest context positions per flash-decoding partition
MAX_PARTITIONS = 64  # the merge kernel holds [partitions, D] fp32 partials in registers
PDL = True           # programmatic dependent launch on sm90+ (the runner sets it from EngineConfig.pdl)


def available() -> bool:
    """True if triton imports (kernels still need a GPU, or TRITON_INTERPRET=1 with CPU tensors)."""
    try:
        _kernels()
    except ImportError:
        return False
    return True


def pdl_launch(device: torch.device) -> dict:
    """Launch options for programmatic dependent launch: {"launch_pdl": True} on a CUDA device of
    compute capability >= 9 while PDL is on, else {} (kernels then take PDL=False)."""
    return {"launch_pdl": True} if PDL and device.type == "cuda" and _sm90(device) else {}


@functools.cache
def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def jit_helpers() -> dict:
    """Shared @triton.jit helpers by name (other kernel modules bind them into their globals)."""
    _kernels()
    return {"round_to": round_to}


@functools.cache
def _kernels():
    global triton, tl, round_to   # module globals: jit functions resolve callees there, not in closures
    import triton as _triton
    import triton.language as _tl
    triton, tl = _triton, _tl

    @triton.jit
    def round_to(x, ROUND: tl.constexpr):
        # fp32 x rounded (to nearest even) to the model dtype, kept in fp32. bf16 by bit arithmetic:
        # the interpreter's fp32 -> bf16 cast is not round-to-nearest, this is exact on both.
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        elif ROUND == 2:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def rope_kv_write_kernel(qkv, cos, sin, slots, cache, q_out,
                             s_qkv_n, s_cos_n, s_sin_n, s_c_h, s_c_s, s_q_n, s_q_h,
                             HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROUND: tl.constexpr,
                             PDL: tl.constexpr):
        # One program per (token, head) of the qkv row: q heads -> q_out, k heads -> cache rows
        # 0..Hkv-1 (rotated), v heads -> cache rows Hkv..2Hkv-1 (copied); cache row = head - Hq.
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        HALF: tl.constexpr = D // 2
        i = tl.arange(0, HALF)
        if PDL:
            tl.extra.cuda.gdc_wait()              # qkv comes from the kernel before
            tl.extra.cuda.gdc_launch_dependents()
        src = qkv + n * s_qkv_n + h * D
        x1 = tl.load(src + i)                                   # [D/2] first half
        x2 = tl.load(src + HALF + i)                            # [D/2] second half
        dt = x1.dtype
        if h < HQ + HKV:
            # ops.rope: x * cos + roll(x, D/2) * sin, each op rounded to the model dtype as eager torch does
            c1 = tl.load(cos + n * s_cos_n + i).to(tl.float32)
            c2 = tl.load(cos + n * s_cos_n + HALF + i).to(tl.float32)
            s1 = tl.load(sin + n * s_sin_n + i).to(tl.float32)
            s2 = tl.load(sin + n * s_sin_n + HALF + i).to(tl.float32)
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            a1 = round_to(f1 * c1, ROUND)
            b1 = round_to(f2 * s1, ROUND)
            a2 = round_to(f2 * c2, ROUND)
            b2 = round_to(f1 * s2, ROUND)
            y1 = round_to(a1 + b1, ROUND).to(dt)    # exact: the value is representable in dt
            y2 = round_to(a2 + b2, ROUND).to(dt)
        else:
            y1, y2 = x1, x2
        if h < HQ:
            dst = q_out + n * s_q_n + h * s_q_h
        else:
            slot = tl.load(slots + n)
            dst = cache + (h - HQ).to(tl.int64) * s_c_h + slot * s_c_s
        tl.store(dst + i, y1)
        tl.store(dst + HALF + i, y2)

    @triton.jit
    def decode_attn_kernel(q, cache, table, lens, out, m_buf, l_buf, acc_buf, scale_log2, part_size,
                           s_qb, s_qh, s_ch, s_cs, s_tb, s_ob, n_parts,
                           HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                           D: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr,
                           SINGLE: tl.constexpr, F32DOT: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr):
        # One program per (sequence, kv head, partition): all G query heads of the kv head (padded
        # to GP >= 16 rows for tl.dot) against positions [part * P, min((part + 1) * P, len)).
        b = tl.program_id(0).to(tl.int64)
        kh = tl.program_id(1)
        part = tl.program_id(2)
        if PDL:
            tl.extra.cuda.gdc_wait()              # q and the new KV come from the kernel before
            tl.extra.cuda.gdc_launch_dependents()
        length = tl.load(lens + b).to(tl.int32)
        g = tl.arange(0, GP)
        dd = tl.arange(0, D)
        gmask = g < G
        qh = kh * G + g                                                        # [GP] query heads
        qv = tl.load(q + b * s_qb + qh[:, None] * s_qh + dd[None, :], mask=gmask[:, None], other=0.0)
        p_start = part * part_size
        p_end = tl.minimum(p_start + part_size, length)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        k_base = cache + kh.to(tl.int64) * s_ch
        v_base = cache + (kh + HKV).to(tl.int64) * s_ch
        for start in range(p_start, p_end, BLOCK):
            pos = start + tl.arange(0, BLOCK)                                  # [BLOCK]
            valid = pos < p_end
            blk = tl.load(table + b * s_tb + pos // BS, mask=valid, other=-1)
            valid = valid & (blk >= 0)                 # no block (e.g. a CUDA-graph padding row): skipped
            slot = blk.to(tl.int64) * BS + pos % BS
            k = tl.load(k_base + slot[:, None] * s_cs + dd[None, :], mask=valid[:, None], other=0.0)
            if F32DOT:   # fp32 cache, or the interpreter (its tl.dot multiplies bf16 bit patterns)
                s = tl.dot(qv.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(qv, tl.trans(k))                                    # [GP, BLOCK]
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)       # no valid position yet: no NaN
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + slot[:, None] * s_cs + dd[None, :], mask=valid[:, None], other=0.0)
            if F32DOT:
                pv = tl.dot(round_to(p, ROUND), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)                                  # [GP, D]
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if SINGLE:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                    # a row with nothing: 0
            o = round_to(o, ROUND).to(out.dtype.element_ty)
            tl.store(out + b * s_ob + qh[:, None] * D + dd[None, :], o, mask=gmask[:, None])
        else:
            row = (b * HQ + qh) * n_parts + part                               # [GP] into [B, Hq, NP]
            tl.store(m_buf + row, m_i, mask=gmask)
            tl.store(l_buf + row, l_i, mask=gmask)
            tl.store(acc_buf + row[:, None] * D + dd[None, :], acc, mask=gmask[:, None])

    @triton.jit
    def merge_kernel(m_buf, l_buf, acc_buf, out, s_ob, n_parts,
                     HQ: tl.constexpr, D: tl.constexpr, NPP: tl.constexpr, ROUND: tl.constexpr,
                     PDL: tl.constexpr):
        # One program per (sequence, query head): rescale each partition's partial sums to the
        # global max (log2 domain) and normalise. Empty partitions carry m = -inf, l = 0, acc = 0.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        i = tl.arange(0, NPP)
        dd = tl.arange(0, D)
        if PDL:
            tl.extra.cuda.gdc_wait()              # the partials come from the kernel before
            tl.extra.cuda.gdc_launch_dependents()
        im = i < n_parts
        row = (b * HQ + h) * n_parts + i
        m = tl.load(m_buf + row, mask=im, other=float("-inf"))
        l = tl.load(l_buf + row, mask=im, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))         # [NPP]
        w = tl.where(im, w, 0.0)
        acc = tl.load(acc_buf + row[:, None] * D + dd[None, :], mask=im[:, None], other=0.0)
        denom = tl.sum(w * l, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)     # a row with nothing: 0
        tl.store(out + b * s_ob + h * D + dd, round_to(o, ROUND).to(out.dtype.element_ty))

    interpreted = type(rope_kv_write_kernel).__name__ == "InterpretedFunction"
    return rope_kv_write_kernel, decode_attn_kernel, merge_kernel, interpreted


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  cache: torch.Tensor, hq: int, hkv: int, d: int) -> torch.Tensor:
    """qkv: [N, (Hq + 2 Hkv) * D], cos/sin: [N, 1, D] (sign-folded, as ops.rope), slot_mapping: [N],
    cache: [2 Hkv, slots, D] -> rotated q [N, Hq, D]; writes rotated k and raw v at each token's slot.

    One launch for ops.rope(q), ops.rope(k) and cache.index_copy_(1, slots, cat(k, v)^T)."""
    n = qkv.shape[0]
    assert qkv.shape[1] == (hq + 2 * hkv) * d and qkv.stride(1) == 1, "qkv must be [N, (Hq+2Hkv)*D], rows contiguous"
    assert cache.shape[0] == 2 * hkv and cache.shape[2] == d and cache.stride(2) == 1
    assert cache.dtype == qkv.dtype and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0, "head_dim must be a power of two"
    q = torch.empty(n, hq, d, dtype=qkv.dtype, device=qkv.device)              # [N, Hq, D]
    if n == 0:
        return q
    kern = _kernels()[0]
    pdl = pdl_launch(qkv.device)
    kern[(n, hq + 2 * hkv)](qkv, cos, sin, slot_mapping, cache, q,
                            qkv.stride(0), cos.stride(0), sin.stride(0), cache.stride(0), cache.stride(1),
                            q.stride(0), q.stride(1), HQ=hq, HKV=hkv, D=d, ROUND=round_mode(qkv.dtype),
                            PDL=bool(pdl), enable_fp_fusion=False, **pdl)   # no FMA: eager's rounding
    return q


def round_mode(dtype: torch.dtype) -> int:
    """round_to's mode for a model dtype: 0 fp32 (none), 1 bf16, 2 fp16."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


@functools.cache
def _target_programs(device: torch.device) -> int:
    """About two waves of programs per SM (4 on CPU under the interpreter)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def partition_size(max_ctx: int, b: int, hkv: int, device: torch.device) -> int:
    """Context positions per program: a power of two (>= MIN_PARTITION) that gives about
    _target_programs programs over (B, Hkv, partitions), at most MAX_PARTITIONS partitions."""
    want = max(1, -(-_target_programs(device) // (b * hkv)))
    p = max(MIN_PARTITION, BLOCK_N)
    while -(-max_ctx // p) > want and p < max_ctx or -(-max_ctx // p) > MAX_PARTITIONS:
        p *= 2
    return p


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, block_size: int,
                           out: torch.Tensor | None = None, part_size: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D] (one query per sequence, its KV already cached), cache: [2 Hkv, slots, D],
    block_table: [B, nblk] int (entries past a sequence's length never read; negative ones, such as
    the -1 of cuda_graphs' padding rows, are skipped: a row with no block gives 0), context_lens: [B]
    int (>= 1) -> out [B, Hq * D] in q.dtype: softmax(q K^T * scale) V over positions 0..len-1.

    fp32 accumulation, online softmax. The launch grid depends on shapes only (B, Hkv, nblk), so
    it can be captured in a CUDA graph. part_size (a multiple of 64) overrides the partition size."""
    b, hq, d = q.shape
    hkv = cache.shape[0] // 2
    assert q.dtype in (torch.bfloat16, torch.float16, torch.float32) and cache.dtype == q.dtype
    assert hq % hkv == 0 and cache.shape[2] == d and cache.stride(2) == 1 and q.stride(2) == 1
    assert d & (d - 1) == 0 and d >= 16, "head_dim must be a power of two"
    assert block_table.dim() == 2 and block_table.shape[0] == b and block_table.stride(1) == 1
    g = hq // hkv
    if out is None:
        out = torch.empty(b, hq * d, dtype=q.dtype, device=q.device)           # [B, Hq * D]
    assert out.shape == (b, hq * d) and out.stride(1) == 1
    if b == 0:
        return out
    max_ctx = block_table.shape[1] * block_size
    block_n = BLOCK_N
    p = part_size or partition_size(max_ctx, b, hkv, q.device)
    assert p % block_n == 0, "part_size must be a multiple of BLOCK_N"
    n_parts = -(-max_ctx // p)
    _, attn, merge, interpreted = _kernels()
    pdl = pdl_launch(q.device)
    single = n_parts == 1
    if single:
        m_buf = l_buf = acc_buf = out                                          # unused
    else:
        m_buf = torch.empty(b, hq, n_parts, dtype=torch.float32, device=q.device)
        l_buf = torch.empty_like(m_buf)
        acc_buf = torch.empty(b, hq, n_parts, d, dtype=torch.float32, device=q.device)
    attn[(b, hkv, n_parts)](q, cache, block_table, context_lens, out, m_buf, l_buf, acc_buf,
                            scale * 1.4426950408889634, p,
                            q.stride(0), q.stride(1), cache.stride(0), cache.stride(1),
                            block_table.stride(0), out.stride(0), n_parts,
                            HQ=hq, HKV=hkv, G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BS=block_size,
                            BLOCK=block_n, SINGLE=single,
                            F32DOT=q.dtype == torch.float32 or interpreted, ROUND=round_mode(q.dtype),
                            PDL=bool(pdl), num_warps=NUM_WARPS, num_stages=NUM_STAGES, **pdl)
    if not single:
        merge[(b, hq)](m_buf, l_buf, acc_buf, out, out.stride(0), n_parts,
                       HQ=hq, D=d, NPP=triton.next_power_of_2(n_parts), ROUND=round_mode(q.dtype),
                       PDL=bool(pdl), **pdl)
    return out


def rope_kv_write_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                        cache: torch.Tensor, hq: int, hkv: int, d: int) -> torch.Tensor:
    """The torch sequence rope_kv_write replaces (as models/llama.py + attention.paged_attention do
    it): the reference in tests and the GPU check."""
    from services.inference.engine import ops

    n = qkv.shape[0]
    qk = ops.rope(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d), cos, sin, d // 2)   # [N, Hq + Hkv, D]
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)                                       # [N, Hkv, D]
    cache.index_copy_(1, slot_mapping, torch.cat((qk[:, hq:], v), dim=1).transpose(0, 1))
    return qk[:, :hq]


def paged_decode_attention_torch(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                                 context_lens: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """Plain softmax attention per sequence in fp32 (host-synchronising: an oracle, not a fast path)."""
    b, hq, d = q.shape
    hkv = cache.shape[0] // 2
    out = []
    for i, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        slots = block_table[i, pos // block_size].long() * block_size + pos % block_size   # [L]
        k = cache[:hkv, slots].float()                                                  # [Hkv, L, D]
        v = cache[hkv:, slots].float()
        qq = q[i].float().view(hkv, hq // hkv, d)                                       # [Hkv, G, D]
        p = torch.softmax(qq @ k.transpose(1, 2) * scale, dim=-1)                       # [Hkv, G, L]
        out.append((p @ v).reshape(hq * d))
    return torch.stack(out).to(q.dtype)                                                 # [B, Hq * D]
