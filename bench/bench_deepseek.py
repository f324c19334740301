"""DeepSeek decode speed through the engine (create_engine, as the worker serves), random weights.

Models (load_format "dummy", config.json only):
  v2lite    DeepSeek-V2-Lite-sized in the V3 layout: 27 layers, hidden 2048, 16 heads, kv_lora 512,
            64 routed experts of 1408 (6 per token) + 2 shared, first layer dense, vocab 102400 (bf16)
  r1slice   R1's widths (data/deepseek-r1/config.json) with 7 of its 61 layers: 3 dense + 4 MoE
            (256 experts of 2048, 8 per token, 1 shared), vocab 129280; bf16, and FP8 with keep_fp8
            (e4m3 weights, 128x128 block scales; the embedding and lm_head stay bf16)
Figures (JSON lines: name, unit, value, baseline, ratio, target, better, machine, ...):
  deepseek.<model>.<dtype>.decode_bs<B>   decode tokens/s of B concurrent requests (prompt 128,
      `--new` tokens each; from the last request's first token to the end; median of `--reps`,
      range in the line); at batch 1 the baseline is the roofline = copy bandwidth / (weight bytes
      read per token + KV bytes at the mean context)
  deepseek.r1slice.fp8_vs_bf16_bs1        FP8 batch-1 tokens/s over bf16's (target 1.7)
`--profile`: kernel-time table of a graphed batch-1 step of each model (torch profiler).
`--smoke`: a tiny model on CPU through the same code (checks the script).
`--check LAYERS`: native vs transformers on this device (see check()).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import report  # noqa: E402

TARGETS = {("v2lite", "bf16", 1): None, ("v2lite", "bf16", 32): 3500.0}
FP8_BLOCK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def config(smoke: bool):
    from transformers import DeepseekV3Config

    if smoke:
        kw = dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    else:
        kw = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                  num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64, num_experts_per_tok=6,
                  n_shared_experts=2, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128)
    kw.update(num_key_value_heads=kw["num_attention_heads"], q_lora_rank=None, n_group=1, topk_group=1,
              first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.0,
              max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    try:
        return DeepseekV3Config(num_mtp_layers=0, **kw)
    except TypeError:              # transformers releases before multi-token prediction support
        return DeepseekV3Config(**kw)


def copy_from_hf(model, hf) -> None:
    """Load the native model from transformers' in-memory weights (fused experts split back)."""
    import re

    sd = hf.state_dict()
    I = model.cfg.moe_intermediate_size
    pat = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = pat.match(name)
            if m and name not in sd:
                e, which = int(m.group(2)), m.group(3)
                src = (sd[m.group(1) + ".down_proj"][e] if which == "down_proj" else
                       sd[m.group(1) + ".gate_up_proj"][e, :I] if which == "gate_proj" else
                       sd[m.group(1) + ".gate_up_proj"][e, I:])
            elif name in sd:
                src = sd[name]
            else:
                raise KeyError(f"no transformers weight for {name}")
            p.weight_loader(p, src)


def check(dev, layers: int = 3) -> None:
    """Correctness on this device: native vs transformers logits (fp32 and bf16, V2-Lite widths,
    `layers` layers, both MoE paths) and greedy tokens vs generate(). One JSON line."""
    import json

    from transformers import DeepseekV3ForCausalLM as HF

    from services.inference.deepseek.config import DeepseekConfig
    from services.inference.deepseek.generate import _prefill_meta, greedy
    from services.inference.deepseek.model import DeepseekV3ForCausalLM

    hf_cfg = config(False)
    hf_cfg.num_hidden_layers = layers
    cfg = DeepseekConfig.from_dict(hf_cfg.to_dict())
    out = {"check": "deepseek", "layers": layers, "device": str(dev)}
    for dt in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        torch.set_default_dtype(dt)
        with torch.device(dev):
            hf = HF(hf_cfg).eval()
        torch.set_default_dtype(torch.float32)
        model = DeepseekV3ForCausalLM(cfg, None, dt, dev).eval()
        copy_from_hf(model, hf)
        ids = torch.randint(0, cfg.vocab_size, (32,), device=dev)
        with torch.no_grad():
            want = hf(ids[None]).logits[0, -1].float()
        layers_, shape = model.kv_cache_spec()
        slots = torch.arange(32, device=dev)
        for impl in ("grouped", "loop"):
            for l in model.model.layers:
                if l.is_moe:
                    l.mlp.impl = impl
            cache = torch.zeros(layers_, 32, *shape, dtype=dt, device=dev)
            got = model.compute_logits(model(ids, slots, _prefill_meta([0], [32], [slots]), cache)[-1:])[0]
            out[f"{str(dt)[6:]}_{impl}_logits_rel_diff"] = float((got - want).abs().max() / want.abs().max())
        if dev.type == "cuda":
            ps = torch.randint(0, cfg.vocab_size, (4, 20)).tolist()
            for l in model.model.layers:
                if l.is_moe:
                    l.mlp.impl = "grouped" if dt == torch.bfloat16 else "loop"
            eager = greedy(model, ps, 12)
            hf_tok = [hf.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, 20, dtype=torch.long,
                                  device=dev), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, 20:].tolist() for p in ps]
            out[f"{str(dt)[6:]}_tokens_equal_hf_generate"] = eager == hf_tok
        del hf, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)


def r1_slice_config(layers: int = 7, fp8: bool = True) -> dict:
    """R1's config.json with `layers` layers (the first 3 dense), MTP off; FP8 block config or none."""
    d = json.loads((ROOT / "data" / "deepseek-r1" / "config.json").read_text())
    d.pop("auto_map", None)
    d.update(num_hidden_layers=layers, num_nextn_predict_layers=0)
    d.pop("quantization_config", None)
    if fp8:
        d["quantization_config"] = dict(FP8_BLOCK)
    return d


def model_folder(tmp: Path, name: str, smoke: bool) -> Path:
    """config.json of the named model ("v2lite", "r1slice_bf16", "r1slice_fp8") in its own folder."""
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == "v2lite" or smoke:
        d = config(smoke).to_dict()
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        if name.endswith("fp8"):
            d["quantization_config"] = dict(FP8_BLOCK)
    else:
        d = r1_slice_config(7, fp8=name.endswith("fp8"))
    (folder / "config.json").write_text(json.dumps(d))
    return folder


def copy_bandwidth(dev) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write), the practical roofline."""
    n = (2 << 30) if dev.type == "cuda" else (64 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bw = 2 * n * 10 / (time.perf_counter() - t)
    del a, b
    return bw


def bytes_per_token(model, context: float) -> int:
    """Bytes one batch-1 decode step reads: every parameter but the embedding, routed experts at
    top_k / n_routed (their scales likewise), plus the latent cache of `context` positions."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            continue
        b = p.numel() * p.element_size()
        if ".mlp.experts." in name:
            b = b * cfg.num_experts_per_tok / cfg.n_routed_experts
        total += b
    layers, slot = model.kv_cache_spec()
    return int(total + layers * slot[0] * model.dtype.itemsize * context)


def decode_rate(engine, B: int, plen: int, n: int, tag: str, vocab: int) -> float:
    """Decode tokens/s of B concurrent requests: tokens after each request's first one, from the
    last first token to the last token."""
    from bench.bench_engine_cpu import _submit

    prompts = [[(i * 7919 + k * 104729) % (vocab - 10) + 5 for i in range(plen)] for k in range(B)]
    tls = [_submit(engine, f"{tag}-{k}", p, n) for k, p in enumerate(prompts)]
    for tl in tls:
        if not tl.done.wait(600):
            raise TimeoutError(f"{tag}: a request did not finish in 600 s")
        if tl.events_error:
            raise RuntimeError(tl.events_error)
    first = max(tl.times[0] for tl in tls)
    last = max(tl.times[-1] for tl in tls)
    return sum(len(tl.times) - 1 for tl in tls) / (last - first)


def bench_model(name: str, folder: Path, dtype: str, keep_fp8: bool, batches: list[int], args, dev, bw, rows):
    from services.inference.config import EngineConfig
    from services.inference.engine import create_engine

    plen, n = args.prompt, args.new
    ec = EngineConfig(model=str(folder), dtype=dtype, device=dev.type, load_format="dummy", keep_fp8=keep_fp8,
                      max_model_len=4096, kv_cache_bytes=(4 << 30) if dev.type == "cuda" else (64 << 20),
                      max_num_seqs=max(batches), max_num_batched_tokens=max(2048, plen * 4),
                      threads=2 if dev.type == "cpu" else None)
    t0 = time.perf_counter()
    engine = create_engine(ec)
    print(f"# {name}: engine up in {time.perf_counter() - t0:.1f} s", flush=True)
    out = {}
    try:
        model = engine.runner.model
        bpt = bytes_per_token(model, plen + n / 2)
        roof = bw / bpt
        for B in batches:
            decode_rate(engine, B, plen, min(n, 8), f"warm{B}", model.cfg.vocab_size)   # graphs captured
            rates = [decode_rate(engine, B, plen, n, f"{name}{B}.{r}", model.cfg.vocab_size)
                     for r in range(args.reps)]
            med = statistics.median(rates)
            out[B] = med
            model_name, dt = name.split(".")
            row = report(f"deepseek.{name}.decode_bs{B}", "tokens/s", med, roof if B == 1 else None,
                         TARGETS.get((model_name, dt, B)) if B != 1 else None, "higher",
                         runs=[round(r, 1) for r in rates], range=[round(min(rates), 1), round(max(rates), 1)],
                         roofline_tok_s=round(roof, 1), bytes_per_token_bs1=bpt, copy_bandwidth_gb_s=round(bw / 1e9, 1),
                         prompt_tokens=plen, new_tokens=n, keep_fp8=keep_fp8, decode_kernels=model.decode_kernels,
                         fp8_matmul=model.fp8_matmul, **args.meta)
            rows.append(row)
        if args.profile and dev.type == "cuda":
            from bench.bench_engine_gpu import _profile_decode

            _profile_decode(engine.runner)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_deepseek", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (script check, no figures kept)")
    ap.add_argument("--models", default="v2lite,r1slice_bf16,r1slice_fp8")
    ap.add_argument("--batches", default="1,32", help="v2lite batch sizes")
    ap.add_argument("--r1-batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--check", type=int, default=0, metavar="LAYERS",
                    help="only check correctness on this device with a LAYERS-layer model")
    args = ap.parse_args(argv)
    if args.check:
        check(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"), args.check)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench_deepseek: needs a CUDA GPU (use --smoke for a CPU check of the script)", file=sys.stderr)
        return 0
    from bench.gpu_deepseek_check import telemetry_shim

    shim = telemetry_shim()
    dev = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    args.meta = dict(gpu=gpu, gpu_count=torch.cuda.device_count() if dev.type == "cuda" else 0,
                     date=datetime.date.today().isoformat(), torch=torch.__version__, telemetry_noop_shim=shim,
                     command="python3 bench/bench_deepseek.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.smoke:
        args.reps, args.new, args.prompt = 1, 6, 8
    bw = copy_bandwidth(dev)
    rows: list[dict] = []
    rates: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models.split(","):
            folder = model_folder(Path(tmp), m, args.smoke)
            dt = "float32" if args.smoke else "bfloat16"
            fp8 = m.endswith("fp8")
            batches = [int(b) for b in (args.batches if m == "v2lite" else args.r1_batches).split(",")]
            label = f"{m.split('_')[0]}.{'fp8' if fp8 else 'bf16'}"
            rates[label] = bench_model(label, folder, dt, fp8, batches, args, dev, bw, rows)
    a, b = rates.get("r1slice.fp8", {}).get(1), rates.get("r1slice.bf16", {}).get(1)
    if a and b:
        rows.append(report("deepseek.r1slice.fp8_vs_bf16_bs1", "ratio", a / b, None, 1.7, "higher",
                           fp8_tok_s=round(a, 1), bf16_tok_s=round(b, 1), **args.meta))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
