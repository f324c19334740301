"""`privlm demo NAME` and `privlm bench NAME`: dispatch to the owning area's demo or benchmark."""
from __future__ import annotations

import importlib
import sys

DEMOS = {
    "he": ("privlm.scenarios.he_demo", "main"),
    "report": ("privlm.scenarios.report", "main"),
    "risk": ("privlm.scenarios.risk_demo", "main"),
}
BENCHES = {
    "load": ("privlm.loadgen", "main"),
}


def _dispatch(kind: str, table: dict, argv: list[str]) -> int:
    if not argv or argv[0] not in table:
        print(f"usage: privlm {kind} {{{','.join(table)}}} [ARGS]", file=sys.stderr)
        return 2
    module, func = table[argv[0]]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        print(f"privlm {kind} {argv[0]}: not available in this build ({exc})", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(argv[1:]) or 0)


def main(argv: list[str]) -> int:
    return _dispatch("demo", DEMOS, argv)


def bench_main(argv: list[str]) -> int:
    return _dispatch("bench", BENCHES, argv)
