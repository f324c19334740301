"""`privlm bench load`: concurrent GenerateStream clients against a gateway, with percentiles from
client-side timings and, given the span store, from the traces of the same requests.

Closed loop (default): `--concurrency` clients each send the next request as soon as the previous one
finished. Open loop (`--rate R`): requests start at a fixed rate whatever the latency (how real
traffic behaves, and the only way queueing shows up), at most `--max-in-flight` at once.
Both stop after `--requests` requests or `--duration` seconds, whichever comes first.

Each request carries its own W3C traceparent, so its trace is found by trace id: the gateway's server
span is the child of the span id the load generator put in the header.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field

import grpc

from privlm.base.telemetry import instruments as I
from privlm.base.telemetry.report import PCTS, summarize
from privlm.base.telemetry.spanstore import read_store

GENERATE_STREAM = "/privlm.v1.Inference/GenerateStream"


@dataclass
class Result:
    trace_id: str
    span_id: str
    code: str = "OK"
    e2e_ms: float = 0.0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    tokens: int = 0
    start_s: float = 0.0          # relative to the run's start


@dataclass
class LoadRun:
    mode: str
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0
    late_starts: int = 0          # open loop: arrivals that found max_in_flight requests running

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.code == "OK"]


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def build_request(prompt: str | None, chat: str | None, max_new_tokens: int, request_id: str):
    from privlm.v1 import inference_pb2

    sampling = inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    if chat is not None:
        msgs = [inference_pb2.ChatMessage(role="user", content=chat)]
        return inference_pb2.GenerateRequest(chat=inference_pb2.Chat(messages=msgs), sampling=sampling,
                                             request_id=request_id)
    return inference_pb2.GenerateRequest(prompt=prompt or "", sampling=sampling, request_id=request_id)


async def _one(stub, make_request, index: int, t0: float, timeout_s: float, metadata=()) -> Result:
    trace_id, span_id, header = new_traceparent()
    res = Result(trace_id, span_id)
    start = time.perf_counter()
    res.start_s = start - t0
    first = last = None
    try:
        call = stub.GenerateStream(make_request(index), timeout=timeout_s,
                                   metadata=(("traceparent", header), *metadata))
        async for msg in call:
            n = len(msg.token_ids)
            if n:
                now = time.perf_counter()
                first = first or now
                last = now
                res.tokens += n
    except grpc.aio.AioRpcError as exc:
        res.code = exc.code().name
    end = time.perf_counter()
    res.e2e_ms = (end - start) * 1e3
    if first is not None:
        res.ttft_ms = (first - start) * 1e3
        if res.tokens > 1:
            res.tpot_ms = (last - first) * 1e3 / (res.tokens - 1)
    return res


async def run_load(target: str, make_request, *, concurrency: int = 4, requests: int = 100,
                   duration_s: float = 60.0, rate: float | None = None, max_in_flight: int = 256,
                   timeout_s: float = 120.0, metadata=(), open_channel=None) -> LoadRun:
    """Drive GenerateStream at `target`. make_request(i) -> GenerateRequest.

    open_channel(target) -> grpc.aio.Channel (default: plaintext, for tests and development).
    """
    from privlm.v1 import inference_pb2_grpc

    run = LoadRun("open" if rate else "closed")
    channel = open_channel(target) if open_channel else grpc.aio.insecure_channel(target)
    async with channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        if rate:
            started: list[asyncio.Task] = []
            running: set[asyncio.Task] = set()
            for i in range(requests):
                due = t0 + i / rate
                if due >= deadline:
                    break
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if len(running) >= max_in_flight:
                    run.late_starts += 1
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(_one(stub, make_request, i, t0, timeout_s, metadata))
                running.add(task)
                task.add_done_callback(running.discard)
                started.append(task)
            run.results.extend(await asyncio.gather(*started))
        else:
            counter = iter(range(requests))

            async def client():
                for i in counter:
                    if time.perf_counter() >= deadline:
                        return
                    run.results.append(await _one(stub, make_request, i, t0, timeout_s, metadata))
            await asyncio.gather(*(client() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - t0
    return run


def client_table(run: LoadRun) -> dict:
    ok = run.ok()
    codes: dict[str, int] = {}
    for r in run.results:
        codes[r.code] = codes.get(r.code, 0) + 1
    tokens = sum(r.tokens for r in ok)
    return {"mode": run.mode, "requests": len(run.results), "codes": codes, "wall_s": run.wall_s,
            "requests_per_s": len(ok) / run.wall_s if run.wall_s else 0.0,
            "tokens_per_s": tokens / run.wall_s if run.wall_s else 0.0, "late_starts": run.late_starts,
            "e2e_ms": summarize([r.e2e_ms for r in ok]),
            "ttft_ms": summarize([r.ttft_ms for r in ok if r.ttft_ms is not None]),
            "tpot_ms": summarize([r.tpot_ms for r in ok if r.tpot_ms is not None])}


def trace_timings(spans: list[dict], run: LoadRun) -> dict[str, dict]:
    """Per request (by trace id): the gateway server span's duration and the generation span's TTFT/TPOT."""
    wanted = {r.trace_id: r.span_id for r in run.results}
    out: dict[str, dict] = {}
    for s in spans:
        parent = wanted.get(s["trace_id"])
        if parent is None:
            continue
        row = out.setdefault(s["trace_id"], {})
        if s["kind"] == "SERVER" and s["name"] == GENERATE_STREAM and s["parent_span_id"] == parent:
            row["e2e_ms"] = (s["end_ns"] - s["start_ns"]) / 1e6
        a = s["attributes"]
        if I.PRIVLM_TTFT_MS in a and "ttft_ms" not in row:
            row["ttft_ms"] = float(a[I.PRIVLM_TTFT_MS])
        if I.PRIVLM_TPOT_MS in a and "tpot_ms" not in row:
            row["tpot_ms"] = float(a[I.PRIVLM_TPOT_MS])
    return out


def trace_table(timings: dict[str, dict], expected: int) -> dict:
    rows = list(timings.values())
    return {"requests_with_trace": sum("e2e_ms" in r for r in rows), "requests_expected": expected,
            "e2e_ms": summarize([r["e2e_ms"] for r in rows if "e2e_ms" in r]),
            "ttft_ms": summarize([r["ttft_ms"] for r in rows if "ttft_ms" in r]),
            "tpot_ms": summarize([r["tpot_ms"] for r in rows if "tpot_ms" in r])}


async def wait_for_traces(store: str, run: LoadRun, timeout_s: float) -> dict[str, dict]:
    """Poll the span store until every OK request's server span arrived (exporters batch), or timeout."""
    want = {r.trace_id for r in run.ok()}
    end = time.monotonic() + timeout_s
    while True:
        timings = trace_timings(read_store(store), run) if os.path.exists(store) else {}
        have = {t for t, row in timings.items() if "e2e_ms" in row}
        if want <= have or time.monotonic() >= end:
            return timings
        await asyncio.sleep(0.2)


def format_tables(client: dict, traces: dict | None) -> str:
    out = [f"{client['mode']} loop: {client['requests']} requests in {client['wall_s']:.2f} s, "
           f"{client['requests_per_s']:.2f} req/s, {client['tokens_per_s']:.1f} output tokens/s, codes {client['codes']}"]
    if client["late_starts"]:
        out.append(f"open loop fell behind: {client['late_starts']} arrivals waited for a free slot")
    head = f"{'':<34}{'count':>7}" + "".join(f"{'p' + str(q):>10}" for q in PCTS) + f"{'max':>10}"
    out += ["", "times in ms", head]
    sources = [("client", client)] + ([("trace", traces)] if traces else [])
    for metric, title in (("e2e_ms", "end to end"), ("ttft_ms", "time to first token"),
                          ("tpot_ms", "time per output token")):
        for source, table in sources:
            st = table[metric]
            cells = "".join(f"{st[f'p{q}']:>10.2f}" for q in PCTS) + f"{st['max']:>10.2f}" if st["count"] else ""
            out.append(f"{title + ' (' + source + ')':<34}{st['count']:>7}{cells}")
    if traces:
        out.append(f"\ntraces found for {traces['requests_with_trace']} of {traces['requests_expected']} requests")
        if client["e2e_ms"]["count"] and traces["e2e_ms"]["count"]:
            diffs = "  ".join(f"p{q} {client['e2e_ms'][f'p{q}'] - traces['e2e_ms'][f'p{q}']:+.2f}" for q in PCTS)
            out.append(f"end to end, client minus trace: {diffs} ms")
    return "\n".join(out)


def _auth_metadata(token: str | None) -> tuple:
    try:
        from privlm.client_cli import auth_metadata
    except ImportError:
        return (("authorization", f"Bearer {token}"),) if token else ()
    return auth_metadata(token)


def _connection(args):
    """(target, open_channel): explicit flags win, else the profile `privlm up` wrote, else an error."""
    target, tls_dir, plaintext = args.target, args.tls_dir, args.plaintext_dev
    if not (tls_dir or plaintext):
        from privlm.base.config import cache_dir

        profile_path = cache_dir() / "run" / "endpoint.json"
        if not profile_path.is_file():
            raise SystemExit("privlm bench load: no local suite found: pass --target and --tls-dir DIR or --plaintext-dev")
        profile = json.loads(profile_path.read_text())
        target = target or profile.get("target")
        tls_dir, plaintext = profile.get("tls_dir"), bool(profile.get("plaintext_dev"))
    if not target:
        raise SystemExit("privlm bench load: --target is required")
    if plaintext:
        return target, None
    from privlm.base.transport import TransportConfig

    transport = TransportConfig(tls_dir=tls_dir)
    return target, lambda t: transport.aio_channel(t, "client")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm bench load", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None,
                    help="gateway address host:port (default: the local suite `privlm up` started)")
    ap.add_argument("--token", default=None, help="bearer token (default: $PRIVLM_TOKEN or the dev token)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tls-dir", default=None, help="mTLS certificates (the 'client' identity is presented)")
    g.add_argument("--plaintext-dev", action="store_true", help="DEVELOPMENT ONLY: plaintext gRPC")
    ap.add_argument("--concurrency", type=int, default=4, help="closed loop: concurrent clients")
    ap.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    ap.add_argument("--max-in-flight", type=int, default=256, help="open loop: cap on running requests")
    ap.add_argument("--requests", type=int, default=100, help="stop after this many requests")
    ap.add_argument("--duration", type=float, default=60.0, help="stop starting requests after this many seconds")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt", default=None, help="raw prompt (default: a chat question)")
    ap.add_argument("--chat", default="Summarise the main liquidity risks for a retail bank in two sentences.")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request deadline in seconds")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent (sequentially) before measuring")
    ap.add_argument("--span-store", default=None, help="span store to read the same requests' traces from")
    ap.add_argument("--trace-wait", type=float, default=10.0, help="seconds to wait for spans to arrive")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.duration <= 0 or (args.rate is not None and args.rate <= 0):
        ap.error("concurrency, requests, duration and rate must be positive")
    chat = None if args.prompt is not None else args.chat
    target, open_channel = _connection(args)
    metadata = _auth_metadata(args.token)

    def make_request(i: int):
        return build_request(args.prompt, chat, args.max_new_tokens, f"load-{i}")

    async def go():
        if args.warmup:
            await run_load(target, make_request, concurrency=1, requests=args.warmup, timeout_s=args.timeout,
                           metadata=metadata, open_channel=open_channel)
        run = await run_load(target, make_request, concurrency=args.concurrency, requests=args.requests,
                             duration_s=args.duration, rate=args.rate, max_in_flight=args.max_in_flight,
                             timeout_s=args.timeout, metadata=metadata, open_channel=open_channel)
        traces = None
        if args.span_store:
            timings = await wait_for_traces(args.span_store, run, args.trace_wait)
            traces = trace_table(timings, len(run.ok()))
        return run, traces

    run, traces = asyncio.run(go())
    client = client_table(run)
    if args.json:
        print(json.dumps({"client": client, "traces": traces}, indent=2))
    else:
        print(format_tables(client, traces))
    if not run.ok():
        print("privlm bench load: no request succeeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
