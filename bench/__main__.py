"""`python -m bench [NAME...]`: run every bench/bench_*.py module (or the named ones) in turn."""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    names = argv or sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    failed = 0
    for name in names:
        mod = importlib.import_module(f"bench.{name}")
        print(f"# {name}", file=sys.stderr, flush=True)
        try:
            mod.main([])
        except Exception as exc:  # keep going: one broken benchmark must not hide the others
            failed += 1
            print(f"# {name} failed: {exc!r}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
