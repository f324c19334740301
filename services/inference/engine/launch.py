"""Starting the tensor-parallel group: local spawning, launcher (torchrun) environment, followers.

Without launcher variables and tp > 1, rank 0 (the caller's process) opens a TCPStore on a free
port and starts tp-1 follower processes on this host. Under torchrun / the deepspeed launcher
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK set), every process calls create_engine
(rank 0) or run_follower (other ranks) and they meet through the env:// rendezvous.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from services.inference.config import EngineConfig
from services.inference.engine.comm import Comm

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[3]


def _launcher_env() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) when started by a launcher, else None (read at call time)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    return None


def _device(config: EngineConfig, local_rank: int) -> str:
    if config.device == "cuda":
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def _comm_from_launcher(config: EngineConfig, rank: int, world: int, local_rank: int) -> Comm:
    if world != config.tp:
        raise ValueError(f"WORLD_SIZE={world} but tp={config.tp}: they must match")
    timeout = datetime.timedelta(seconds=config.rendezvous_timeout_s)
    store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    _meet(store, rank, world, config)
    return Comm.create(store, rank, world, _device(config, local_rank), config.rank_timeout_s)


def _meet(store, rank: int, world: int, config: EngineConfig) -> None:
    """Wait (rendezvous_timeout_s) until every rank's process is up: the process groups connect
    within rank_timeout_s only, and starting a rank (interpreter, imports) can take longer."""
    store.set(f"privlm_up/{rank}", "1")
    store.wait([f"privlm_up/{r}" for r in range(world)], datetime.timedelta(seconds=config.rendezvous_timeout_s))


HEARTBEAT_S = 0.5                  # launcher followers bump a store counter this often


def _heartbeat_key(rank: int) -> str:
    return f"privlm_heartbeat/{rank}"


def start_heartbeat(store, rank: int, stopped: threading.Event) -> None:
    """Follower of a launcher group: bump this rank's counter in rank 0's store every HEARTBEAT_S.
    If the store is gone (rank 0 died), exit: nothing else would ever stop this process."""
    def run():
        while not stopped.wait(HEARTBEAT_S):
            try:
                store.add(_heartbeat_key(rank), 1)
            except Exception:  # noqa: BLE001 - rank 0 is unreachable
                if not stopped.is_set():
                    log.error("rank %d: rank 0's store is unreachable; exiting", rank)
                    os._exit(1)
    threading.Thread(target=run, name="privlm-heartbeat", daemon=True).start()


class LocalGroup:
    """Rank 0's handle on its follower ranks: per-rank facts, a death monitor, shutdown.

    Spawned followers (procs) are watched as child processes; launcher followers (torchrun, other
    hosts: no procs) through their heartbeat counters in the store, declared dead after dead_after_s
    without a beat."""

    def __init__(self, procs: list[subprocess.Popen], store=None, world: int = 1, dead_after_s: float = 10.0):
        self.procs = procs
        self.weight_bytes: list[int] = []
        self.total_parameters = 0
        self._closing = False
        self._monitor: threading.Thread | None = None
        self._store, self._world, self._dead_after = store, world, dead_after_s

    def _dead_rank(self, beats: dict[int, tuple[int, float]]) -> str | None:
        for r, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                return f"rank {r} exited with code {code}"
        if self._store is not None:
            now = time.monotonic()
            for r in range(1, self._world):
                count = self._store.add(_heartbeat_key(r), 0)
                last, seen = beats.get(r, (-1, now))
                if count != last:
                    beats[r] = (count, now)
                elif now - seen > self._dead_after:
                    return f"rank {r} sent no heartbeat for {self._dead_after:.0f} s"
        return None

    def watch(self, on_death) -> None:
        def run():
            beats: dict[int, tuple[int, float]] = {}
            while not self._closing:
                reason = self._dead_rank(beats)
                if reason and not self._closing:
                    on_death(reason)
                    return
                threading.Event().wait(0.1 if self.procs else HEARTBEAT_S)
        if self.procs or self._store is not None:
            self._monitor = threading.Thread(target=run, name="privlm-rank-monitor", daemon=True)
            self._monitor.start()

    def close(self, timeout: float = 15.0) -> None:
        self._closing = True
        for p in self.procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_local_group(config: EngineConfig) -> tuple[Comm, LocalGroup]:
    """Rank 0 in this process, ranks 1..tp-1 as child processes; rendezvous on a free port."""
    timeout = datetime.timedelta(seconds=config.rendezvous_timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, config.tp, True, timeout=timeout, wait_for_workers=False)
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.tp)
    cfg = json.dumps(dataclasses.asdict(config))
    procs = []
    for r in range(1, config.tp):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(config.tp), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(config.tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                   OMP_NUM_THREADS=str(threads),
                   # ranks share this host's cores: spinning OpenMP waits cost a timeslice per op
                   OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-m", "services.inference.engine.follower", cfg],
                                      env=env, cwd=str(REPO_ROOT)))
    try:
        _meet(store, 0, config.tp, config)
        comm = Comm.create(store, 0, config.tp, _device(config, 0), config.rank_timeout_s)
    except Exception:
        for p in procs:
            p.kill()
        raise
    return comm, LocalGroup(procs)


def run_follower(config: EngineConfig) -> None:
    """Blocking: a follower rank (RANK != 0 in the launcher environment) until rank 0 stops."""
    from services.inference.engine.model_runner import ModelRunner

    env = _launcher_env()
    if env is None or env[0] == 0:
        raise RuntimeError("run_follower needs RANK != 0, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment")
    comm = _comm_from_launcher(config, *env)
    runner = ModelRunner(config, comm)
    comm.all_gather_int(runner.weight_bytes)
    comm.all_gather_int(runner.parameters_local)
    comm.enable_shm_plans()
    stopped = threading.Event()
    start_heartbeat(comm.store, comm.rank, stopped)
    try:
        runner.follow()
    finally:
        stopped.set()
        comm.close()


def create_engine(config: EngineConfig):
    """Build rank 0's engine (spawning local follower ranks when needed); returns an Engine."""
    from services.inference.engine.compute_thread import ComputeThread
    from services.inference.engine.engine import LLMEngine
    from services.inference.engine.model_runner import ModelRunner

    if config.backend != "native":
        raise ValueError(f"create_engine builds the native backend, not {config.backend!r}")
    env = _launcher_env()
    group = None
    local = False                   # every rank on this host (spawned here): shared-memory plans possible
    if env is not None and env[1] > 1:
        if env[0] != 0:
            raise RuntimeError(f"rank {env[0]} must call run_follower, not create_engine")
        if config.plan_channel == "shm":
            raise ValueError("plan_channel='shm' needs the local group (privlm worker --tp N); launcher ranks "
                             "may be on other hosts: use 'gloo' or 'auto'")
        comm = _comm_from_launcher(config, *env)
        group = LocalGroup([], comm.store, env[1], dead_after_s=max(4 * HEARTBEAT_S, min(config.rank_timeout_s, 10.0)))
    elif config.tp > 1:
        comm, group = start_local_group(config)
        local = True
    else:
        comm = Comm(device=_device(config, 0) if config.device == "cuda" else "cpu")
    thread = ComputeThread()        # builds the model and then runs every step (compute_thread.py)
    try:
        runner = thread.call(lambda: ModelRunner(config, comm))
        if group is not None:
            group.weight_bytes = comm.all_gather_int(runner.weight_bytes)
            group.total_parameters = sum(comm.all_gather_int(runner.parameters_local))
            shm = config.plan_channel == "shm" or (config.plan_channel == "auto" and config.device == "cuda")
            comm.enable_shm_plans(offer=local and shm)
    except Exception:
        thread.run_last(lambda: None)
        if group is not None:
            for p in group.procs:
                p.kill()
        raise
    engine = LLMEngine(config, runner, group, thread)
    if group is not None:
        group.watch(engine.mark_dead)
    log.info("engine: %s on %s, tp=%d, all-reduce: %s, step plans: %s, CUDA graphs: %s, fused CPU decode: %s, "
             "decode kernels: %s, overlapped decoding: %s",
             runner.architecture, config.device, config.tp, comm.all_reduce_path,
             "shared memory" if comm.channel is not None else ("gloo" if config.tp > 1 else "-"),
             "on" if runner.graphs is not None else "off",
             "on" if getattr(runner.model, "fused_decode", None) is not None else "off",
             "triton" if runner.decode_kernels else "torch", "on" if engine._overlap else "off")
    return engine
