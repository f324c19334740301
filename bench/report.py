"""One JSON object per figure, printed as one line to stdout and written to bench/results/NAME.json.

Keys: name (dotted figure name), unit, value, baseline (the same run's comparison figure or null),
ratio (value/baseline, or baseline/value when better is "lower", so > 1 means better than the
baseline; null without a baseline), target (the ratio to reach, or null for a reported figure),
better ("higher" or "lower"), machine (CPU model and threads, or GPU name and count), then any
figure-specific keys the benchmark passes. Each run overwrites NAME.json; bench/table.py renders the
files as a table.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model and threads, or the GPU name when CUDA is in use."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
        threads = torch.get_num_threads()
    except ImportError:
        threads = os.cpu_count()
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {threads} threads"


def report(name: str, unit: str, value: float, baseline: float | None, target: float | None,
           better: str = "higher", **extra) -> dict:
    """Print and store one figure. `ratio` is value/baseline (or baseline/value when lower is better)."""
    if better not in ("higher", "lower"):
        raise ValueError("better must be 'higher' or 'lower'")
    ratio = None
    if baseline:
        ratio = value / baseline if better == "higher" else baseline / value
    row = {"name": name, "unit": unit, "value": round(value, 4),
           "baseline": None if baseline is None else round(baseline, 4),
           "ratio": None if ratio is None else round(ratio, 3), "target": target, "better": better,
           "machine": machine(), **extra}
    print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row
