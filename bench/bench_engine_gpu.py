"""GPU engine benchmarks: a random-initialised Llama-3.1-8B-shaped bf16 model on one GPU.

  engine.gpu.decode_bs1_roofline   batch-1 decode tokens/s as a fraction of the HBM roofline
                                   (weight + KV bytes read per token / measured copy bandwidth)  (>= 0.7)
  engine.gpu.decode_bs1_vs_hf      batch-1 decode tokens/s / transformers generate() (warm)      (>= 3)
  engine.gpu.batch64_tok_s         aggregate tokens/s of 64 concurrent requests (no target)

`PYTHONPATH=. python -m bench.bench_engine_gpu [--new-tokens 128] [--skip-hf] [--check]`
Weights are random (load_format="dummy"): values do not change speed.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_engine_cpu import _submit  # noqa: E402
from bench.hf_baseline import decode_rate, hf_token_times  # noqa: E402
from bench.report import report  # noqa: E402


def llama31_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                       architectures=["LlamaForCausalLM"],
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical HBM roofline."""
    import torch

    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 20 / (time.perf_counter() - t)
    del x, y
    return bw


def check_tiny() -> bool:
    """Greedy tokens of the engine on CUDA (fp32, graphs on) equal transformers' on a tiny Llama."""
    import torch

    from privlm.testing.engine import generate
    from privlm.testing.tiny_models import build, hf_greedy
    from services.inference.config import EngineConfig
    from services.inference.engine import create_engine

    with tempfile.TemporaryDirectory() as d:
        path = build("llama", Path(d) / "tiny")
        prompts = [[1, 17, 99, 23, 5], [1] + list(range(30, 70)), [1, 200, 201],
                   [1] + [(i * 37) % 240 + 3 for i in range(244)]]          # crosses a CTX_BUCKET
        refs = [hf_greedy(path, p, 24) for p in prompts]
        ok = True
        plain = {"decode_kernels": "torch", "fused_all_reduce_norm": False, "pdl": False}
        runs = [(1, {}), (1, plain)] + ([(2, {}), (2, plain)] if torch.cuda.device_count() >= 2 else [])
        for tp, extra in runs:          # defaults first: only a process's first TP=2 engine gets symmetric memory
            eng = create_engine(EngineConfig(model=str(path), dtype="float32", device="cuda", tp=tp, **extra))
            try:
                alone = [generate(eng, [p], 24)[0] for p in prompts]
                together = generate(eng, prompts, 24)
                path_used = eng.runner.comm.all_reduce_path
                kernels = eng.runner.decode_kernels
            finally:
                eng.shutdown()
            torch.cuda.empty_cache()
            ok = ok and alone == refs and together == refs
            print(f"# tiny llama on cuda tp={tp} ({path_used}; decode kernels {'triton' if kernels else 'torch'}): "
                  f"greedy equal to transformers alone={alone == refs} batched={together == refs}", flush=True)
    return ok


def _profile_decode(runner) -> None:
    """Kernel time breakdown of one batch-1 decode step, eager and replayed (diagnostics only).
    At tp > 1 (rank 0) only the replayed step, through runner.step so that followers take part."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from services.inference.engine.scheduler import Chunk, StepPlan

    plan = StepPlan((Chunk(0, (5,), 200, tuple(range(16)), True),), 1)
    graphs = runner.graphs
    run = runner.execute if runner.comm.size == 1 else runner.step
    for g in (None, graphs) if runner.comm.size == 1 else (graphs,):
        runner.graphs = g
        for _ in range(3):
            run(plan)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            run(plan)
        torch.cuda.synchronize()
        print(f"# decode step tp={runner.comm.size} {'graph' if g else 'eager'}: "
              f"{(time.perf_counter() - t) / 20 * 1e3:.3f} ms", flush=True)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                run(plan)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kern = sum(e.self_device_time_total for e in events) / 5
        print(f"# kernel time per step: {kern / 1e3:.3f} ms", flush=True)
        print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)
    runner.graphs = graphs


TP2_VARIANTS = {                     # label -> EngineConfig overrides; "default" is the shipped config
    "default": {},                                                       # Triton GEMV/attention + fused AR
    "no_pdl": {"pdl": False},                                            # plain launches with the gated GEMV
    "unfused": {"fused_all_reduce_norm": False},                         # one-shot AR, then add + RMSNorm
    "torch_kernels": {"decode_kernels": "torch"},                        # cuBLAS + torch attention
    # cuBLAS + torch attention with the unfused all-reduce
    "torch_unfused": {"decode_kernels": "torch", "fused_all_reduce_norm": False},
    "gloo_plans": {"plan_channel": "gloo"},
    "nccl_graphs": {"custom_all_reduce": False, "plan_channel": "gloo", "cuda_graphs_tp": True},
    "nccl_eager": {"custom_all_reduce": False, "plan_channel": "gloo", "cuda_graphs_tp": False},
}


def _step_breakdown(engine) -> dict:
    """Wrap rank 0's step pieces with timers: plan broadcast, execute (launch/replay), whole step."""
    r, rec = engine.runner, {"broadcast": [], "execute": [], "step": []}

    def timed(name, fn):
        def w(*a):
            t = time.perf_counter()
            out = fn(*a)
            rec[name].append(time.perf_counter() - t)
            return out
        return w

    r.comm.broadcast_object = timed("broadcast", r.comm.broadcast_object)
    r.execute = timed("execute", r.execute)
    engine._step = timed("step", engine._step)
    return rec


def bs1_rate(engine, prompt, n, reps, tag: str) -> tuple[float, dict]:
    """Median batch-1 decode tokens/s over reps runs (after one warm-up run) and the median step
    breakdown of the last run in ms (see _step_breakdown)."""
    rates, rec = [], _step_breakdown(engine)
    for i in range(reps + 1):
        for v in rec.values():
            v.clear()
        tl = _submit(engine, f"{tag}-{i}", prompt, n)
        if not tl.done.wait(180):
            raise TimeoutError(f"{tag} request did not finish in 180 s")
        if tl.events_error:
            raise RuntimeError(tl.events_error)
        if i:
            rates.append(decode_rate(tl.times))
    steps = {f"{k}_ms": round(statistics.median(v[2:]) * 1e3, 3) for k, v in rec.items() if len(v) > 2}
    return statistics.median(rates), steps


def _without_overlap(engine, prompt, n, reps) -> float:
    """Batch-1 tokens/s of the same engine with overlapped decoding switched off (the baseline of
    that optimisation, measured in the same process)."""
    saved, engine._overlap = engine._overlap, False
    try:
        return bs1_rate(engine, prompt, n, reps, "sync")[0]
    finally:
        engine._overlap = saved


def tp2_rate(cfg, prompt, n, reps, variants, profile_step: bool = False, dump_after: float = 0.0):
    """Batch-1 decode at TP=2 for each variant, each in its own process (one engine per process, as
    a worker runs: symmetric memory is set up once per process), rank 1 on the second GPU:
    {label: {tok_s, all_reduce_path, plan_channel, cuda_graphs_tp, step/broadcast/execute ms}}."""
    import json
    import subprocess

    out = {}
    for label in variants:
        cmd = [sys.executable, "-m", "bench.bench_engine_gpu", "--tp2-one", label, "--new-tokens", str(n),
               "--reps", str(reps), "--dump-after", str(dump_after)] + (["--profile"] if profile_step else [])
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:            # a hang: keep its stacks (--dump-after)
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            out[label] = {"error": "timed out after 300 s", "stderr_tail": err[-4000:]}
            print(f"# tp2 {label}: {out[label]}", flush=True)
            continue
        if profile_step:
            print("\n".join(ln for ln in res.stdout.splitlines() if not ln.startswith("TP2RESULT ")), flush=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("TP2RESULT ")]
        out[label] = json.loads(lines[-1][10:]) if lines else {"error": res.stderr[-3000:]}
        print(f"# tp2 {label}: {out[label]}", flush=True)
    return out


def tp2_one(cfg, prompt, n, reps, label, profile_step: bool = False) -> dict:
    """One TP=2 variant in this process (see tp2_rate); errors come back as {"error": ...}.
    A label ending in "@1" runs the variant at TP=1 (the same-machine baseline of that config)."""
    from services.inference.config import EngineConfig
    from services.inference.engine import create_engine

    name, _, tp = label.partition("@")
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        try:
            ec = EngineConfig(model=d, dtype="bfloat16", device="cuda", tp=int(tp or 2), load_format="dummy",
                              max_model_len=4096, kv_cache_bytes=4 << 30, **TP2_VARIANTS[name])
            engine = create_engine(ec)
            try:
                rate, steps = bs1_rate(engine, prompt, n, reps, "tp2")
                rate_sync = _without_overlap(engine, prompt, n, reps)
                if profile_step:
                    _profile_decode(engine.runner)
                comm = engine.runner.comm
                return {"tok_s": round(rate, 1), "tok_s_no_overlap": round(rate_sync, 1), "all_reduce_path": comm.all_reduce_path,
                        "plan_channel": "shm" if comm.channel is not None else "gloo",
                        "cuda_graphs_tp": ec.cuda_graphs_tp, **steps}
            finally:
                engine.shutdown()
        except Exception as exc:                          # reported by the parent with the other variants
            return {"error": repr(exc)[:300]}


def hf_rate(cfg, prompt, n, reps) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    rates = []
    for i in range(reps + 1):                                   # run 0 warms up with the same shapes
        times = hf_token_times(model, prompt, n)[1]
        if i:
            rates.append(decode_rate(times[1:]))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(rates)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tp2", action="store_true", help="also measure TP=2 on two GPUs (batch-1 decode)")
    ap.add_argument("--tp2-variants", default="default,torch_kernels",
                    help=f"comma-separated TP=2 configurations among {sorted(TP2_VARIANTS)}; "
                         "label@1 runs one at TP=1")
    ap.add_argument("--tp2-one", default=None, help=argparse.SUPPRESS)    # child of tp2_rate
    ap.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)  # child of --check
    ap.add_argument("--dump-after", type=float, default=0.0,
                    help="print every thread's Python stack if still running after this many seconds (hangs)")
    ap.add_argument("--decode-kernels", default="auto", choices=["auto", "torch", "triton"],
                    help="TP=1 engine: EngineConfig.decode_kernels (Triton GEMV + decode attention, or torch)")
    args = ap.parse_args(argv)
    if args.dump_after > 0:
        import faulthandler

        faulthandler.dump_traceback_later(args.dump_after, repeat=True)

    import torch

    from services.inference.config import EngineConfig
    from services.inference.engine import create_engine

    if not torch.cuda.is_available():
        print("# bench_engine_gpu: no CUDA device, skipped", file=sys.stderr)
        return
    if args.tp2_one:
        import json

        plen = 128
        prompt = [128000] + [(i * 7919) % 120000 + 100 for i in range(plen - 1)]
        res = tp2_one(llama31_8b_config(), prompt, args.new_tokens, args.reps, args.tp2_one, args.profile)
        print("TP2RESULT " + json.dumps(res), flush=True)
        return
    if args.check_only:
        sys.exit(0 if check_tiny() else 1)
    if args.check:          # own process: the timed engines below start in a process that ran nothing else
        import subprocess

        res = subprocess.run([sys.executable, "-m", "bench.bench_engine_gpu", "--check-only"], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
        print("\n".join(ln for ln in res.stdout.splitlines() if ln.startswith("# ")), flush=True)
        print(f"# tiny checks: {'all equal' if res.returncode == 0 else 'FAILED: ' + res.stderr[-800:]}", flush=True)
    bw = copy_bandwidth()
    cfg = llama31_8b_config()
    n, plen = args.new_tokens, 128
    prompt = [128000] + [(i * 7919) % 120000 + 100 for i in range(plen - 1)]
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)                                        # config.json only
        t0 = time.perf_counter()
        engine = create_engine(EngineConfig(model=d, dtype="bfloat16", device="cuda", load_format="dummy",
                                            max_model_len=4096, kv_cache_bytes=8 << 30, max_num_seqs=128,
                                            max_num_batched_tokens=8192, decode_kernels=args.decode_kernels))
        print(f"# engine up in {time.perf_counter() - t0:.1f}s", flush=True)
        try:
            bs1, tp1_steps = bs1_rate(engine, prompt, n, args.reps, "bs1")
            bs1_sync = _without_overlap(engine, prompt, n, args.reps)
            print(f"# tp1 bs1: {bs1:.1f} tok/s {tp1_steps}; without overlapped decoding {bs1_sync:.1f}", flush=True)
            r = engine.runner
            embed = r.model.model.embed_tokens.weight
            weight_read = r.weight_bytes - embed.numel() * embed.element_size()   # one embedding row per token
            layers, slot = r.model.kv_cache_spec()
            kv_per_pos = layers * slot[0] * slot[1] * slot[2] * r.dtype.itemsize
            kv_read = kv_per_pos * (plen + n / 2)                                  # mean context
            roofline = bw / (weight_read + kv_read)
            if args.profile:
                _profile_decode(r)
            prompts = [[128000] + [(i * 7919 + k * 104729) % 120000 + 100 for i in range(plen - 1)]
                       for k in range(args.batch)]
            for rep in range(2):
                t0 = time.perf_counter()
                tls = [_submit(engine, f"b{rep}-{k}", p, n) for k, p in enumerate(prompts)]
                for tl in tls:
                    if not tl.done.wait(300):
                        raise TimeoutError("batch-64 request did not finish in 300 s (see --dump-after)")
                wall = time.perf_counter() - t0
                agg = sum(tl.tokens for tl in tls) / wall
                first = max(tl.times[0] for tl in tls)
                last = max(tl.times[-1] for tl in tls)
                decode_agg = sum(tl.tokens - 1 for tl in tls) / (last - first)
        finally:
            engine.shutdown()
    del engine, r, embed
    gc.collect()
    gc.collect()
    torch.cuda.empty_cache()
    tp2 = None
    if args.tp2 and torch.cuda.device_count() >= 2:
        tp2 = tp2_rate(cfg, prompt, n, args.reps, args.tp2_variants.split(","), args.profile, args.dump_after)
    hf = None if args.skip_hf else hf_rate(cfg, prompt, n, 2)
    gpu = torch.cuda.get_device_name(0)
    report("engine.gpu.decode_bs1_roofline", "fraction", bs1 / roofline, None, 0.7, engine_tok_s=round(bs1, 1),
           engine_no_overlap_tok_s=round(bs1_sync, 1), decode_kernels=args.decode_kernels, roofline_tok_s=round(roofline, 1),
           copy_bandwidth_gb_s=round(bw / 1e9, 1),
           bytes_per_token=int(weight_read + kv_read), new_tokens=n, prompt_tokens=plen, gpu=gpu)
    report("engine.gpu.decode_bs1_vs_hf", "ratio", bs1 / hf if hf else 0.0, None, 3.0, engine_tok_s=round(bs1, 1),
           hf_bf16_tok_s=None if hf is None else round(hf, 1), gpu=gpu)
    if tp2 and "tok_s" in tp2.get("default", {}):
        report("engine.gpu.tp2_vs_tp1_bs1", "ratio", tp2["default"]["tok_s"] / bs1, None, 1.6,
               tp1_tok_s=round(bs1, 1), tp2_tok_s=tp2["default"]["tok_s"], variants=tp2,
               tp1_step_ms=tp1_steps, gpu=gpu)
    report("engine.gpu.batch64_tok_s", "tokens/s", agg, None, None, decode_phase_tok_s=round(decode_agg, 1),
           requests=args.batch, new_tokens=n, prompt_tokens=plen, gpu=gpu)


if __name__ == "__main__":
    main(sys.argv[1:])
