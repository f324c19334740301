"""Report-analysis scenario: a ~5k-token synthetic annual report analysed through the real gateway
(gRPC client -> gateway -> worker group, in this process on 127.0.0.1), against transformers'
generate() on the same weights, dtype and threads, in the same run.

  scenario.report.ttft_vs_hf    HF time to first token / gateway time to first token   (higher is better)
  scenario.report.total_vs_hf   HF total time / gateway total time, same new tokens    (higher is better)

Both sides get the same token ids (the gateway's chat template), greedy decoding, the same number of
new tokens (min_new_tokens on the HF side so it cannot stop early), and a warm-up request first.
The warm-up uses a shorter prompt (--warmup-tokens) to keep the run bounded: a 5k-token prefill
takes tens of seconds on two shared cores.

`python -m bench.bench_scenario_report [--dtype bfloat16] [--threads 2] [--new-tokens 32] [--seed 0]`
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hf_baseline import HFProcess  # noqa: E402
from bench.report import report  # noqa: E402


def hf_run(hf: HFProcess, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, total) of one greedy generate() call in the baseline's own process,
    timed by a streamer (total: to the last token)."""
    t0, times = hf.times(ids, new_tokens)
    return times[1] - t0, times[-1] - t0


async def gateway_run(target: str, ids_prompt_messages, new_tokens: int) -> tuple[float, float, int]:
    import grpc

    from privlm.scenarios.report import stream_analysis
    from privlm.v1 import inference_pb2 as pb

    chat = pb.Chat(messages=[pb.ChatMessage(role=r, content=c) for r, c in ids_prompt_messages])
    req = pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(max_new_tokens=new_tokens, temperature=0.0),
                             request_id="bench-report")
    async with grpc.aio.insecure_channel(target) as ch:
        t = await stream_analysis(ch, req)
    if t.completion_tokens != new_tokens:
        raise RuntimeError(f"gateway generated {t.completion_tokens} tokens, expected {new_tokens} "
                           f"({t.finish_reason}); raise the context or lower --new-tokens")
    return t.ttft_s, t.total_s, t.prompt_tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_scenario_report")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warmup-tokens", type=int, default=512)
    args = ap.parse_args(argv or [])

    import os

    import torch

    from gateway.tokenizer import ModelTokenizer
    from privlm.model_prep import prepare
    from privlm.scenarios.finreport import analysis_messages, build_report
    from privlm.scenarios.stack import ScenarioStack

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model_dir = prepare(log=lambda *a: None)
    report_ = build_report(args.seed)
    messages = analysis_messages(report_)
    ids = ModelTokenizer(str(model_dir)).encode_chat(messages)
    warm_messages = (("user", report_.text[: args.warmup_tokens * 2]),)
    warm_ids = ModelTokenizer(str(model_dir)).encode_chat(warm_messages)

    async def gateway_side():
        stack = await ScenarioStack.start(model_dir, dtype=args.dtype, threads=threads)
        try:
            await gateway_run(stack.target, warm_messages, 4)
            return [await gateway_run(stack.target, messages, args.new_tokens) for _ in range(args.reps)]
        finally:
            await stack.close()

    gw = asyncio.run(gateway_side())
    baseline = HFProcess(str(model_dir), threads, args.dtype)          # its own process: one OpenMP pool each
    try:
        hf_run(baseline, warm_ids, 4)
        hf = [hf_run(baseline, ids, args.new_tokens) for _ in range(args.reps)]
    finally:
        baseline.close()

    gw_ttft = statistics.median(t for t, _, _ in gw)
    gw_total = statistics.median(t for _, t, _ in gw)
    hf_ttft = statistics.median(t for t, _ in hf)
    hf_total = statistics.median(t for _, t in hf)
    common = dict(prompt_tokens=len(ids), new_tokens=args.new_tokens, dtype=args.dtype, threads=threads,
                  reps=args.reps, seed=args.seed, gateway_ttft_s=round(gw_ttft, 3), hf_ttft_s=round(hf_ttft, 3),
                  gateway_total_s=round(gw_total, 3), hf_total_s=round(hf_total, 3),
                  gateway_prefill_tok_s=round(len(ids) / gw_ttft, 1), hf_prefill_tok_s=round(len(ids) / hf_ttft, 1))
    report("scenario.report.ttft_vs_hf", "ratio", hf_ttft / gw_ttft, None, 1.0, "higher", **common)
    report("scenario.report.total_vs_hf", "ratio", hf_total / gw_total, None, 1.0, "higher", **common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
