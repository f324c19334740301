"""Parameters that load their own slice of a checkpoint tensor, FP8 block weights included.

Every parameter carries `weight_loader(param, src, shard_id)` (the engine's loader protocol,
services/inference/engine/loader.py): `src` is a safetensors slice, and only rows/cols
[start, stop) of this rank are read. Parameter names equal the checkpoint's, so the engine's
load_weights drives loading unchanged.

FP8 (R1's float8_e4m3fn + `weight_scale_inv` per 128x128 block): a Linear of an FP8 checkpoint has
a second parameter `weight_scale_inv` holding the blocks that cover this rank's slice. Whichever of
the two tensors arrives second dequantizes the weight in place (fp8 values are exact in bf16/f32),
on the loading device, so only this rank's slice is ever dequantized.

keep_fp8 (the weights stay FP8): on a CUDA GPU with a working blockwise scaled GEMM (fp8_matmul.probe)
a Linear runs FP8 tensor-core matmuls (activation quantized 1x128 per call); elsewhere, and for a
tensor-parallel slice that does not start on a 128 boundary (its block scales would straddle the
kernel's blocks), it dequantizes the weight per call (weight-only FP8). `Linear.fp8_mode` says which.
"""
from __future__ import annotations

import torch
from torch import nn

from services.inference.engine import fp8_gemv, gemv

from .fp8 import FP8, block_range, dequant_slice
from .fp8_matmul import TENSOR_CORE, WEIGHT_ONLY, blockwise_linear, prepare_weight, probe


def _slice(src, rows: tuple[int, int] | None, cols: tuple[int, int] | None) -> torch.Tensor:
    shape = list(src.get_shape()) if hasattr(src, "get_shape") else list(src.shape)
    r0, r1 = rows or (0, shape[0])
    if len(shape) == 1:
        return src[r0:r1]
    c0, c1 = cols or (0, shape[1])
    return src[r0:r1, c0:c1]


def sharded_param(shape: tuple[int, ...], dtype, device, rows=None, cols=None) -> nn.Parameter:
    """A parameter holding W[rows, cols] of a checkpoint tensor (whole dims where None)."""
    p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
    p.rows, p.cols, p.partner, p.raw_fp8, p.loaded = rows, cols, None, False, False
    p.weight_loader = _load
    return p


def _load(param: nn.Parameter, src, shard_id=None) -> None:
    t = _slice(src, param.rows, param.cols)
    if tuple(t.shape) != tuple(param.shape):
        # vocab-parallel lm_head: the last rank's rows are zero padding
        if t.dim() == 2 and t.shape[1] == param.shape[1] and t.shape[0] < param.shape[0]:
            param.data.zero_()
            param.data[:t.shape[0]].copy_(t)
            param.loaded = True
            return
        raise ValueError(f"shape mismatch: checkpoint slice {list(t.shape)} vs parameter {list(param.shape)}")
    if getattr(param, "keep_fp8", False) and t.dtype != FP8:
        raise ValueError("keep_fp8 needs an FP8 checkpoint tensor, got " + str(t.dtype))
    param.data.copy_(t)                      # float8 -> bf16/f32 is exact
    param.raw_fp8 = t.dtype == FP8
    param.loaded = True
    _maybe_dequant(param)
    _maybe_prepare(param)


class Linear(nn.Module):
    """y = x W^T for W[rows, cols] of the checkpoint; with `block`, also weight_scale_inv.

    keep_fp8 (FP8 checkpoints): W stays float8_e4m3fn in memory (1 byte per weight). fp8_mode:
      "tensor-core"                        CUDA + blockwise scaled_mm + slice on block boundaries
      "weight-only (dequantize per call)"  otherwise (fp8_reason says why)
      None                                 W is not kept in FP8
    tensor_core=False: the weight is only read through dense_weight() (MLA's absorbed kv_b_proj)."""

    def __init__(self, out_f: int, in_f: int, dtype, device, rows=None, cols=None,
                 block: tuple[int, int] | None = None, keep_fp8: bool = False, tensor_core: bool = True,
                 kernels: bool = False):
        super().__init__()
        keep_fp8 = keep_fp8 and block is not None
        self.compute_dtype = dtype
        # kernels: decode-sized inputs take engine/gemv.py (batch 1, model dtype) or
        # engine/fp8_gemv.py (FP8 slices starting on a 128 boundary, up to fp8_gemv.MAX_M rows)
        self.kernels = kernels
        self.block_aligned = (rows or (0, 0))[0] % 128 == 0 and (cols or (0, 0))[0] % 128 == 0
        self.weight = sharded_param((out_f, in_f), FP8 if keep_fp8 else dtype, device, rows, cols)
        self.weight.keep_fp8 = keep_fp8
        if block is not None:
            r = block_range(*(rows or (0, out_f)), block[0])
            c = block_range(*(cols or (0, in_f)), block[1])
            s = sharded_param((r[1] - r[0], c[1] - c[0]), torch.float32, device, r, c)
            s.partner, s.block, s.is_scale = self.weight, block, True
            self.weight.partner, self.weight.block = s, block
            s.weight_loader = _load_scale
            self.weight_scale_inv = s
        self.fp8_mode, self.fp8_reason = None, ""
        if keep_fp8:
            self.fp8_mode, self.fp8_reason = _choose_mode(torch.device(device or "cpu"), rows, cols, block,
                                                          tensor_core)
            self.weight.tc_backend = probe(device)[0] if self.fp8_mode == TENSOR_CORE else None

    def dense_weight(self) -> torch.Tensor:
        """W in the compute dtype ([out, in]); dequantized on the fly when kept in FP8."""
        w = self.weight
        if w.dtype != FP8:
            return w
        return dequant_slice(w, self.weight_scale_inv, (w.rows or (0, 0))[0], (w.cols or (0, 0))[0],
                             w.block, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.kernels and x.dim() == 2:
            if w.dtype == FP8:
                if self.block_aligned and tuple(w.block) == (128, 128) and fp8_gemv.applies(x, w, self.weight_scale_inv):
                    return fp8_gemv.fp8_linear(x, w, self.weight_scale_inv)
            elif gemv.applies(x, w):
                return gemv.gemv(x, w)
        if self.fp8_mode == TENSOR_CORE and w.dtype == FP8:
            mm = getattr(w, "gemm_operands", None) or _prepare(w)
            return blockwise_linear(x, mm[0], mm[1], w.shape[0], w.tc_backend, x.dtype)
        return torch.nn.functional.linear(x, self.dense_weight())


def _choose_mode(device: torch.device, rows, cols, block, tensor_core: bool) -> tuple[str, str]:
    if not tensor_core:
        return WEIGHT_ONLY, "read through absorbed einsums (MLA kv_b_proj), not a matmul with activations"
    if tuple(block) != (128, 128):
        return WEIGHT_ONLY, f"block {tuple(block)} is not 128x128"
    r0, c0 = (rows or (0, 0))[0], (cols or (0, 0))[0]
    if r0 % 128 or c0 % 128:
        return WEIGHT_ONLY, (f"tensor-parallel slice starts at row {r0}, column {c0}: not on a 128x128 "
                             "block boundary")
    be, reason, _ = probe(device)
    return (TENSOR_CORE, reason) if be is not None else (WEIGHT_ONLY, reason)


def _prepare(w: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and its scales in the GEMM's layout, cached on the parameter."""
    w.gemm_operands = prepare_weight(w.data, w.partner.data, w.tc_backend)
    return w.gemm_operands


def _maybe_prepare(w: nn.Parameter) -> None:
    if getattr(w, "tc_backend", None) is not None and w.loaded and w.partner is not None and w.partner.loaded:
        _prepare(w)


def _load_scale(param: nn.Parameter, src, shard_id=None) -> None:
    param.data.copy_(_slice(src, param.rows, param.cols))
    param.loaded = True
    _maybe_dequant(param.partner)
    _maybe_prepare(param.partner)


def _maybe_dequant(w: nn.Parameter) -> None:
    s = w.partner
    if s is None or getattr(w, "keep_fp8", False) or not (w.loaded and s.loaded and w.raw_fp8):
        return
    r0 = (w.rows or (0, 0))[0]
    c0 = (w.cols or (0, 0))[0]
    w.data.copy_(dequant_slice(w.data, s.data, r0, c0, w.block, w.dtype))
    w.raw_fp8 = False
    s.data = torch.empty(0, device=s.device)     # the scales are folded in: free them


def init_dummy(model: nn.Module, low: float = -0.02, high: float = 0.02) -> None:
    """Random weights of the right shapes (load_format "dummy"), seeded per parameter name so that
    replicated tensors (the router above all) are the same on every rank. Norm weights are 1 and
    the router's correction bias 0.

    FP8 weights cannot be drawn directly (no uniform_ for float8_e4m3fn): they are drawn in bf16 over
    e4m3's range and cast, and their 128x128 block scales are positive (amax / 448 of a uniform
    weight in [low, high], times 0.5-1.5 per block), so dequantized weights lie in [1.5 low, 1.5 high]
    and every kernel reads valid blocks. Tensor-core operands are prepared as a load would."""
    import zlib

    amp = max(abs(low), abs(high))
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
            if getattr(p, "is_scale", False):
                p.uniform_(0.5, 1.5, generator=g).mul_(amp / 448.0)
            elif name.endswith("norm.weight"):            # unit norms, no router bias: routing spreads
                p.fill_(1.0)                              # over experts as in a trained model (a bias
            elif name.endswith("e_score_correction_bias"):   # of +-0.02 would pick the same experts for
                p.zero_()                                 # every token of a random model)
            elif p.dtype == FP8:
                flat = p.data.view(-1) if p.data.is_contiguous() else None
                rows = [flat] if flat is not None else list(p.data.view(-1, p.shape[-1]))
                for dst in rows:
                    for i in range(0, dst.numel(), 1 << 26):          # bf16 staging in 128 MB chunks
                        part = dst[i:i + (1 << 26)]
                        tmp = torch.empty(part.shape, dtype=torch.bfloat16, device=p.device)
                        part.copy_(tmp.uniform_(-448.0, 448.0, generator=g).to(FP8))
            else:
                p.uniform_(low, high, generator=g)
            p.loaded = True
        for m in model.modules():
            if isinstance(m, Linear) and getattr(m.weight, "tc_backend", None) is not None:
                _prepare(m.weight)
