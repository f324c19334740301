"""DeepSeek MoE + MLA decode speed on GPU: the native model vs transformers, and the MLA cache size.

Model: a random-initialised DeepSeek-V2-Lite-sized model (27 layers, hidden 2048, 16 heads,
kv_lora 512, 64 routed experts of 1408, 6 per token, 2 shared, first layer dense, 102400 vocab;
15.7B parameters, bf16) in the DeepSeek-V3 layout (sigmoid router). Weights' values don't change
speed (DESIGN.md); the native model gets transformers' exact weights so the logits can be compared.

Figures (decode tokens/s = B * (n - 1) / (t(n) - t(1)): prefill and first token excluded, both
implementations warmed up with the same shapes first, same process, same GPU):
  deepseek.gpu1.decode_bs{1,32}_vs_hf        native (CUDA graph) vs transformers generate()
  deepseek.gpu1.decode_bs1_vs_roofline        native vs bytes-per-token / measured copy bandwidth
  deepseek.gpu2.decode_bs{1,32}_vs_gpu1       2 GPUs (attention TP + expert parallel, NCCL) vs 1
  deepseek.kv_bytes_per_token                 MLA latent vs a conventional K/V cache
`--smoke` runs the same code on CPU with a tiny model (gloo for 2 ranks) to check the script.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import report  # noqa: E402


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


def _timed(fn, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def decode_tps(gen, B: int, n: int, dev) -> float:
    """gen(B, n) generates n tokens for B prompts; decode tokens/s with prefill subtracted."""
    gen(B, n)                                     # warm-up, same shapes
    gen(B, 1)
    t_n = min(_timed(lambda: gen(B, n), dev) for _ in range(2))
    t_1 = min(_timed(lambda: gen(B, 1), dev) for _ in range(2))
    return B * (n - 1) / max(t_n - t_1, 1e-9)


def init_native(model) -> None:
    """Random weights, identical on every rank for replicated tensors (seed from the name)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("e_score_correction_bias", "weight_scale_inv")):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)


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


def copy_bandwidth(dev) -> float:
    """Bytes moved per second by a device-to-device copy (read + write)."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    t = min(_timed(lambda: b.copy_(a), dev) for _ in range(5))
    return 2 * a.numel() / t


def decode_bytes_per_token(cfg) -> int:
    """Weights read by one batch-1 decode step (bf16): all but unrouted experts and the embedding."""
    from services.inference.deepseek.params import tensor_specs

    total = 0
    for s in tensor_specs(cfg):
        if s.name == "model.embed_tokens.weight":
            continue
        if s.split == "expert":
            total += s.numel * 2 * cfg.num_experts_per_tok // cfg.n_routed_experts
        else:
            total += s.numel * (4 if s.name.endswith(("gate.weight", "e_score_correction_bias")) else 2)
    return total


def native_rates(model, prompts, n, dev, graphs: bool) -> dict[str, float]:
    from services.inference.deepseek.cuda_graph import greedy_graph
    from services.inference.deepseek.generate import greedy

    run = greedy_graph if graphs else greedy
    rates = {}
    for B in sorted({1, len(prompts)}):
        try:
            rates[f"bs{B}"] = decode_tps(lambda b, k: run(model, prompts[:b], k), B, n, dev)
        except Exception as exc:          # keep the eager figure if capture fails on this stack
            if not graphs:
                raise
            print(f"# CUDA graph decode failed at batch {B}: {exc!r}; eager instead", file=sys.stderr)
            rates[f"bs{B}"] = decode_tps(lambda b, k: greedy(model, prompts[:b], k), B, n, dev)
            rates[f"bs{B}_graph_failed"] = 1.0
    return rates


def rank_main(rank: int, world: int, store_path: str, smoke: bool, batch: int, plen: int, n: int,
              out: str) -> None:
    """One rank of the multi-GPU run: native model only, random weights."""
    import torch.distributed as dist

    from services.inference.deepseek.model import DeepseekV3ForCausalLM
    from services.inference.engine.comm import Comm

    dev = torch.device("cpu") if smoke else torch.device("cuda", rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    comm = Comm.create(dist.FileStore(store_path, world), rank, world, dev.type)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = DeepseekV3ForCausalLM(config(smoke), comm, dtype, dev).eval()
    init_native(model)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, plen), generator=g).tolist()
    rates = native_rates(model, prompts, n, dev, graphs=dev.type == "cuda")
    if rank == 0:
        torch.save({"rates": rates, "weight_bytes": model.weight_bytes()}, out)


def check(dev, layers: int = 3) -> None:
    """Correctness on this device: native vs transformers logits (fp32 and bf16, V2-Lite widths,
    `layers` layers, both MoE paths), greedy tokens vs generate(), CUDA-graph vs eager tokens
    (bf16). One JSON line."""
    import json

    from transformers import DeepseekV3ForCausalLM as HF

    from services.inference.deepseek.config import DeepseekConfig
    from services.inference.deepseek.cuda_graph import greedy_graph
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
            if dt == torch.bfloat16:         # graphs need the sync-free grouped (bf16) MoE
                try:
                    out["bf16_graph_tokens_equal_eager"] = greedy_graph(model, ps, 12) == eager
                except Exception as exc:
                    out["bf16_graph_error"] = repr(exc)[:200]
            hf_tok = [hf.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, 20, dtype=torch.long,
                                  device=dev), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, 20:].tolist() for p in ps]
            out[f"{str(dt)[6:]}_tokens_equal_hf_generate"] = eager == hf_tok
        del hf, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_deepseek", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (script check, no figures kept)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--gpus", type=int, default=None, help="also run on this many GPUs (default: up to 2)")
    ap.add_argument("--check", type=int, default=0, metavar="LAYERS",
                    help="only check correctness on this device with a LAYERS-layer model")
    args = ap.parse_args(argv)
    if args.check:
        check(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"), args.check)
        return 0
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_deepseek: needs a CUDA GPU (use --smoke for a CPU check of the script)", file=sys.stderr)
        return 0
    from transformers import DeepseekV3ForCausalLM as HF

    from services.inference.deepseek.config import DeepseekConfig
    from services.inference.deepseek.model import DeepseekV3ForCausalLM

    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype = torch.float32 if smoke else torch.bfloat16
    hf_cfg = config(smoke)
    cfg = DeepseekConfig.from_dict(hf_cfg.to_dict())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    n = args.new
    name = "deepseek.smoke" if smoke else "deepseek"

    # --- transformers, one device ---------------------------------------------------------------
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        hf = HF(hf_cfg).eval()
    torch.set_default_dtype(prev)

    def hf_gen(B, k):
        ids = torch.tensor(prompts[:B], device=dev)
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    hf_rates = {f"bs{B}": decode_tps(hf_gen, B, n, dev) for B in sorted({1, args.batch})}

    # --- native, same weights ---------------------------------------------------------------
    model = DeepseekV3ForCausalLM(cfg, None, dtype, dev).eval()
    copy_from_hf(model, hf)
    T = min(32, args.prompt)
    with torch.no_grad():
        ids = torch.tensor(prompts[0][:T], device=dev)
        want = hf(ids[None]).logits[0, -1].float()
    from services.inference.deepseek.generate import _prefill_meta
    layers, shape = model.kv_cache_spec()
    cache = torch.zeros(layers, T, *shape, dtype=dtype, device=dev)
    slots = torch.arange(T, device=dev)
    got = model.compute_logits(model(ids, slots, _prefill_meta([0], [T], [slots]), cache)[-1:])[0]
    logit_diff = float((got - want).abs().max() / want.abs().max())
    del hf
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    graph_tokens_equal = None
    if dev.type == "cuda":
        from services.inference.deepseek.cuda_graph import greedy_graph
        from services.inference.deepseek.generate import greedy
        try:
            graph_tokens_equal = greedy_graph(model, prompts[:4], 8) == greedy(model, prompts[:4], 8)
        except Exception as exc:
            print(f"# CUDA graph check failed: {exc!r}", file=sys.stderr)
    eager = native_rates(model, prompts, n, dev, graphs=False)
    graphed = native_rates(model, prompts, n, dev, graphs=True) if dev.type == "cuda" else eager
    bw = copy_bandwidth(dev)
    bytes_tok = decode_bytes_per_token(cfg)
    common = dict(prompt_tokens=args.prompt, new_tokens=n, dtype=str(dtype).replace("torch.", ""),
                  params=sum(s.numel for s in __import__("services.inference.deepseek.params",
                                                           fromlist=["x"]).tensor_specs(cfg)),
                  logits_rel_diff_vs_hf=round(logit_diff, 5), graph_tokens_equal_eager=graph_tokens_equal)
    for key in hf_rates:
        common["cuda_graph"] = dev.type == "cuda" and f"{key}_graph_failed" not in graphed
        report(f"{name}.gpu1.decode_{key}_vs_hf", "tokens/s", graphed[key], hf_rates[key], None, "higher",
               native_eager_tok_s=round(eager[key], 2), **common)
    roof = bw / bytes_tok
    report(f"{name}.gpu1.decode_bs1_vs_roofline", "tokens/s", graphed["bs1"], roof, None, "higher",
           bytes_per_token=bytes_tok, copy_bandwidth_gb_s=round(bw / 1e9, 1), **common)
    kv_mla = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    kv_mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 2
    report(f"{name}.kv_bytes_per_token", "bytes", kv_mla, kv_mha, None, "lower",
           cache="MLA latent (kv_lora_rank + qk_rope_head_dim) vs K+V of every head, bf16")

    # --- several devices: attention TP + expert parallel ----------------------------------------
    gpus = args.gpus if args.gpus is not None else (2 if smoke else min(2, torch.cuda.device_count()))
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if gpus > 1:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.pt")
            mp.start_processes(rank_main, args=(gpus, os.path.join(tmp, "store"), smoke, args.batch,
                                                args.prompt, n, out), nprocs=gpus, join=True, start_method="spawn")
            res = torch.load(out)
        for key, rate in res["rates"].items():
            if key.endswith("_graph_failed"):
                continue
            report(f"{name}.gpu{gpus}.decode_{key}_vs_gpu1", "tokens/s", rate, graphed[key], None, "higher",
                   weight_bytes_rank0=res["weight_bytes"], **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
