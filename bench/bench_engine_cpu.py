"""CPU engine benchmarks on the default model (bf16), baseline = transformers generate() bf16 on the
same threads, measured in the same run.

  engine.cpu.decode_bs1_vs_hf      batch-1 decode tokens/s, ratio to HF generate()   (target >= 2)
  engine.cpu.concurrent16_vs_bs1   aggregate decode tokens/s while 16 requests decode together,
                                   ratio to the engine's own batch-1 decode tokens/s  (target >= 8);
                                   the whole-run figure including the 16 prefills is reported beside it
  engine.cpu.ttft_under_prefill    median TTFT of a short request while a 5k-token prompt is being
                                   prefilled, ratio to its idle TTFT                 (target < 2)

`python -m bench.bench_engine_cpu [--threads 2] [--new-tokens 64] [--skip-hf]`
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hf_baseline import HFProcess, decode_rate  # noqa: E402
from bench.report import report  # noqa: E402


class _Timeline:
    """Per-request token arrival times (engine events)."""

    def __init__(self):
        self.submitted = time.perf_counter()
        self.times: list[float] = []
        self.tokens = 0
        self.done = threading.Event()
        self.events_error = ""

    def __call__(self, ev):
        now = time.perf_counter()
        for _ in ev.token_ids:
            self.times.append(now)
        self.tokens += len(ev.token_ids)
        if ev.finish_reason is not None:
            self.events_error = ev.error
            self.done.set()


def _submit(engine, rid, prompt, n):
    from services.inference.types import GenerationRequest, SamplingParams

    tl = _Timeline()
    engine.submit(GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=n)), tl)
    return tl


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--prefill-chunk", type=int, default=8)
    ap.add_argument("--long-prefill-threshold", type=int, default=64)
    ap.add_argument("--budget", type=int, default=512)
    args = ap.parse_args(argv)

    # OpenMP waiting policy (libgomp), set before the first torch import; the HF baseline's child
    # process inherits it. On shared cores, long spinning costs a scheduler timeslice per parallel
    # region (26x slower decode steps measured here); purely passive waits cost a futex wake-up per
    # GEMV (~8 ms per decode step when quiet). A short spin gets most of both. `privlm up` sets the
    # same for a tp=1 worker.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="3000")
    import torch

    from privlm.model_prep import prepare
    from services.inference.config import EngineConfig
    from services.inference.engine import create_engine

    torch.set_num_threads(args.threads)
    model_dir = str(prepare(log=lambda *a: None))
    n = args.new_tokens
    prompt = [1] + [(i * 7919) % 40000 + 100 for i in range(127)]          # 128 tokens
    hf = None if args.skip_hf else HFProcess(model_dir, args.threads)     # its own process: see HFProcess

    cfg = EngineConfig(model=model_dir, dtype="bfloat16", threads=args.threads, max_num_seqs=32,
                       max_num_batched_tokens=args.budget, prefill_chunk=args.prefill_chunk,
                       long_prefill_threshold=args.long_prefill_threshold)
    engine = create_engine(cfg)
    prompts = [[1] + [(i * 7919 + k * 104729) % 40000 + 100 for i in range(127)] for k in range(16)]

    def engine_bs1(tag):
        tl = _submit(engine, f"bs1-{tag}", prompt, n)
        tl.done.wait()
        return decode_rate(tl.times)

    def engine_c16(tag):
        """(steady 16-way decode tokens/s, whole-run tokens/s including the 16 prefills).

        Steady decode: tokens produced while all 16 requests are decoding (from the last first
        token to the first finish), the same kind of figure as the batch-1 decode rate."""
        t0 = time.perf_counter()
        tls = [_submit(engine, f"c{tag}-{k}", p, n) for k, p in enumerate(prompts)]
        for tl in tls:
            tl.done.wait()
        whole = sum(tl.tokens for tl in tls) / (time.perf_counter() - t0)
        a, e = max(tl.times[0] for tl in tls), min(tl.times[-1] for tl in tls)
        steady = sum(sum(1 for t in tl.times if a < t <= e) for tl in tls) / (e - a)
        return steady, whole

    try:
        # Warm up every path with the same shapes, then interleave the runs (engine bs1, HF, engine
        # 16 concurrent) so that load from other processes on a shared machine hits all alike.
        engine_bs1("w"), engine_c16("w")
        if hf:
            hf.rate(prompt, n)
        bs1s, hfs, aggs = [], [], []
        for rep in range(args.reps):
            bs1s.append(engine_bs1(rep))
            if hf:
                hfs.append(hf.rate(prompt, n))
            aggs.append(engine_c16(rep))
        bs1 = statistics.median(bs1s)
        agg = statistics.median(a for a, _ in aggs)
        whole = statistics.median(w for _, w in aggs)
        hf_rate = statistics.median(hfs) if hfs else None
        report("engine.cpu.decode_bs1_vs_hf", "ratio", bs1 / hf_rate if hf_rate else 0.0, None, 2.0,
               engine_tok_s=round(bs1, 2), hf_bf16_tok_s=None if hf_rate is None else round(hf_rate, 2),
               engine_runs=[round(x, 1) for x in bs1s], hf_runs=[round(x, 1) for x in hfs],
               new_tokens=n, prompt_tokens=len(prompt), threads=args.threads,
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), gomp_spincount=os.environ.get("GOMP_SPINCOUNT"))
        report("engine.cpu.concurrent16_vs_bs1", "ratio", agg / bs1, None, 8.0, aggregate_decode_tok_s=round(agg, 2),
               bs1_tok_s=round(bs1, 2), aggregate_runs=[round(x, 1) for x, _ in aggs],
               whole_run_tok_s_incl_prefill=round(whole, 2), whole_run_ratio=round(whole / bs1, 2), requests=16,
               new_tokens=n, threads=args.threads)
        if hf:
            hf.close()

        # short-request TTFT, idle vs while a 5k-token prompt prefills (chunked)
        short = [1] + [(i * 31 + 5) % 40000 + 100 for i in range(31)]
        idle = []

        def idle_ttft(tag, k):
            for i in range(k):
                tl = _submit(engine, f"idle-{tag}-{i}", short, 1)
                tl.done.wait()
                idle.append(tl.times[0] - tl.submitted)

        _submit(engine, "idle-warm", short, 1).done.wait()
        idle_ttft("before", 5)
        long_prompt = [1] + [(i * 7919) % 40000 + 100 for i in range(4999)]
        big = _submit(engine, "long", long_prompt, 1)
        loaded = []
        time.sleep(0.5)
        while not big.done.is_set() and len(loaded) < 12:
            tl = _submit(engine, f"busy-{len(loaded)}", short, 1)
            tl.done.wait()
            if not big.done.is_set():
                loaded.append(tl.times[0] - tl.submitted)
            time.sleep(1.0)                                # spread samples over the whole prefill
        big.done.wait()
        prefill_s = big.times[0] - big.submitted
        idle_ttft("after", 5)                              # idle measured on both sides of the load
        idle_ms, busy_ms = statistics.median(idle) * 1e3, statistics.median(loaded) * 1e3
        report("engine.cpu.ttft_under_prefill", "ratio", busy_ms / idle_ms, None, 2.0, better="lower",
               idle_ttft_ms=round(idle_ms, 1), busy_ttft_ms=round(busy_ms, 1),
               busy_ttft_max_ms=round(max(loaded) * 1e3, 1), samples=len(loaded),
               long_prompt_tokens=len(long_prompt), long_prefill_s=round(prefill_s, 2),
               prefill_chunk=args.prefill_chunk, long_prefill_threshold=args.long_prefill_threshold,
               budget=args.budget, threads=args.threads)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
