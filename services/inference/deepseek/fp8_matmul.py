"""FP8 tensor-core matmul for R1's block-scaled weights (keep_fp8 on a CUDA GPU).

DeepSeek's recipe: the activation is quantized per token per 128-column group (1x128 blocks, e4m3,
scale = amax / 448, float32 scales), the weight is the checkpoint's own e4m3 with one float32
`weight_scale_inv` per 128x128 block, and one blockwise scaled GEMM multiplies them with the scales
applied inside the kernel (torch's `scaled_mm` with BlockWise1x128 x BlockWise128x128, cuBLAS on
sm90; torch < 2.10 spells it `torch._scaled_mm` and infers the recipe from the scale shapes).

Layouts cuBLAS wants (torch's own blockwise tests):
  activation scales  [M, K/128] float32, outer-dim-major (stride (1, M)): `s.t().contiguous().t()`
  weight scales      [L4, ceil(N/128)] with L = K/128 rounded up to 4 (zero-padded), stride (1, L4):
                     the checkpoint's [ceil(N/128), L] padded to L4 columns, then `.t()`
  weight             W [N, K] row-major passed as `W.t()` (column-major B operand)
K must be a multiple of 128 (odd K is zero-padded here, activation and weight alike) and the
scales of a tensor-parallel slice must start on a block boundary (weights.Linear checks that).
The exact variant that works on a given torch/GPU (API, L4 padding, M alignment) is probed once per
device against `fp8_block_matmul_reference`, so a layout mismatch falls back loudly to weight-only
FP8 instead of computing garbage.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from math import ceil

import torch
import torch.nn.functional as F

from .fp8 import FP8, FP8_MAX, dequant_slice

log = logging.getLogger(__name__)
BLOCK = 128
TENSOR_CORE = "tensor-core"
WEIGHT_ONLY = "weight-only (dequantize per call)"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def quantize_act_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (q [M, Kp] float8_e4m3fn, scales [M, Kp/128] float32), Kp = K rounded up to 128.

    q * scale reproduces x within e4m3 rounding; scale = amax / 448 of each 1x128 group (a zero group
    gets a tiny scale, so q = 0 there)."""
    M, K = x.shape
    Kp = _round_up(K, BLOCK)
    xf = x.float()
    if Kp != K:
        xf = F.pad(xf, (0, Kp - K))
    g = xf.view(M, Kp // BLOCK, BLOCK)                                      # [M, G, 128]
    s = g.abs().amax(-1).clamp(min=1e-12) / FP8_MAX                         # [M, G]
    q = (g / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(M, Kp), s


def dequant_act_1x128(q: torch.Tensor, s: torch.Tensor, K: int | None = None) -> torch.Tensor:
    """Inverse of quantize_act_1x128 (float32 [M, K])."""
    M, Kp = q.shape
    a = (q.float().view(M, Kp // BLOCK, BLOCK) * s.float().unsqueeze(-1)).view(M, Kp)
    return a[:, :K or Kp]


def fp8_block_matmul_reference(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                               block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """What the tensor-core path computes, in plain torch: x [..., K] quantized 1x128 and W [N, K]
    (e4m3 + [ceil(N/128), ceil(K/128)] scales) both dequantized, multiplied in float32 -> [..., N]."""
    lead, K = x.shape[:-1], x.shape[-1]
    q, s = quantize_act_1x128(x.reshape(-1, K))
    a = dequant_act_1x128(q, s, K)                                          # [M, K]
    w = dequant_slice(w_fp8, scale_inv, block=block, dtype=torch.float32)   # [N, K]
    return (a @ w.t()).view(*lead, w.shape[0])


# -- the kernel -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    api: str          # "F.scaled_mm" | "torch._scaled_mm" | "emulate" (CPU tests of the layouts)
    pad_l4: bool      # weight scales' K-block count padded to a multiple of 4
    m_align: int      # activation rows padded to a multiple of this


_PROBED: dict[str, tuple[Backend | None, str, list[str]]] = {}   # device -> (backend, reason, tried)


def _apis() -> list[str]:
    out = []
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        out.append("F.scaled_mm")
    if hasattr(torch, "_scaled_mm"):
        out.append("torch._scaled_mm")
    return out


def prepare_weight(w: torch.Tensor, scale_inv: torch.Tensor, be: Backend) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] e4m3 + scales [ceil(N/128), ceil(K/128)] -> (W padded to [N16, K128] (a copy only when
    N % 16 or K % 128), weight scales in the kernel's layout [L(4), ceil(N/128)], stride (1, L4))."""
    N, K = w.shape
    Np, Kp = _round_up(N, 16), _round_up(K, BLOCK)
    if (Np, Kp) != (N, K):            # zero bytes are +0.0 in e4m3; pad through uint8 (no fp8 pad kernel)
        w = F.pad(w.view(torch.uint8), (0, Kp - K, 0, Np - N)).view(FP8)
    s = scale_inv.float()[:ceil(Np / BLOCK), :Kp // BLOCK]
    if be.pad_l4:
        s = F.pad(s, (0, (-s.shape[1]) % 4))
    return w.contiguous(), outer_major(s.t())                               # [L(4), Nb], stride (1, L(4))


def outer_major(s: torch.Tensor) -> torch.Tensor:
    """A copy of s [R, C] with strides exactly (1, R) (column-major), also when R or C is 1, where
    `.t().contiguous().t()` would keep ambiguous row-major strides."""
    out = torch.empty_strided(s.shape, (1, s.shape[0]), dtype=s.dtype, device=s.device)
    return out.copy_(s)


def _mm(be: Backend, a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    if be.api == "emulate":
        return _emulated_mm(a, sa, w, sb)
    if be.api == "F.scaled_mm":
        st = F.ScalingType
        return F.scaled_mm(a, w.t(), sa, st.BlockWise1x128, sb, st.BlockWise128x128, output_dtype=torch.bfloat16)
    return torch._scaled_mm(a, w.t(), sa, sb, out_dtype=torch.bfloat16)


def _emulated_mm(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """The kernel's contract in float32, reading the scales in the kernel's layouts: a [M, Kp] with
    sa [M, G]; w [Np, Kp] with sb [>= G, ceil(Np/128)] (column j of sb: weight row block j). Lets CPU
    tests check prepare_weight/blockwise_linear's padding and layouts; never used for serving."""
    M, Kp = a.shape
    G = Kp // BLOCK
    assert sa.shape == (M, G) and sa.stride() == (1, M), (sa.shape, sa.stride())
    assert sb.shape[0] >= G and sb.stride() == (1, sb.shape[0]), (sb.shape, sb.stride())
    af = (a.float().view(M, G, BLOCK) * sa.unsqueeze(-1)).view(M, Kp)
    sw = sb[:G].t().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:w.shape[0]]   # [Np, Kp]
    return (af @ (w.float() * sw).t()).to(torch.bfloat16)


def blockwise_linear(x: torch.Tensor, w: torch.Tensor, sb: torch.Tensor, n_out: int, be: Backend,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] @ W^T on FP8 tensor cores; (w, sb) from prepare_weight. No host synchronisation
    (CUDA-graph capturable): quantize (a few elementwise kernels) + one GEMM."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                                   # [M, K]
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*lead, n_out, dtype=out_dtype)
    Mp = _round_up(M, be.m_align)
    if Mp != M:
        x2 = F.pad(x2, (0, 0, 0, Mp - M))
    q, sa = quantize_act_1x128(x2)                                          # [Mp, Kp], [Mp, G]
    y = _mm(be, q, outer_major(sa), w, sb)                                  # [Mp, Np] bf16
    return y[:M, :n_out].to(out_dtype).reshape(*lead, n_out)


def probe(device: torch.device | str) -> tuple[Backend | None, str, list[str]]:
    """Find the blockwise scaled-mm variant that works on `device` (cached per device).

    Each candidate runs N=256, K=384 (K blocks 3: exercises the L4 padding) at M=3 and M=1 (row
    alignment, decode) and must match fp8_block_matmul_reference within 2% of its largest value
    (bf16 output: ~0.4% expected). Returns (backend or None, reason, one line per candidate tried)."""
    dev = torch.device(device)
    key = str(dev)
    if key in _PROBED:
        return _PROBED[key]
    tried: list[str] = []
    result: tuple[Backend | None, str] = (None, "")
    if dev.type != "cuda":
        result = (None, f"no FP8 tensor cores on {dev.type}")
    elif not _apis():
        result = (None, f"torch {torch.__version__} has no scaled_mm")
    else:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(3, 384, generator=g).to(dev, torch.bfloat16)
        from .fp8 import quantize_block
        wq, ws = quantize_block(torch.randn(256, 384, generator=g) * 0.05)
        wq, ws = wq.to(dev), ws.to(dev)
        ref = fp8_block_matmul_reference(x, wq, ws)
        for api in _apis():
            for pad_l4 in (True, False):
                for m_align in (1, 16):
                    be = Backend(api, pad_l4, m_align)
                    try:
                        wp, sb = prepare_weight(wq, ws, be)
                        y = torch.cat([blockwise_linear(x, wp, sb, 256, be, torch.float32),
                                       blockwise_linear(x[:1], wp, sb, 256, be, torch.float32)])
                        want = torch.cat([ref, ref[:1]])
                        err = float((y - want).abs().max() / want.abs().max())
                        tried.append(f"{be}: rel err {err:.2e}")
                        if err < 2e-2:
                            result = (be, f"{api} blockwise 1x128 x 128x128 (pad_l4={pad_l4}, m_align={m_align})")
                            break
                    except Exception as exc:  # noqa: BLE001 - each failing variant is reported, not raised
                        tried.append(f"{be}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
                if result[0] is not None:
                    break
            if result[0] is not None:
                break
        if result[0] is None:
            result = (None, "no blockwise scaled_mm variant worked on this GPU: " + " | ".join(tried)[:600])
    _PROBED[key] = (result[0], result[1], tried)
    if dev.type == "cuda":
        (log.info if result[0] else log.warning)("FP8 blockwise matmul on %s: %s", key, result[1])
    return _PROBED[key]
