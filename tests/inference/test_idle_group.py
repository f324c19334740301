"""An idle tensor-parallel group stays up: rank 0 keeps idle followers' plan waits alive.

A follower waits for the next step plan inside a collective bounded by rank_timeout_s; with no
traffic, rank 0 must still send it something (a keep-alive) or the follower times out, exits and
the group is declared dead. Real ranks (local spawn and torchrun-style launcher), real gloo.
"""
from __future__ import annotations

import time

import pytest

from privlm.testing.engine import generate
from privlm.testing.tiny_models import build, hf_greedy
from services.inference.config import EngineConfig
from services.inference.engine import create_engine
from tests.inference.test_engine_tiny import _launcher_follower

PROMPT = [1, 17, 99, 23, 5]
N = 8
TIMEOUT_S = 3.0          # rank timeout
START_S = 120.0          # ranks starting on a busy host may take longer than TIMEOUT_S
IDLE_S = 8.0             # idle for well over the rank timeout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build("llama", tmp_path_factory.mktemp("idle") / "llama")
    return path, hf_greedy(path, PROMPT, N)


def _cfg(path, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), dtype="float32", threads=1, tp=2, rank_timeout_s=TIMEOUT_S,
                        start_timeout_s=START_S, max_num_batched_tokens=32, **kw)


def _idle_then_serve(eng, ref) -> None:
    assert generate(eng, [PROMPT], N) == [ref]
    steps = eng.stats().steps
    time.sleep(IDLE_S)
    assert eng.healthy, "the idle group was declared dead"
    assert eng.stats().steps == steps, "keep-alives are not steps"
    assert generate(eng, [PROMPT], N) == [ref]
    if eng.group.procs:
        assert all(p.poll() is None for p in eng.group.procs), "a follower rank exited while idle"


@pytest.mark.parametrize("plan_channel", ["gloo", "shm"])
def test_local_group_survives_idle(tiny, plan_channel):
    path, ref = tiny
    eng = create_engine(_cfg(path, plan_channel=plan_channel))
    try:
        _idle_then_serve(eng, ref)
    finally:
        eng.shutdown()
    assert [p.returncode for p in eng.group.procs] == [0]


def test_launcher_group_survives_idle(tiny, monkeypatch):
    path, ref = tiny
    follower = _launcher_follower(dict(model=str(path), dtype="float32", threads=1, tp=2,
                                       rank_timeout_s=TIMEOUT_S, start_timeout_s=START_S,
                                       max_num_batched_tokens=32), monkeypatch)
    try:
        eng = create_engine(_cfg(path))
        try:
            _idle_then_serve(eng, ref)
            assert follower.poll() is None, "the launcher follower exited while idle"
        finally:
            eng.shutdown()
        assert follower.wait(timeout=30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
