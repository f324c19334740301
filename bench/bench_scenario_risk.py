"""Risk-alert scenario under load: the highest sustained transaction rate at which P99 from
"transaction sent" to "alert decision received" stays under 800 ms (the deployment guide's bar), on
this machine with the default model, every hop real (bank client -> gateway RiskAlerts -> HE service
-> enclave-side decryption -> model explanation for alerts), all on 127.0.0.1 in this process.

  scenario.risk.max_rate_p99_under_800ms   transactions/s (higher is better; the guide sets the latency
                                           bar, not a rate, so no target)
  scenario.risk.decision_p99_ms            P99 decision latency at that rate (target < 800)
  scenario.risk.first_explanation_token_p50_ms / _p99_ms
                                           time from sent to the first explanation text of an alert,
                                           at that rate (reported, no target in the guide)

Sustained means: decision P99 under the bar, every transaction decided (no errors, all events within
--drain-s after the last send) and every alert explained (the gateway skips explanations, never
decisions, once RiskConfig.max_pending_explanations are pending).
Method: open loop (sends on a fixed schedule whatever the replies do), one bank stream per step,
~22% of transactions above the threshold, each alert explained in up to --explanation-tokens tokens.
Rates double from --start until P99 breaks the bar, then bisect between the last good and the first
bad rate; each step runs --step-s seconds and then drains; the whole search stops at --budget-s.
Features are encrypted ahead (a pool of distinct CKKS ciphertexts cycled with fresh ids), so bank-side
encryption is not timed; memos are sealed at send time. The client shares the CPU with the servers.

`python -m bench.bench_scenario_risk [--step-s 15] [--budget-s 170] [--dtype bfloat16]`
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.report import report  # noqa: E402

BAR_MS = 800.0


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def run_step(stack, keys, pool, rate: float, step_s: float, drain_s: float, threshold: float,
                   max_tokens: int, step: int) -> dict:
    import grpc

    from privlm.scenarios.risk_client import RiskClient

    channel = grpc.aio.insecure_channel(stack.target, options=[("grpc.max_send_message_length", 64 << 20)])
    client = RiskClient(channel, stack.policy, keys)
    await client.open(threshold=threshold, explanation_max_tokens=max_tokens)
    sent: dict[str, float] = {}
    decision_ms: list[float] = []
    first_tok_ms: list[float] = []
    errors = skipped = 0
    n = max(1, int(round(rate * step_s)))

    async def produce():
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tx, ct = pool[i % len(pool)]
            tx_id = f"s{step}-{i:05d}"
            req = client.request(tx_id, ct, tx.memo)
            sent[tx_id] = time.perf_counter()
            await client.write(req)
        await client.done_writing()

    async def consume():
        nonlocal errors, skipped
        seen_first: set[str] = set()
        async for tx_id, ev in client.events():
            now = time.perf_counter()
            kind = ev.WhichOneof("kind")
            if kind == "decision":
                decision_ms.append((now - sent[tx_id]) * 1e3)
            elif kind == "explanation" and ev.explanation.skipped_reason:
                skipped += 1
            elif kind == "explanation" and ev.explanation.text and tx_id not in seen_first:
                seen_first.add(tx_id)
                first_tok_ms.append((now - sent[tx_id]) * 1e3)
            elif kind == "error":
                errors += 1

    producer = asyncio.create_task(produce())
    consumer = asyncio.create_task(consume())
    t_start = time.perf_counter()
    await producer
    send_s = time.perf_counter() - t_start
    try:
        await asyncio.wait_for(consumer, drain_s)
        drained = True
    except asyncio.TimeoutError:
        drained = False
        client.cancel()
    await channel.close()
    undecided = n - len(decision_ms) - errors
    # Transactions still undecided when the drain timed out count as over the bar.
    lat = decision_ms + [float("inf")] * max(0, undecided)
    return {"rate": rate, "sent": n, "decided": len(decision_ms), "errors": errors, "drained": drained,
            "send_s": round(send_s, 2), "achieved_rate": round(n / send_s, 2) if send_s else rate,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "explained": len(first_tok_ms),
            "explanations_skipped": skipped,
            "first_token_ms": first_tok_ms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_scenario_risk")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--start", type=float, default=2.0, help="first rate, transactions/s")
    ap.add_argument("--max-rate", type=float, default=128.0)
    ap.add_argument("--step-s", type=float, default=15.0)
    ap.add_argument("--drain-s", type=float, default=20.0)
    ap.add_argument("--budget-s", type=float, default=170.0, help="stop searching after this long")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--explanation-tokens", type=int, default=32)
    ap.add_argument("--pool", type=int, default=48, help="distinct encrypted transactions cycled")
    args = ap.parse_args(argv or [])

    from privlm.model_prep import prepare
    from privlm.scenarios.risk_data import transactions
    from privlm.scenarios.stack import ScenarioStack
    from services.he.keys import BankKeys

    t_begin = time.perf_counter()
    model_dir = prepare(log=lambda *a: None)

    async def search():
        stack = await ScenarioStack.start(model_dir, risk=True, dtype=args.dtype, threads=args.threads)
        steps = []
        try:
            keys = await asyncio.to_thread(BankKeys.generate, 1, 8)
            txs = transactions(args.pool, seed=21)
            cts = await asyncio.to_thread(keys.encrypt_records, np.array([t.features for t in txs]))
            pool = list(zip(txs, cts))
            # Warm-up: one short step at the start rate (JIT paths, first explanations), not counted.
            await run_step(stack, keys, pool, args.start, 3.0, args.drain_s, args.threshold,
                           args.explanation_tokens, 0)
            good, bad, rate, i = None, None, args.start, 1
            while rate <= args.max_rate:
                elapsed = time.perf_counter() - t_begin
                if elapsed + args.step_s + args.drain_s > args.budget_s:
                    break
                r = await run_step(stack, keys, pool, rate, args.step_s, args.drain_s, args.threshold,
                                   args.explanation_tokens, i)
                i += 1
                # Sustained: the bar holds, every transaction decided in time (no drain timeout, no
                # errors), and every alert explained (none skipped for overload).
                ok = (r["p99_ms"] < BAR_MS and r["drained"] and r["errors"] == 0
                      and r["explanations_skipped"] == 0)
                steps.append({k: v for k, v in r.items() if k != "first_token_ms"} | {"ok": ok})
                print(f"# rate {rate:.1f}/s: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                      f"{r['explained']} alerts explained, {r['explanations_skipped']} skipped, "
                      f"{'ok' if ok else 'not sustained'}", file=sys.stderr, flush=True)
                if ok:
                    good = (rate, r)
                else:
                    bad = rate
                if bad is None:
                    rate *= 2
                elif good is None or bad / good[0] <= 1.2:
                    break
                else:
                    rate = round((good[0] + bad) / 2, 2)
            return good, steps
        finally:
            await stack.close()

    good, steps = asyncio.run(search())
    total_s = time.perf_counter() - t_begin
    # Context: the highest tested rate whose decisions alone held the bar (explanations may have been
    # skipped there), so the explanation-bound and the decision-bound limits are both visible.
    decision_only = max((st["rate"] for st in steps if st["p99_ms"] < BAR_MS and st["drained"]
                         and st["errors"] == 0), default=0.0)
    common = dict(dtype=args.dtype, step_s=args.step_s, decisions_only_max_tested_rate=decision_only,
                  explanation_tokens=args.explanation_tokens,
                  threshold=args.threshold, steps=steps, bench_s=round(total_s, 1))
    if good is None:
        report("scenario.risk.max_rate_p99_under_800ms", "tx/s", 0.0, None, None, "higher",
               note=f"P99 over {BAR_MS:.0f} ms already at {args.start}/s", **common)
        return 0
    rate, r = good
    report("scenario.risk.max_rate_p99_under_800ms", "tx/s", rate, None, None, "higher",
           p99_ms=round(r["p99_ms"], 1), p50_ms=round(r["p50_ms"], 1), samples=r["decided"], **common)
    report("scenario.risk.decision_p99_ms", "ms", r["p99_ms"], None, BAR_MS, "lower", rate=rate,
           samples=r["decided"])
    ft = r["first_token_ms"]
    extra = dict(rate=rate, alerts=len(ft), explanation_tokens=args.explanation_tokens)
    report("scenario.risk.first_explanation_token_p50_ms", "ms", pct(ft, 50), None, None, "lower", **extra)
    report("scenario.risk.first_explanation_token_p99_ms", "ms", pct(ft, 99), None, None, "lower",
           p90_ms=round(pct(ft, 90), 1), **extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
