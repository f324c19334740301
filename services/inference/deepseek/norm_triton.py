"""RMSNorm and residual add + RMSNorm as one Triton kernel per call (decode rows).

Why: attention.RMSNorm in torch is ~6 kernels (cast, square, mean, rsqrt, two multiplies); a decode
layer has two of them plus the residual adds. Same arithmetic and roundings as the torch path:
r = h + d rounded to the model dtype; normalise in fp32; round; times the weight, rounded.
"""
from __future__ import annotations

import functools

import torch

from services.inference.engine import triton_ops

triton = tl = round_to = None


@functools.cache
def _kernel():
    global triton, tl, round_to
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    round_to = triton_ops.jit_helpers()["round_to"]

    @triton.jit
    def norm_kernel(h_ptr, d_ptr, w_ptr, r_ptr, y_ptr, D, eps, s_h, s_d, s_r, s_y,
                    ADD: tl.constexpr, BD: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BD)
        cm = c < D
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(h_ptr + n * s_h + c, mask=cm, other=0.0).to(tl.float32)
        if ADD:
            x = round_to(x + tl.load(d_ptr + n * s_d + c, mask=cm, other=0.0).to(tl.float32), ROUND)
            tl.store(r_ptr + n * s_r + c, x.to(r_ptr.dtype.element_ty), mask=cm)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        y = round_to(w * round_to(x * inv, ROUND), ROUND)
        tl.store(y_ptr + n * s_y + c, y.to(y_ptr.dtype.element_ty), mask=cm)

    return norm_kernel


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, D] (unit column stride) -> w * norm(x) [N, D]."""
    kern = _kernel()
    N, D = x.shape
    out = torch.empty(N, D, dtype=x.dtype, device=x.device) if out is None else out
    pdl = triton_ops.pdl_launch(x.device)
    kern[(N,)](x, x, w, x, out, D, eps, x.stride(0), 0, 0, out.stride(0), ADD=False,
               BD=triton.next_power_of_2(D), ROUND=triton_ops.round_mode(x.dtype), PDL=bool(pdl), num_warps=4, **pdl)
    return out


def add_rms_norm(h: torch.Tensor, d: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + d, w * norm(h + d)) for h, d [N, D]."""
    kern = _kernel()
    N, D = h.shape
    r = torch.empty(N, D, dtype=h.dtype, device=h.device)
    y = torch.empty_like(r)
    pdl = triton_ops.pdl_launch(h.device)
    kern[(N,)](h, d, w, r, y, D, eps, h.stride(0), d.stride(0), r.stride(0), y.stride(0), ADD=True,
               BD=triton.next_power_of_2(D), ROUND=triton_ops.round_mode(h.dtype), PDL=bool(pdl), num_warps=4, **pdl)
    return r, y
