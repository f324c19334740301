"""`privlm demo report`: a ~5k-token synthetic annual report analysed through the gateway, streamed.

With --target it talks to a running gateway (`privlm up`); without, it starts a real worker group and
gateway in this process on 127.0.0.1 port 0. Prints the analysis as it streams, then the prompt size,
time to first token and total time measured at the client.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

import grpc

from privlm.scenarios.finreport import Report, analysis_messages, build_report
from privlm.v1 import inference_pb2 as pb
from privlm.v1 import inference_pb2_grpc as pb_grpc


@dataclass
class StreamTiming:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    finish_reason: str


def analysis_request(report: Report, max_new_tokens: int, model: str = "") -> pb.GenerateRequest:
    chat = pb.Chat(messages=[pb.ChatMessage(role=r, content=c) for r, c in analysis_messages(report)])
    return pb.GenerateRequest(model=model, chat=chat, request_id=f"report-{report.years[-1]}",
                              sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))


async def stream_analysis(channel: grpc.aio.Channel, request: pb.GenerateRequest, *, out=None,
                          metadata=(), timeout: float = 600.0) -> StreamTiming:
    """Send one GenerateStream and time it at the client: first non-empty chunk, and the end."""
    stub = pb_grpc.InferenceStub(channel)
    parts: list[str] = []
    t0 = time.perf_counter()
    ttft = None
    last = None
    async for msg in stub.GenerateStream(request, metadata=metadata, timeout=timeout):
        if ttft is None and (msg.token_ids or msg.text):
            ttft = time.perf_counter() - t0
        if msg.text:
            parts.append(msg.text)
            if out is not None:
                out.write(msg.text)
                out.flush()
        last = msg
    total = time.perf_counter() - t0
    reason = pb.FinishReason.Name(last.finish_reason) if last is not None else "none"
    return StreamTiming("".join(parts), last.usage.prompt_tokens if last else 0,
                        last.usage.completion_tokens if last else 0, ttft or total, total, reason)


async def _run(args) -> int:
    report = build_report(args.seed)
    request = analysis_request(report, args.max_new_tokens, args.model)
    stack = None
    metadata = ()
    if args.target:
        from privlm.scenarios.connect import open_target

        channel, metadata = open_target(args)
    else:
        from privlm.model_prep import prepare
        from privlm.scenarios.stack import ScenarioStack

        print("starting a worker group and a gateway in this process (127.0.0.1, port 0)...", file=sys.stderr)
        stack = await ScenarioStack.start(prepare(log=lambda *a: None), dtype=args.dtype)
        channel = grpc.aio.insecure_channel(stack.target)
    try:
        async with channel:
            print(f"== {report.company}: FY{report.years[0]}-FY{report.years[-1]} report, "
                  f"{len(report.text):,} characters ==", file=sys.stderr)
            if args.show_report:
                print(report.text, file=sys.stderr)
            print("== analysis ==", file=sys.stderr)
            t = await stream_analysis(channel, request, out=sys.stdout, metadata=metadata, timeout=args.timeout)
            print()
            print(f"== prompt {t.prompt_tokens} tokens, {t.completion_tokens} generated ({t.finish_reason}); "
                  f"time to first token {t.ttft_s:.2f} s, total {t.total_s:.2f} s, prefill "
                  f"{t.prompt_tokens / t.ttft_s:.0f} tok/s ==", file=sys.stderr)
    finally:
        if stack is not None:
            await stack.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm demo report",
                                 description="Analyse a ~5k-token synthetic financial report through the gateway.")
    from privlm.scenarios.connect import add_target_args

    add_target_args(ap)
    ap.add_argument("--model", default="")
    ap.add_argument("--seed", type=int, default=0, help="report generator seed (same seed, same report)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="weights dtype of the in-process worker")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--show-report", action="store_true", help="print the report itself to stderr")
    args = ap.parse_args(argv)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    raise SystemExit(main())
