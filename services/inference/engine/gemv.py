"""Batch-1 GEMV in Triton: y[1, M] = x[1, K] @ w[M, K]^T for the decode step's linear layers.

Why: at batch 1 every linear layer is a pass over its weight, so the step runs at the speed of
these reads. cuBLAS picks tiles of 64 output rows for N=1 (measured on H200, docs/engine.md): the
tensor-parallel shards (o_proj 4096x2048, qkv 3072x4096) then get 48-64 thread blocks on 132 SMs,
plus split-K reduction kernels, and read at 58-72% of the copy bandwidth, against 89% for the
large gate_up. Here each program reduces BLOCK_M rows over the whole K (no split-K, no second
kernel), so even a 16 MB shard has hundreds of programs streaming it.

Accumulates in fp32 (bf16/fp16/fp32 weights); the result is rounded once to the output dtype.
`gated`: the input is the MLP's gate|up row [1, 2K] and the kernel applies silu(gate) * up (same
roundings as ops.silu_mul) as it loads it, so the down projection needs no separate SiLU kernel.
With programmatic dependent launch (triton_ops.pdl_launch, sm90+), each program loads its first
weight tile before waiting for the previous kernel: the weights never depend on it, so the load
overlaps that kernel's tail and the launch. CUDA-graph capturable (grid from shapes only, no host
syncs). triton is imported on first use, so TRITON_INTERPRET=1 (CPU tests) can be set before.
"""
from __future__ import annotations

import functools

import torch

from services.inference.engine import ops, triton_ops

# Tiles (rows per program, K per iteration, warps) from bench/gemv_gpu.py's sweep on H200: each
# within 1-3% of the best of 48 configs for every Llama-3.1-8B shard shape at TP=1 and TP=2.
LARGE_M = 12288                  # gate_up, lm_head: many rows, short K loop per program
TILE_LARGE = (16, 256, 4)
TILE_SMALL = (16, 1024, 8)       # qkv, o_proj, down_proj: fewer rows, long K loop
NUM_STAGES = 1


def tile(m: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) for an [m, k] weight; BLOCK_K no larger than k needs."""
    bm, bk, warps = TILE_LARGE if m >= LARGE_M else TILE_SMALL
    return bm, min(bk, max(16, 1 << (k - 1).bit_length())), warps


triton = tl = round_to = w_tile = x_tile = None     # set by _kernel(): jit callees resolve in module globals


@functools.cache
def _kernel():
    global triton, tl, round_to, w_tile, x_tile
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    round_to = triton_ops.jit_helpers()["round_to"]

    @triton.jit
    def w_tile(w_rows, rows, c, M, K, EVEN: tl.constexpr):
        if EVEN:                                                          # M % BM == 0, K % BK == 0
            return tl.load(w_rows + c[None, :], eviction_policy="evict_first")
        return tl.load(w_rows + c[None, :], mask=(rows[:, None] < M) & (c[None, :] < K), other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def x_tile(x_ptr, c, K, EVEN: tl.constexpr, GATED: tl.constexpr, ROUND: tl.constexpr):
        # [BK] fp32 input; GATED: x = silu(gate) * up from x_ptr = [gate K | up K] (ops.silu_mul's
        # roundings: silu rounded to the model dtype, then the product)
        if EVEN:
            x = tl.load(x_ptr + c).to(tl.float32)
        else:
            x = tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32)
        if GATED:
            if EVEN:
                up = tl.load(x_ptr + K + c).to(tl.float32)
            else:
                up = tl.load(x_ptr + K + c, mask=c < K, other=0.0).to(tl.float32)
            x = round_to(round_to(x / (1.0 + tl.exp(-x)), ROUND) * up, ROUND)
        return x

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, out_ptr, M, K, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr,
                    ROUND: tl.constexpr, PDL: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)         # [BM]
        cols = tl.arange(0, BLOCK_K)                                      # [BK]
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w            # [BM, 1]
        w = w_tile(w_rows, rows, cols, M, K, EVEN)                        # [BM, BK] first tile: weights only
        if PDL:
            tl.extra.cuda.gdc_wait()              # the previous kernel (it writes x) has finished
            tl.extra.cuda.gdc_launch_dependents()
        acc = w.to(tl.float32) * x_tile(x_ptr, cols, K, EVEN, GATED, ROUND)[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            c = k0 + cols
            w = w_tile(w_rows, rows, c, M, K, EVEN)
            acc += w.to(tl.float32) * x_tile(x_ptr, c, K, EVEN, GATED, ROUND)[None, :]
        y = tl.sum(acc, axis=1)                                           # [BM]
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < M)

    return gemv_kernel


def applies(x: torch.Tensor, w: torch.Tensor, gated: bool = False) -> bool:
    """x: [1, K] ([1, 2K] gate|up when gated) contiguous, w: [M, K] with unit stride along K, same
    dtype and device."""
    return (x.dim() == 2 and x.shape[0] == 1 and w.dim() == 2 and x.shape[1] == w.shape[1] * (2 if gated else 1)
            and x.is_contiguous() and w.stride(1) == 1 and x.dtype == w.dtype and x.device == w.device)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, block_m: int | None = None,
         block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
         gated: bool = False) -> torch.Tensor:
    """x: [1, K], w: [M, K] -> x @ w.T: [1, M] (into `out`, contiguous [1, M], when given).
    gated: x is [1, 2K] (gate | up) and the product is silu(gate) * up @ w.T."""
    kernel = _kernel()
    m, k = w.shape
    bm, bk, warps = tile(m, k)
    bm, bk, warps = block_m or bm, block_k or bk, num_warps or warps
    if out is None:
        out = torch.empty((1, m), dtype=x.dtype, device=x.device)
    pdl = triton_ops.pdl_launch(x.device)
    kernel[(triton.cdiv(m, bm),)](x, w, out, m, k, w.stride(0), BLOCK_M=bm, BLOCK_K=bk,
                                  EVEN=(m % bm == 0 and k % bk == 0), GATED=gated,
                                  ROUND=triton_ops.round_mode(x.dtype), PDL=bool(pdl),
                                  num_warps=warps, num_stages=num_stages or NUM_STAGES, **pdl)
    return out


def mm_out(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, use_gemv: bool, gated: bool = False) -> torch.Tensor:
    """out = x @ w.T (x: [N, K], w: [M, K], out: [N, M] contiguous), by the batch-1 GEMV if asked
    (the row-parallel matmuls that write into the symmetric buffer). gated: x is [N, 2K] gate|up
    and silu(gate) * up is the input."""
    if use_gemv and applies(x, w, gated):
        return gemv(x, w, out, gated=gated)
    if gated:
        x = ops.silu_mul(x, w.shape[1])
    return torch.mm(x, w.t(), out=out)
