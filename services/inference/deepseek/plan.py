"""`privlm plan`: will a deployment fit, and how much KV cache is left?

Counts every weight from config.json alone and places it on ranks the way the native engine does.
DeepSeek-V3/R1 (params.tensor_specs): attention tensor parallel, routed experts expert parallel,
vocab-parallel embedding and lm_head; the MLA latent cache is sized from what is left after a
stated reserve. Llama-family dense models (LlamaForCausalLM, Qwen2ForCausalLM): q/k/v split by
heads (KV heads as evenly as possible, replicated when there are fewer than ranks), MLP and
vocabulary split by tp, as engine/layers.py does; the cache holds K and V of the rank's KV heads.

Byte accounting (what the loader holds, not just what the file stores):
  fp8   FP8 tensors 1 byte/element + one float32 weight_scale_inv per 128x128 block of the rank's
        slice; embeddings, lm_head and norms bf16; router weight and bias float32 (the router runs in
        float32, as in the reference). DeepSeek only: dense models have no FP8 loader.
  bf16  every weight 2 bytes, router float32
KV cache per token: MLA stores (kv_lora_rank + qk_rope_head_dim) values per layer. Under attention
tensor parallelism every rank needs the whole latent (it feeds all heads), so the latent cache is
replicated, not split: per-rank bytes/token = full bytes/token. A conventional (non-MLA) cache
stores K and V (head_dim each; DeepSeek: qk_nope+qk_rope and v_head_dim) for every KV head, split
across tp ranks.
Reserve: a fraction of each GPU (default 10%, as vLLM's gpu_memory_utilization=0.9) for the CUDA
context, NCCL buffers, activations of a prefill chunk and allocator fragmentation.
Exit status: 0 fits, 1 does not fit, 2 bad input (arguments or config.json).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from privlm.base.config import ConfigError

from .config import ARCHITECTURES, DeepseekConfig
from .params import rank_shape, scale_shape, tensor_specs

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DENSE = ("LlamaForCausalLM", "Qwen2ForCausalLM")
SUPPORTED = (*ARCHITECTURES, *DENSE)
# config.json without `architectures`: the model_type names it (transformers does the same)
_MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Bounds that keep the arithmetic (one entry per layer and expert) from running away on a bad file.
_MAX_LAYERS, _MAX_EXPERTS = 10_000, 100_000


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
    architecture: str
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
    kv_cache: str                     # "mla" (latent, replicated over tp) or "kv" (K+V per KV head)
    kv_bytes_per_token: int           # the cache actually used, whole model
    kv_bytes_per_token_per_rank: int  # what sizes max_cached_tokens (MLA: = kv_bytes_per_token)
    kv_bytes_per_token_non_mla: int   # conventional K+V cache, whole model
    kv_bytes_per_token_non_mla_per_rank: int
    kv_budget_bytes_per_rank: int
    max_cached_tokens: int            # per attention replica (every rank holds the same tokens)
    context: int
    full_context_sequences: int
    fits: bool
    guide_min_gpu_bytes: int = 640 * 10**9   # the deployment guide's R1 figure (DeepSeek only)


def _check_deployment(gpus: int, gpu_mem: int, tp: int, ep: int, reserve: float, kv_bytes: int,
                      context: int) -> None:
    """Refuse figures no deployment has, before any arithmetic divides by them."""
    for name, value in (("gpus", gpus), ("tp", tp), ("ep", ep), ("context", context), ("gpu_mem", gpu_mem)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if gpus % tp or gpus % ep:
        raise ConfigError(f"tp ({tp}) and ep ({ep}) must divide the number of GPUs ({gpus})")
    if not 0 <= reserve < 1:
        raise ConfigError(f"reserve must be a fraction in [0, 1), got {reserve}")
    if kv_bytes not in (1, 2):
        raise ConfigError(f"kv_bytes must be 1 (fp8) or 2 (bf16), got {kv_bytes!r}")


def _budget(gpu_mem: int, reserve: float, per_rank: int, kv_rank: int, context: int) -> dict[str, Any]:
    reserve_b = int(gpu_mem * reserve)
    budget = gpu_mem - reserve_b - per_rank
    max_tokens = max(budget, 0) // kv_rank
    return dict(reserve_bytes_per_rank=reserve_b, kv_budget_bytes_per_rank=budget, max_cached_tokens=max_tokens,
                context=context, full_context_sequences=max_tokens // context,
                fits=budget > 0 and max_tokens >= context)


def make_plan(cfg: DeepseekConfig, gpus: int, gpu_mem: int, dtype: str = "fp8", tp: int | None = None,
              ep: int | None = None, reserve: float = 0.10, kv_bytes: int = 2,
              context: int = 131072) -> Plan:
    tp, ep = tp or gpus, ep or gpus
    if dtype not in ("fp8", "bf16"):
        raise ConfigError(f"dtype must be fp8 or bf16, got {dtype!r}")
    _check_deployment(gpus, gpu_mem, tp, ep, reserve, kv_bytes, context)
    if cfg.n_routed_experts % ep:
        raise ConfigError(f"ep ({ep}) must divide n_routed_experts ({cfg.n_routed_experts})")
    if cfg.num_attention_heads % tp:
        raise ConfigError(f"tp ({tp}) must divide num_attention_heads ({cfg.num_attention_heads})")
    block = cfg.fp8_block or (128, 128)
    specs = tensor_specs(cfg, include_mtp=True)
    served = [s for s in specs if not s.mtp]
    total = sum(s.numel for s in served)
    ckpt = sum(s.numel for s in specs)
    weight_total = sum(s.numel * _elem_bytes(s.name, s.fp8, dtype) for s in served)
    if dtype == "fp8":
        weight_total += sum(4 * scale_shape(s.shape, block)[0] * scale_shape(s.shape, block)[1]
                            for s in served if s.fp8)

    def held(spec, rank) -> tuple[int, int]:
        """(weight bytes incl. scales, scale bytes) of one tensor on `rank`."""
        shp = rank_shape(spec, cfg, tp, ep, rank)
        if shp is None:
            return 0, 0
        sc = 0
        if dtype == "fp8" and spec.fp8:
            r, c = scale_shape(shp, block)
            sc = 4 * r * c
        return math.prod(shp) * _elem_bytes(spec.name, spec.fp8, dtype) + sc, sc

    # A rank's tensors depend on its tp rank (everything but routed experts) and its ep rank
    # (routed experts): sum each part once per distinct rank, then take the largest rank.
    by_tp = [[0, 0] for _ in range(tp)]
    by_ep = [[0, 0] for _ in range(ep)]
    per_expert = max(cfg.n_routed_experts // ep, 1)
    for s in served:
        if s.split == "expert":   # only the owning ep rank holds it
            parts = [(by_ep[s.expert // per_expert], s.expert // per_expert)]
        else:
            parts = [(by_tp[r], r) for r in range(tp)]
        for acc, r in parts:
            w, sc = held(s, r)
            acc[0] += w
            acc[1] += sc
    per_rank, scales_rank = 0, 0
    for rank in range(gpus):
        a, b = by_tp[rank % tp], by_ep[rank % ep]
        if a[0] + b[0] > per_rank:
            per_rank, scales_rank = a[0] + b[0], a[1] + b[1]

    # active per token: everything but the unrouted experts (the embedding row read is negligible
    # but counted, as DeepSeek's "37B activated" does)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    routed = sum(s.numel for s in served if s.split == "expert")
    active = total - routed + (routed * k // E if E else 0)

    L = cfg.num_hidden_layers
    kv_tok = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L * kv_bytes
    nh = cfg.num_attention_heads
    kv_tok_mha = nh * (cfg.qk_head_dim + cfg.v_head_dim) * L * kv_bytes
    return Plan(architecture="DeepseekV3ForCausalLM", gpus=gpus, gpu_mem_bytes=gpu_mem, dtype=dtype, tp=tp,
                ep=ep, params_total=total, params_checkpoint=ckpt, params_active_per_token=active,
                weight_bytes_total=weight_total, weight_bytes_per_rank=per_rank, scale_bytes_per_rank=scales_rank,
                kv_cache="mla", kv_bytes_per_token=kv_tok, kv_bytes_per_token_per_rank=kv_tok,
                kv_bytes_per_token_non_mla=kv_tok_mha, kv_bytes_per_token_non_mla_per_rank=kv_tok_mha // tp,
                **_budget(gpu_mem, reserve, per_rank, kv_tok, context))


def _split(n: int, parts: int, rank: int) -> int:
    """Length of rank's part of n split as evenly as possible (engine/layers.py partition)."""
    base, extra = divmod(n, parts)
    return base + (1 if rank < extra else 0)


def make_dense_plan(d: dict[str, Any], gpus: int, gpu_mem: int, dtype: str = "bf16", tp: int | None = None,
                    ep: int | None = None, reserve: float = 0.10, kv_bytes: int = 2,
                    context: int = 131072) -> Plan:
    """A Llama-family config.json (a validated mapping, see read_config) on `gpus` GPUs."""
    arch = architecture_of(d)
    tp, ep = tp or gpus, ep or 1
    if dtype != "bf16":
        raise ConfigError(f"dtype {dtype!r}: {arch} weights are planned as bf16 (FP8 planning is for "
                          "DeepSeek's block-FP8 checkpoints)")
    if ep != 1:
        raise ConfigError(f"ep ({ep}): {arch} has no routed experts to place (use --tp)")
    _check_deployment(gpus, gpu_mem, tp, ep, reserve, kv_bytes, context)
    H, V, L, I = d["hidden_size"], d["vocab_size"], d["num_hidden_layers"], d["intermediate_size"]
    nh = d["num_attention_heads"]
    nkv = d.get("num_key_value_heads") or nh
    hd = d.get("head_dim") or H // nh
    if nh % nkv:
        raise ConfigError(f"num_attention_heads ({nh}) must be a multiple of num_key_value_heads ({nkv})")
    if nkv < tp and (tp % nkv or nh % tp):
        raise ConfigError(f"cannot split {nh} heads / {nkv} KV heads over tp={tp} ranks")
    qwen2 = arch == "Qwen2ForCausalLM"
    if qwen2 and d.get("use_sliding_window"):
        raise ConfigError("Qwen2 sliding-window attention is not supported by the engine")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {d.get('hidden_act')!r} is not supported by the engine (silu is)")
    qkv_bias = True if qwen2 else bool(d.get("attention_bias", False))
    o_bias = False if qwen2 else bool(d.get("attention_bias", False))
    mlp_bias = False if qwen2 else bool(d.get("mlp_bias", False))
    tied = bool(d.get("tie_word_embeddings", False))

    def layer(q: int, kv: int, inter: int, o_in: int) -> int:
        """Parameters of one decoder layer holding q query heads, kv KV heads, `inter` MLP rows."""
        qkv = (q + 2 * kv) * hd
        return (qkv * H + qkv * qkv_bias + H * o_in + H * o_bias + 3 * H * inter
                + (2 * inter + H) * mlp_bias + 2 * H)

    total = V * H * (1 if tied else 2) + L * layer(nh, nkv, I, nh * hd) + H
    per_rank, kv_heads_rank = 0, 0
    for r in range(tp):                      # the rank's slice, as QKVParallelLinear places heads
        if nkv >= tp:
            kv = _split(nkv, tp, r)
            q = kv * (nh // nkv)
        else:
            kv, q = 1, nh // tp
        shard = -(-V // tp)                  # vocab shards are padded to equal size
        params = shard * H * (1 if tied else 2) + L * layer(q, kv, _split(I, tp, r), q * hd) + H
        per_rank, kv_heads_rank = max(per_rank, 2 * params), max(kv_heads_rank, kv)
    kv_tok = 2 * nkv * hd * L * kv_bytes
    kv_rank = 2 * kv_heads_rank * hd * L * kv_bytes
    return Plan(architecture=arch, gpus=gpus, gpu_mem_bytes=gpu_mem, dtype=dtype, tp=tp, ep=ep,
                params_total=total, params_checkpoint=total, params_active_per_token=total,
                weight_bytes_total=2 * total, weight_bytes_per_rank=per_rank, scale_bytes_per_rank=0,
                kv_cache="kv", kv_bytes_per_token=kv_tok, kv_bytes_per_token_per_rank=kv_rank,
                kv_bytes_per_token_non_mla=kv_tok, kv_bytes_per_token_non_mla_per_rank=kv_rank,
                guide_min_gpu_bytes=0, **_budget(gpu_mem, reserve, per_rank, kv_rank, context))


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a model folder's config.json, refused with a ConfigError when unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def architecture_of(d: dict[str, Any]) -> str:
    """The architecture config.json names (architectures[0], else model_type), if it can be planned."""
    archs, model_type = d.get("architectures"), d.get("model_type")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"config.json: architectures must be a list of names, got {archs!r}")
    arch = archs[0] if archs else _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if arch not in SUPPORTED:
        found = f"architecture {arch!r}" if arch else "no architecture"
        raise ConfigError(f"config.json names {found} (model_type {model_type!r}); "
                          f"privlm plan supports {', '.join(SUPPORTED)}")
    return arch


def _need_ints(d: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = (),
               minimum: int = 1) -> None:
    """Every named field an integer >= minimum (optional ones may be absent or null)."""
    for name in required + optional:
        value = d.get(name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "missing" if name not in d else f"{value!r}"
            raise ConfigError(f"config.json: {name} must be an integer >= {minimum}, got {what}")


_DEEPSEEK_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                   "max_position_embeddings")
_DEEPSEEK_COUNTS = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace",
                    "num_nextn_predict_layers")
_DENSE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def load_model_config(path: str | Path) -> tuple[str, DeepseekConfig | dict[str, Any]]:
    """(architecture, config) for make_plan (DeepSeek) or make_dense_plan (mapping); ConfigError if bad."""
    d = read_config(path)
    arch = architecture_of(d)
    if arch in DENSE:
        _need_ints(d, _DENSE_SIZES, ("num_key_value_heads", "head_dim"))
    else:
        _need_ints(d, _DEEPSEEK_SIZES, ("q_lora_rank", "moe_layer_freq", "n_group", "topk_group"))
        _need_ints(d, (), _DEEPSEEK_COUNTS, minimum=0)
    if d["num_hidden_layers"] > _MAX_LAYERS or (d.get("n_routed_experts") or 0) > _MAX_EXPERTS:
        raise ConfigError(f"config.json: more than {_MAX_LAYERS} layers or {_MAX_EXPERTS} experts")
    if arch in DENSE:
        return arch, d
    try:
        return arch, DeepseekConfig.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:   # ConfigError is a ValueError: keep its message
        raise ConfigError(str(exc) if isinstance(exc, ConfigError) else f"config.json: bad or missing {exc}") from None


def _gib(b: int) -> str:
    return f"{b / 2**30:,.2f} GiB ({b / 1e9:,.2f} GB)"


def _kv_line(p: Plan) -> str:
    if p.kv_cache == "kv":
        return (f"KV cache per token: K+V {p.kv_bytes_per_token:,} B "
                f"({p.kv_bytes_per_token_per_rank:,} B on the largest rank)")
    return (f"KV cache per token: MLA latent {p.kv_bytes_per_token:,} B (replicated on every tp rank); "
            f"non-MLA K+V would be {p.kv_bytes_per_token_non_mla:,} B ({p.kv_bytes_per_token_non_mla_per_rank:,} B "
            f"per rank), {p.kv_bytes_per_token_non_mla / p.kv_bytes_per_token:.1f}x more")


def render(p: Plan) -> str:
    weights = f"weights, one copy: {_gib(p.weight_bytes_total)}"
    if p.guide_min_gpu_bytes:
        weights += (f" (guide's minimum {p.guide_min_gpu_bytes / 1e9:.0f} GB of GPU memory: "
                    f"{'enough' if p.guide_min_gpu_bytes >= p.weight_bytes_total else 'NOT enough'} "
                    "for the weights alone)")
    lines = [
        f"model: {p.architecture}",
        f"deployment: {p.gpus} GPU(s) x {_gib(p.gpu_mem_bytes)}, weights {p.dtype}, tp={p.tp} ep={p.ep}",
        f"parameters: {p.params_total:,} served ({p.params_checkpoint:,} in the checkpoint incl. MTP), "
        f"{p.params_active_per_token:,} active per token",
        weights,
        f"weights per rank: {_gib(p.weight_bytes_per_rank)}"
        + (f" incl. FP8 scales {p.scale_bytes_per_rank / 2**20:,.1f} MiB" if p.dtype == "fp8" else ""),
        f"reserve per rank (activations, CUDA/NCCL, fragmentation): {_gib(p.reserve_bytes_per_rank)}",
        _kv_line(p),
        f"KV budget per rank: {_gib(p.kv_budget_bytes_per_rank)} -> max cached tokens {p.max_cached_tokens:,}"
        f" = {p.full_context_sequences} sequence(s) of {p.context:,} tokens",
        f"fits: {'yes' if p.fits else 'no'}",
    ]
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _memory(text: str) -> int:
    try:
        value = parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"memory per GPU must be more than 0 bytes, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="model folder or config.json")
    ap.add_argument("--gpus", type=_positive_int, required=True)
    ap.add_argument("--gpu-mem", type=_memory, required=True, help="memory per GPU, e.g. 80GiB or 141GB")
    ap.add_argument("--dtype", choices=("fp8", "bf16"), default=None,
                    help="weights in memory (default: fp8 for DeepSeek, bf16 for dense models)")
    ap.add_argument("--tp", type=_positive_int, help="attention tensor-parallel size (default: --gpus)")
    ap.add_argument("--ep", type=_positive_int, help="expert-parallel size (default: --gpus; dense: 1)")
    ap.add_argument("--reserve", type=_fraction, default=0.10, help="fraction of each GPU held back (0.10)")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--context", type=_positive_int, default=131072, help="tokens one sequence must fit (128k)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    kv_bytes = 1 if args.kv_dtype == "fp8" else 2
    try:
        arch, cfg = load_model_config(args.config)
        make = make_dense_plan if arch in DENSE else make_plan
        dtype = args.dtype or ("bf16" if arch in DENSE else "fp8")
        p = make(cfg, args.gpus, args.gpu_mem, dtype, args.tp, args.ep, args.reserve, kv_bytes, args.context)
    except ConfigError as exc:
        print(f"privlm plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(p)) if args.json else render(p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
