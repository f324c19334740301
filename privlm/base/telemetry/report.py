"""`privlm trace-report`: latency percentiles and critical paths computed from traces.

Input: the embedded receiver's span store (--store) or a Jaeger query API (--jaeger http://host:16686).
Output: P50/P95/P99 per span name and per RPC, time to first token and time per output token (from the
gateway's generation spans and from the worker's queue/prefill/decode spans), and for the slowest
requests the critical path: where the end-to-end time actually went.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request
from collections import defaultdict
from typing import Iterable

from privlm.base.telemetry import instruments as I
from privlm.base.telemetry.spanstore import read_store, records_from_jaeger

PCTS = (50, 95, 99)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict:
    return {"count": len(values), **{f"p{q}": percentile(values, q) for q in PCTS},
            "max": max(values) if values else float("nan")}


def _ms(span: dict) -> float:
    return (span["end_ns"] - span["start_ns"]) / 1e6


def group_traces(spans: Iterable[dict]) -> dict[str, list[dict]]:
    traces: dict[str, dict[str, dict]] = defaultdict(dict)
    for s in spans:
        traces[s["trace_id"]][s["span_id"]] = s   # de-duplicates spans fetched twice
    return {t: list(v.values()) for t, v in traces.items()}


def root_of(spans: list[dict]) -> dict:
    """The span without a parent in this trace (the longest, if the trace is partial)."""
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if not s["parent_span_id"] or s["parent_span_id"] not in ids]
    return max(roots or spans, key=_ms)


def critical_path(spans: list[dict]) -> list[tuple[dict, int, int]]:
    """Segments (span, start_ns, end_ns) of self time on the critical path from the root.

    Walking back from the root's end: the child that finished last before the cursor is on the
    path; recurse into it, move the cursor to its start, repeat; gaps are the parent's own time.
    """
    children: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        children[s["parent_span_id"]].append(s)

    def walk(span: dict, bound: int) -> list[tuple[dict, int, int]]:
        segs = []
        cursor = min(span["end_ns"], bound)
        for child in sorted(children.get(span["span_id"], ()), key=lambda c: c["end_ns"], reverse=True):
            if cursor <= span["start_ns"]:
                break
            if child["start_ns"] >= cursor:
                continue
            child_end = min(child["end_ns"], cursor)
            if child_end < cursor:
                segs.append((span, child_end, cursor))
            segs.extend(walk(child, child_end))
            cursor = max(child["start_ns"], span["start_ns"])
        if cursor > span["start_ns"]:
            segs.append((span, span["start_ns"], cursor))
        return segs

    return walk(root_of(spans), 2**63)


def _label(s: dict) -> str:
    kind = f" ({s['kind'].lower()})" if s["kind"] in ("SERVER", "CLIENT") else ""
    return f"{s['service']}: {s['name']}{kind}"


def analyse(spans: list[dict], slowest: int = 3) -> dict:
    by_name: dict[str, list[float]] = defaultdict(list)
    by_rpc: dict[tuple, list[float]] = defaultdict(list)
    rpc_errors: dict[tuple, int] = defaultdict(int)
    ttft, tpot, w_ttft, w_tpot, queue = [], [], [], [], []
    for s in spans:
        by_name[_label(s)].append(_ms(s))
        a = s["attributes"]
        if a.get("rpc.system") == "grpc" or s["kind"] in ("SERVER", "CLIENT") and s["name"].startswith("/"):
            key = (s["name"], s["kind"], s["service"])
            by_rpc[key].append(_ms(s))
            rpc_errors[key] += s["status"] == "ERROR"
        if I.PRIVLM_TTFT_MS in a:
            ttft.append(float(a[I.PRIVLM_TTFT_MS]))
        if I.PRIVLM_TPOT_MS in a:
            tpot.append(float(a[I.PRIVLM_TPOT_MS]))
        if s["name"] == I.SPAN_QUEUE:
            queue.append(_ms(s))
        if s["name"] == I.SPAN_DECODE and int(a.get(I.GEN_AI_USAGE_OUTPUT_TOKENS, 0)) > 1:
            w_tpot.append(_ms(s) / (int(a[I.GEN_AI_USAGE_OUTPUT_TOKENS]) - 1))
    traces = group_traces(spans)
    for tspans in traces.values():   # worker-side TTFT: submission (queue start) to prefill end
        q = [s for s in tspans if s["name"] == I.SPAN_QUEUE]
        p = [s for s in tspans if s["name"] == I.SPAN_PREFILL]
        if q and p:
            w_ttft.append((max(x["end_ns"] for x in p) - min(x["start_ns"] for x in q)) / 1e6)
    ranked = sorted(traces.items(), key=lambda kv: _ms(root_of(kv[1])), reverse=True)[:slowest]
    slow = []
    for trace_id, tspans in ranked:
        root = root_of(tspans)
        parts: dict[str, float] = defaultdict(float)
        for span, a, b in critical_path(tspans):
            parts[_label(span)] += (b - a) / 1e6
        total = _ms(root)
        slow.append({"trace_id": trace_id, "root": _label(root), "duration_ms": total,
                     "critical_path": [{"span": k, "ms": v, "share": v / total if total else 0.0}
                                       for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]})
    return {
        "spans": len(spans), "traces": len(traces),
        "by_span": {k: summarize(v) for k, v in sorted(by_name.items())},
        "by_rpc": [{"rpc": k[0], "kind": k[1], "service": k[2], "errors": rpc_errors[k], **summarize(v)}
                   for k, v in sorted(by_rpc.items())],
        "time_to_first_token_ms": {"gateway": summarize(ttft), "worker": summarize(w_ttft)},
        "time_per_output_token_ms": {"gateway": summarize(tpot), "worker": summarize(w_tpot)},
        "queue_wait_ms": summarize(queue),
        "slowest": slow,
    }


def _row(label: str, st: dict, width: int) -> str:
    if not st["count"]:
        return f"{label:<{width}} {0:>7}" + "        -" * 4
    return (f"{label:<{width}} {st['count']:>7}" + "".join(f" {st[f'p{q}']:>8.2f}" for q in PCTS)
            + f" {st['max']:>8.2f}")


def format_report(r: dict) -> str:
    out = [f"{r['spans']} spans in {r['traces']} traces; times in ms"]
    rpc_labels = [f"{x['rpc']} ({x['kind'].lower()}, {x['service']})" for x in r["by_rpc"]]
    width = max([len(k) for k in r["by_span"]] + [len(k) for k in rpc_labels] + [40])
    head = f"{'':<{width}} {'count':>7} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"
    out += ["", "per span name", head]
    out += [_row(k, v, width) for k, v in r["by_span"].items()]
    out += ["", "per RPC (kind, service)", head + f" {'errors':>7}"]
    for row, label in zip(r["by_rpc"], rpc_labels):
        out.append(_row(label, row, width) + f" {row['errors']:>7}")
    out += ["", "generation", head]
    for key, title in (("time_to_first_token_ms", "time to first token"),
                       ("time_per_output_token_ms", "time per output token")):
        for side, st in r[key].items():
            out.append(_row(f"{title} ({side})", st, width))
    out.append(_row("queue wait (worker)", r["queue_wait_ms"], width))
    out += ["", f"critical path of the {len(r['slowest'])} slowest requests"]
    for t in r["slowest"]:
        out.append(f"trace {t['trace_id']}  {t['duration_ms']:.2f} ms  root {t['root']}")
        for part in t["critical_path"]:
            out.append(f"    {part['ms']:>9.2f} ms {100 * part['share']:>5.1f}%  {part['span']}")
    return "\n".join(out)


def fetch_jaeger(base: str, services: list[str] | None, limit: int, lookback: str, timeout: float = 30.0) -> list[dict]:
    """Spans from a Jaeger query API (the UI port, 16686): /api/services, then /api/traces per service."""
    base = base.rstrip("/")

    def get(path: str, **params) -> dict:
        url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    names = services or [s for s in get("/api/services").get("data") or [] if s != "jaeger-all-in-one"]
    spans: list[dict] = []
    for name in names:
        spans.extend(records_from_jaeger(get("/api/traces", service=name, limit=limit, lookback=lookback)))
    return spans


def load_spans(args) -> list[dict]:
    if args.jaeger:
        return fetch_jaeger(args.jaeger, args.service, args.limit, args.lookback)
    return read_store(args.store)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm trace-report", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--store", help="span store (JSONL) written by the embedded OTLP receiver "
                                    "(default: the local suite's, .cache/traces/spans.jsonl)")
    src.add_argument("--jaeger", help="Jaeger query API base URL, e.g. http://127.0.0.1:16686")
    ap.add_argument("--service", action="append", help="Jaeger service to query (repeatable; default: all)")
    ap.add_argument("--limit", type=int, default=1000, help="Jaeger: traces per service")
    ap.add_argument("--lookback", default="1h", help="Jaeger: how far back (e.g. 1h, 2d)")
    ap.add_argument("--slowest", type=int, default=3, help="critical paths of this many slowest requests")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if not args.jaeger and not args.store:
        from privlm.base.telemetry.receiver import default_store_path

        args.store = str(default_store_path())
    try:
        spans = load_spans(args)
    except (OSError, ValueError) as exc:
        print(f"privlm trace-report: cannot read spans: {exc}", file=sys.stderr)
        return 2
    if not spans:
        print("privlm trace-report: no spans found", file=sys.stderr)
        return 1
    report = analyse(spans, args.slowest)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
