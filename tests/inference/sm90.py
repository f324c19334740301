"""Runs a script that compiles Triton kernels for sm_90 with the bundled ptxas (no GPU needed) and
returns the JSON of its last stdout line; skips the test when that ptxas is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compile_json(script: str, tmp_path, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    p = subprocess.run([sys.executable, script, "--sm90"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0 and "ptxas" in p.stderr and "not found" in p.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])
