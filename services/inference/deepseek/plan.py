"""`privlm plan`: will a DeepSeek-V3/R1 deployment fit, and how much KV cache is left?

Counts every weight from config.json alone (params.tensor_specs), places it on ranks the way the
native engine does (attention tensor parallel, routed experts expert parallel, vocab-parallel
embedding and lm_head), and sizes the MLA latent cache from what is left after a stated reserve.

Byte accounting (what the loader holds, not just what the file stores):
  fp8   FP8 tensors 1 byte/element + one float32 weight_scale_inv per 128x128 block of the rank's
        slice; embeddings, lm_head and norms bf16; router weight and bias float32 (the router runs in
        float32, as in the reference)
  bf16  every weight 2 bytes, router float32
KV cache per token: MLA stores (kv_lora_rank + qk_rope_head_dim) values per layer. Under attention
tensor parallelism every rank needs the whole latent (it feeds all heads), so the latent cache is
replicated, not split: per-rank bytes/token = full bytes/token. A conventional (non-MLA) cache would
store K (qk_nope+qk_rope) and V (v_head_dim) for every head, split across tp ranks.
Reserve: a fraction of each GPU (default 10%, as vLLM's gpu_memory_utilization=0.9) for the CUDA
context, NCCL buffers, activations of a prefill chunk and allocator fragmentation.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass

from privlm.config import ConfigError

from .config import DeepseekConfig
from .params import rank_shape, scale_shape, tensor_specs

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920, '141GB' -> 141e9; bare numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 141GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _elem_bytes(name: str, fp8: bool, dtype: str) -> int:
    if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
        return 4
    return 1 if (dtype == "fp8" and fp8) else 2


@dataclass(frozen=True)
class Plan:
    gpus: int
    gpu_mem_bytes: int
    dtype: str
    tp: int
    ep: int
    params_total: int                 # served model (no MTP)
    params_checkpoint: int            # incl. the stored MTP module(s)
    params_active_per_token: int
    weight_bytes_total: int           # one copy of the model, as held in memory
    weight_bytes_per_rank: int        # the largest rank
    scale_bytes_per_rank: int         # FP8 weight_scale_inv included in weight_bytes_per_rank
    reserve_bytes_per_rank: int
    kv_bytes_per_token: int           # MLA latent, whole model, = per rank (replicated over tp)
    kv_bytes_per_token_non_mla: int   # conventional K+V cache, whole model
    kv_bytes_per_token_non_mla_per_rank: int
    kv_budget_bytes_per_rank: int
    max_cached_tokens: int            # per attention replica (every rank holds the same tokens)
    context: int
    full_context_sequences: int
    fits: bool
    guide_min_gpu_bytes: int = 640 * 10**9


def make_plan(cfg: DeepseekConfig, gpus: int, gpu_mem: int, dtype: str = "fp8", tp: int | None = None,
              ep: int | None = None, reserve: float = 0.10, kv_bytes: int = 2,
              context: int = 131072) -> Plan:
    tp, ep = tp or gpus, ep or gpus
    if dtype not in ("fp8", "bf16"):
        raise ConfigError(f"dtype must be fp8 or bf16, got {dtype!r}")
    if gpus % tp or gpus % ep:
        raise ConfigError(f"tp ({tp}) and ep ({ep}) must divide the number of GPUs ({gpus})")
    if cfg.n_routed_experts % ep:
        raise ConfigError(f"ep ({ep}) must divide n_routed_experts ({cfg.n_routed_experts})")
    if cfg.num_attention_heads % tp:
        raise ConfigError(f"tp ({tp}) must divide num_attention_heads ({cfg.num_attention_heads})")
    if not 0 <= reserve < 1:
        raise ConfigError(f"reserve must be a fraction in [0, 1), got {reserve}")
    block = cfg.fp8_block or (128, 128)
    specs = tensor_specs(cfg, include_mtp=True)
    served = [s for s in specs if not s.mtp]
    total = sum(s.numel for s in served)
    ckpt = sum(s.numel for s in specs)
    weight_total = sum(s.numel * _elem_bytes(s.name, s.fp8, dtype) for s in served)
    if dtype == "fp8":
        weight_total += sum(4 * scale_shape(s.shape, block)[0] * scale_shape(s.shape, block)[1]
                            for s in served if s.fp8)

    per_rank, scales_rank = 0, 0
    for rank in range(gpus):
        w = sc = 0
        for s in served:
            shp = rank_shape(s, cfg, tp, ep, rank)
            if shp is None:
                continue
            n = 1
            for d in shp:
                n *= d
            w += n * _elem_bytes(s.name, s.fp8, dtype)
            if dtype == "fp8" and s.fp8:
                r, c = scale_shape(shp, block)
                sc += 4 * r * c
        if w + sc > per_rank:
            per_rank, scales_rank = w + sc, sc

    # active per token: everything but the unrouted experts (the embedding row read is negligible
    # but counted, as DeepSeek's "37B activated" does)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    routed = sum(s.numel for s in served if s.split == "expert")
    active = total - routed + (routed * k // E if E else 0)

    L = cfg.num_hidden_layers
    kv_tok = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L * kv_bytes
    nh = cfg.num_attention_heads
    kv_tok_mha = nh * (cfg.qk_head_dim + cfg.v_head_dim) * L * kv_bytes
    reserve_b = int(gpu_mem * reserve)
    budget = gpu_mem - reserve_b - per_rank
    max_tokens = max(budget, 0) // kv_tok
    return Plan(gpus=gpus, gpu_mem_bytes=gpu_mem, dtype=dtype, tp=tp, ep=ep, params_total=total,
                params_checkpoint=ckpt, params_active_per_token=active, weight_bytes_total=weight_total,
                weight_bytes_per_rank=per_rank, scale_bytes_per_rank=scales_rank,
                reserve_bytes_per_rank=reserve_b, kv_bytes_per_token=kv_tok,
                kv_bytes_per_token_non_mla=kv_tok_mha, kv_bytes_per_token_non_mla_per_rank=kv_tok_mha // tp,
                kv_budget_bytes_per_rank=budget, max_cached_tokens=max_tokens, context=context,
                full_context_sequences=max_tokens // context, fits=budget > 0 and max_tokens >= context)


def _gib(b: int) -> str:
    return f"{b / 2**30:,.2f} GiB ({b / 1e9:,.2f} GB)"


def render(p: Plan) -> str:
    lines = [
        f"deployment: {p.gpus} GPU(s) x {_gib(p.gpu_mem_bytes)}, weights {p.dtype}, tp={p.tp} ep={p.ep}",
        f"parameters: {p.params_total:,} served ({p.params_checkpoint:,} in the checkpoint incl. MTP), "
        f"{p.params_active_per_token:,} active per token",
        f"weights, one copy: {_gib(p.weight_bytes_total)}"
        f" (guide's minimum {p.guide_min_gpu_bytes / 1e9:.0f} GB of GPU memory: "
        f"{'enough' if p.guide_min_gpu_bytes >= p.weight_bytes_total else 'NOT enough'} for the weights alone)",
        f"weights per rank: {_gib(p.weight_bytes_per_rank)}"
        + (f" incl. FP8 scales {p.scale_bytes_per_rank / 2**20:,.1f} MiB" if p.dtype == "fp8" else ""),
        f"reserve per rank (activations, CUDA/NCCL, fragmentation): {_gib(p.reserve_bytes_per_rank)}",
        f"KV cache per token: MLA latent {p.kv_bytes_per_token:,} B (replicated on every tp rank); "
        f"non-MLA K+V would be {p.kv_bytes_per_token_non_mla:,} B ({p.kv_bytes_per_token_non_mla_per_rank:,} B "
        f"per rank), {p.kv_bytes_per_token_non_mla / p.kv_bytes_per_token:.1f}x more",
        f"KV budget per rank: {_gib(p.kv_budget_bytes_per_rank)} -> max cached tokens {p.max_cached_tokens:,}"
        f" = {p.full_context_sequences} sequence(s) of {p.context:,} tokens",
        f"fits: {'yes' if p.fits else 'no'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="model folder or config.json")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-mem", required=True, help="memory per GPU, e.g. 80GiB or 141GB")
    ap.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8")
    ap.add_argument("--tp", type=int, help="attention tensor-parallel size (default: --gpus)")
    ap.add_argument("--ep", type=int, help="expert-parallel size (default: --gpus)")
    ap.add_argument("--reserve", type=float, default=0.10, help="fraction of each GPU held back (0.10)")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--context", type=int, default=131072, help="tokens one sequence must fit (128k)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    try:
        cfg = DeepseekConfig.load(args.config)
        p = make_plan(cfg, args.gpus, parse_bytes(args.gpu_mem), args.dtype, args.tp, args.ep,
                      args.reserve, 1 if args.kv_dtype == "fp8" else 2, args.context)
    except ConfigError as exc:
        print(f"privlm plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(p)) if args.json else render(p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
