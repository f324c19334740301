"""Small elementwise blocks of the decoder, kept in one place so that they can be fused.

Eager by default (same arithmetic as transformers). On CUDA the runner calls `enable_compile()`,
which swaps in torch.compile'd versions: each block becomes one fused kernel instead of 4-8,
which matters at batch 1 where a decode step is ~1000 tiny kernels besides the GEMVs.
Callers must look functions up through the module (`ops.rms_norm(...)`) so that the swap applies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, scale in the model dtype."""
    # F.rms_norm on the fp32 copy is the same arithmetic (x * rsqrt(mean(x^2) + eps)) in one call.
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float):
    """(norm(residual + x), residual + x): the residual add fused with the next norm."""
    r = residual + x
    return rms_norm(r, w, eps), r


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """x: [N, H, D]; cos/sin: [N, 1, D] with rotate_half's sign folded into sin."""
    return x * cos + torch.roll(x, half, dims=-1) * sin


def silu_mul(gu: torch.Tensor, inter: int) -> torch.Tensor:
    """gu: [N, 2 * I] (gate | up) -> silu(gate) * up: [N, I]."""
    return F.silu(gu[:, :inter]) * gu[:, inter:]


def attn_softmax(s: torch.Tensor, scale: float, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Scaled, masked softmax in fp32, returned in the model dtype."""
    s = s.float() * scale
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1).to(dtype)


_EAGER = {name: globals()[name] for name in ("rms_norm", "add_rms_norm", "rope", "silu_mul", "attn_softmax")}


def enable_compile() -> None:
    g = globals()
    for name, fn in _EAGER.items():
        g[name] = torch.compile(fn, dynamic=True, fullgraph=True)


def disable_compile() -> None:
    globals().update(_EAGER)
