"""`python -m bench.table`: the README's performance table from bench/results/*.json."""
from __future__ import annotations

import json
import sys

from bench.report import RESULTS


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def main(argv: list[str]) -> int:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    print("| figure | value | unit | baseline (same run) | ratio | target | better | machine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['name']}` | {fmt(r['value'])} | {r['unit']} | {fmt(r['baseline'])} | {fmt(r['ratio'])} | "
              f"{fmt(r['target'])} | {r['better']} | {r['machine']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
