"""Small-batch matmul over FP8 e4m3 weights with 128x128 block scales: y = x @ (W * S)^T.

Why: at decode batch 1-64 a linear layer is one pass over its weight, so FP8 weights halve the
bytes of bf16. cuBLAS's blockwise scaled GEMM needs the activation quantized first (extra kernels)
and measured slower than bf16 on small shapes (docs/deepseek.md). Here the weight is dequantized in
registers as it streams (e4m3 values times their float32 block scale, both exact in fp32), the
activation stays in the model dtype and the sum is fp32: the same function as
F.linear(x, dequant(W)) up to summation order, without FP8 activation error.

Layouts: w [N, K] float8_e4m3fn row-major; s [ceil(N/128), ceil(K/128)] float32 (R1's
`weight_scale_inv`, the block covering rows row0.. of the slice starting at scale row 0; slices
must start on a 128 boundary); x [M, K] in bf16/fp16/fp32; y [M, N] in x's dtype.
M == 1: multiply-and-reduce, the block scale folded into x per 128 columns (one program per
BLOCK_N rows, each inside one scale row block). M > 1: tl.dot per 128-column block, the partial
product scaled. CUDA-graph capturable (grid from shapes only); triton is imported on first use.
"""
from __future__ import annotations

import functools

import torch

from services.inference.engine import triton_ops

MAX_M = 64          # larger batches take the tensor-core scaled_mm path (fp8_matmul.py)
triton = tl = None


@functools.cache
def _kernels():
    global triton, tl
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w, stride_s,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # one program: BLOCK_N output rows (inside one 128-row scale block) over the whole K
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)            # [BN]
        rb = (tl.program_id(0) * BLOCK_N) // 128
        cols = tl.arange(0, BLOCK_K)                                         # [BK]
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
        rmask = rows < N
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            cm = c < K
            w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + c, mask=cm, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + rb * stride_s + c // 128, mask=cm, other=0.0)
            acc += w.to(tl.float32) * (x * s)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_s, stride_y,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32DOT: tl.constexpr, PDL: tl.constexpr):
        # one program: BLOCK_M rows of x times BLOCK_N weight rows, 128 columns (one scale) per step
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)            # [BN] weight rows
        rb = (tl.program_id(0) * BLOCK_N) // 128
        t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)               # [BM] x rows
        cols = tl.arange(0, 128)
        rmask, tmask = rows < N, t < M
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
        x_rows = x_ptr + t.to(tl.int64)[:, None] * stride_x
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, 128):
            c = k0 + cols
            cm = c < K
            w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0,
                        eviction_policy="evict_first")                       # [BN, 128] e4m3
            x = tl.load(x_rows + c[None, :], mask=tmask[:, None] & cm[None, :], other=0.0)   # [BM, 128]
            if F32DOT:
                part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(w.to(x.dtype)))                     # [BM, BN] fp32
            acc += part * tl.load(s_ptr + rb * stride_s + k0 // 128)
        tl.store(y_ptr + t.to(tl.int64)[:, None] * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=tmask[:, None] & rmask[None, :])

    interpreted = type(gemv_kernel).__name__ == "InterpretedFunction"
    return gemv_kernel, mm_kernel, interpreted


def applies(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> bool:
    """x [M <= MAX_M, K] with unit column stride, w [N, K] e4m3 row-major, s [ceil(N/128), >= ceil(K/128)]."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_M and w.dim() == 2 and w.dtype == torch.float8_e4m3fn
            and x.shape[1] == w.shape[1] and x.stride(1) == 1 and w.stride(1) == 1 and s.dim() == 2
            and s.stride(1) == 1 and s.shape[0] * 128 >= w.shape[0] and s.shape[1] * 128 >= w.shape[1]
            and s.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.device == w.device == s.device)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (w [N, K] e4m3 * block scales s)^T -> [M, N] in x.dtype (see the module doc)."""
    gemv_k, mm_k, interpreted = _kernels()
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pdl = triton_ops.pdl_launch(x.device)
    if M == 1:
        bn = 16 if N >= 4096 else 8
        gemv_k[(triton.cdiv(N, bn),)](x, w, s, out, N, K, w.stride(0), s.stride(0), BLOCK_N=bn, BLOCK_K=512,
                                      PDL=bool(pdl), num_warps=4, **pdl)
    else:
        bm = max(16, triton.next_power_of_2(M))
        bn = 64 if N >= 4096 else 32
        mm_k[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
            x, w, s, out, M, N, K, x.stride(0), w.stride(0), s.stride(0), out.stride(0), BLOCK_M=bm, BLOCK_N=bn,
            F32DOT=x.dtype == torch.float32 or interpreted, PDL=bool(pdl), num_warps=4, **pdl)
    return out
