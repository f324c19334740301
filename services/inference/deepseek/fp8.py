"""FP8 e4m3 weights with 128x128 block scales, as DeepSeek-V3/R1 ship.

Convention (DeepSeek's own `weight_dequant`): for each block of the 2-D weight,
    w_real = w_fp8.float() * weight_scale_inv[block_row, block_col]
so `weight_scale_inv` is the per-block multiplier (amax / 448 when quantizing), float32,
shape [ceil(out / 128), ceil(in / 128)].

The loader dequantizes each rank's slice on CPU at load time (`dequant_slice`), so a rank only
ever holds its own part in the serving dtype. `quantize_checkpoint` builds FP8 test checkpoints
from a bf16/fp32 folder with exactly R1's layout (same keys + `*.weight_scale_inv`,
`quantization_config` in config.json).
"""
from __future__ import annotations

import json
import shutil
from math import ceil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DeepseekConfig
from .params import tensor_specs

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_SUFFIX = "_scale_inv"     # "x.weight" -> "x.weight_scale_inv"


def quantize_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] float -> (q: [out, in] float8_e4m3fn, scale_inv: [ceil(out/b0), ceil(in/b1)] f32)."""
    out, inn = w.shape
    b0, b1 = block
    R, C = ceil(out / b0), ceil(inn / b1)
    padded = torch.zeros(R * b0, C * b1, dtype=torch.float32, device=w.device)
    padded[:out, :inn] = w.float()
    blocks = padded.view(R, b0, C, b1)                                    # [R, b0, C, b1]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)                 # [R, C]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(R * b0, C * b1)[:out, :inn].contiguous(), scale_inv.contiguous()


def dequant_slice(q: torch.Tensor, scale_inv: torch.Tensor, row0: int = 0, col0: int = 0,
                  block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize q = W[row0:row0+r, col0:col0+c] given the scale rows/cols covering it.

    scale_inv: the block scales starting at block (row0 // b0, col0 // b1), at least enough blocks
    to cover the slice. Works for whole tensors (row0 = col0 = 0) and for tp slices that do not
    start on a block boundary.
    """
    r, c = q.shape
    b0, b1 = block
    oy, ox = row0 - (row0 // b0) * b0, col0 - (col0 // b1) * b1
    s = scale_inv.float().repeat_interleave(b0, 0).repeat_interleave(b1, 1)   # [R*b0, C*b1]
    s = s[oy:oy + r, ox:ox + c]
    return (q.float() * s).to(dtype)


def block_range(start: int, stop: int, b: int) -> tuple[int, int]:
    """Scale indices [start//b, ceil(stop/b)) covering weight indices [start, stop)."""
    return start // b, ceil(stop / b)


def quantize_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Write an FP8 copy of a DeepSeek-V3 folder with R1's layout; returns dst.

    The tensors R1 stores in FP8 (every linear weight of the decoder layers except the router)
    become float8_e4m3fn + float32 `weight_scale_inv`; the rest keep their dtype.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    d = json.loads((src / "config.json").read_text())
    fp8_names = {s.name for s in tensor_specs(DeepseekConfig.from_dict(d), include_mtp=True) if s.fp8}
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                if k in fp8_names:
                    q, s = quantize_block(t, block)
                    out[k], out[k + SCALE_SUFFIX] = q, s
                else:
                    out[k] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(d, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return dst


def dequantize_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """FP8 folder -> plain folder (the reference the FP8 load is compared with)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    d = json.loads((src / "config.json").read_text())
    block = tuple((d.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            keys = set(sf.keys())
            for k in keys:
                if k.endswith(SCALE_SUFFIX):
                    continue
                t = sf.get_tensor(k)
                if t.dtype == FP8:
                    t = dequant_slice(t, sf.get_tensor(k + SCALE_SUFFIX), block=block, dtype=dtype)
                out[k] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    d.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(d, indent=2))
    return dst

