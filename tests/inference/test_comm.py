"""Comm on a real two-rank gloo group (two threads, one TCPStore): the plan broadcast carries small
objects in one round trip and large ones in two, byte-exact, and all-reduce sums."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from services.inference.engine.comm import Comm


def _pair():
    store0 = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    store1 = dist.TCPStore("127.0.0.1", store0.port, 2, False)
    comms = [None, None]

    def make(rank, store):
        comms[rank] = Comm.create(store, rank, 2, "cpu", timeout_s=30)

    ts = [threading.Thread(target=make, args=(r, s)) for r, s in ((0, store0), (1, store1))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return comms


@pytest.fixture(scope="module")
def comms():
    return _pair()


@pytest.mark.parametrize("size", [0, 10, Comm.HEADER - 8 - 30, Comm.HEADER - 8, Comm.HEADER * 3 + 5])
def test_broadcast_object_sizes(comms, size):
    obj = {"blob": bytes((i * 37) % 256 for i in range(size)), "n": size}
    got = [None]

    def follower():
        got[0] = comms[1].broadcast_object()

    t = threading.Thread(target=follower)
    t.start()
    assert comms[0].broadcast_object(obj) is obj
    t.join(30)
    assert got[0] == obj


def test_all_reduce_sums_and_cpu_path_is_gloo(comms):
    xs = [torch.arange(6, dtype=torch.float32) * (r + 1) for r in range(2)]
    ts = [threading.Thread(target=comms[r].all_reduce, args=(xs[r],)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert torch.equal(xs[0], torch.arange(6, dtype=torch.float32) * 3) and torch.equal(xs[0], xs[1])
    # custom all-reduce is a CUDA-only path: on CPU it stays off and says so
    assert comms[0].enable_custom_all_reduce(torch.float32) == "gloo"
    assert comms[0].symm is None


def test_shm_channel_between_processes_small_and_overflow():
    """A real second process reads plans from shared memory, including one over capacity (gloo fallback
    stand-in: a pipe), in order, and acknowledges each before the next is written."""
    import multiprocessing as mp

    from services.inference.engine.shm_channel import ShmChannel

    ch = ShmChannel(None, 0, 2, capacity=1024)
    ctx = mp.get_context("spawn")
    side, back = ctx.Pipe()
    proc = ctx.Process(target=_shm_follower, args=(ch.name, back))
    proc.start()
    try:
        msgs = [{"i": i, "blob": b"x" * (10 if i != 2 else 5000)} for i in range(5)] + [None]
        for m in msgs:
            ch.send(m, side.send)                          # > 1024 bytes: goes through the pipe
        assert side.recv() == msgs[:-1]
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        ch.close()


def _shm_follower(name, conn):
    from services.inference.engine.shm_channel import ShmChannel

    ch = ShmChannel(name, 1, 2)
    got = []
    while True:
        m = ch.recv(conn.recv)
        if m is None:
            break
        got.append(m)
    conn.send(got)
    ch.close()


def test_tp2_engine_with_shm_plans_matches_gloo(tmp_path):
    """The same greedy tokens whichever channel carries the plans (CPU, two real ranks)."""
    from privlm.testing.engine import generate
    from privlm.testing.tiny_models import build
    from services.inference.config import EngineConfig
    from services.inference.engine import create_engine

    path = build("llama", tmp_path / "tiny")
    prompts = [[1, 17, 99, 23, 5], [1] + list(range(30, 50))]
    out = {}
    for ch in ("shm", "gloo"):
        eng = create_engine(EngineConfig(model=str(path), dtype="float32", tp=2, threads=1, plan_channel=ch))
        try:
            assert (eng.runner.comm.channel is not None) == (ch == "shm")
            out[ch] = generate(eng, prompts, 12)
        finally:
            eng.shutdown()
    assert out["shm"] == out["gloo"]


def test_shm_channel_rank0_gives_up_on_a_follower_that_stops_reading():
    """A follower that never takes its plan: rank 0 raises after timeout_s instead of hanging."""
    import time

    from services.inference.engine.shm_channel import ShmChannel

    ch = ShmChannel(None, 0, 2, capacity=1024, timeout_s=0.5)
    try:
        ch.send({"step": 1}, lambda obj: None)               # nobody acknowledges it
        t = time.monotonic()
        with pytest.raises(RuntimeError, match="did not take step plan"):
            ch.send({"step": 2}, lambda obj: None)
        assert time.monotonic() - t < 5
    finally:
        ch.close()


def test_tp2_shm_plans_rank_death_ends_requests(tmp_path):
    """With shared-memory plans a dead follower still ends in-flight work with an error, quickly."""
    import time

    from privlm.testing.engine import submit
    from privlm.testing.tiny_models import build
    from services.inference.config import EngineConfig
    from services.inference.engine import create_engine
    from services.inference.types import FinishReason

    path = build("llama", tmp_path / "tiny")
    eng = create_engine(EngineConfig(model=str(path), dtype="float32", tp=2, threads=1, plan_channel="shm",
                                     rank_timeout_s=5))
    try:
        c = submit(eng, "victim", [1, 5, 9], 200)
        while not c.tokens:
            time.sleep(0.005)
        eng.group.procs[0].kill()
        _, reason, err = c.wait(30)
        assert reason == FinishReason.ERROR and err and not eng.healthy
    finally:
        t = time.monotonic()
        eng.shutdown()
        assert time.monotonic() - t < 40
