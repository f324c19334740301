"""Start and watch the DeepSpeed rank processes (one OS process per tensor-parallel rank).

Each rank gets its own environment, set only in the processes launched here (never in the
caller): a free rendezvous port, LOCAL_SIZE equal to the world size (DeepSpeed's shared-memory
all-reduce crashes with SIGSEGV otherwise), OMP_NUM_THREADS per rank (two ranks on two cores run
20x slower without it) and TORCH_EXTENSIONS_DIR inside the repository's cache, where DeepSpeed's
JIT-compiled communication op is built once and reused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path

from ..config import EngineConfig
from .plan import Ready, StepPlan, StepResult

REPO_ROOT = Path(__file__).resolve().parents[3]
EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"


SHM_DIR = Path("/dev/shm")


def shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's CPU shared-memory all-reduce buffers of the group on `port` (one ~69 MB file per
    rank, named deepspeed_allreduce_buffer_<n>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed never unlinks them: without this every group start leaks ~69 MB per rank of RAM
    in /dev/shm (found at 16 GB on a development machine). Called once the ranks have exited."""
    for f in shm_buffers(port):
        try:
            f.unlink()
        except OSError:
            pass


class GroupFailed(RuntimeError):
    """A rank died or a step failed: the group cannot serve any more."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(config: EngineConfig) -> int:
    if config.threads:
        return config.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // config.tp)


def rank_env(config: EngineConfig, rank: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(config.tp), LOCAL_SIZE=str(config.tp),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads_per_rank(config)),
        TORCH_EXTENSIONS_DIR=str(EXTENSIONS_DIR),
        DS_ACCELERATOR="cuda" if config.device == "cuda" else "cpu",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
    )
    return env


class RankGroup:
    """The rank processes plus the driver's end of rank 0's pipe."""

    def __init__(self, procs: list[subprocess.Popen], conn: Connection, port: int):
        self.procs, self.conn, self.port = procs, conn, port
        self._pidfds: list[int] = []
        for p in procs:
            try:
                self._pidfds.append(os.pidfd_open(p.pid))
            except (AttributeError, OSError):
                pass

    @classmethod
    def start(cls, config: EngineConfig) -> "RankGroup":
        EXTENSIONS_DIR.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cfg = json.dumps(dataclasses.asdict(config))
        mine, theirs = socket.socketpair()
        procs = []
        try:
            for rank in range(config.tp):
                cmd = [sys.executable, "-m", "services.inference.deepspeed_backend.rank", "--config-json", cfg]
                fds: tuple[int, ...] = ()
                if rank == 0:
                    cmd += ["--conn-fd", str(theirs.fileno())]
                    fds = (theirs.fileno(),)
                # DeepSpeed prints to stdout; keep the caller's stdout clean
                procs.append(subprocess.Popen(cmd, env=rank_env(config, rank, port), cwd=REPO_ROOT,
                                              pass_fds=fds, stdin=subprocess.DEVNULL, stdout=2))
        except BaseException:
            for p in procs:
                p.kill()
            raise
        finally:
            theirs.close()
        return cls(procs, Connection(mine.detach()), port)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def dead(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every rank that has exited."""
        return [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]

    def _receive(self, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.conn.poll():
                try:
                    return self.conn.recv()
                except (EOFError, OSError) as e:
                    raise GroupFailed(f"rank 0 closed its pipe ({e!r})") from e
            dead = self.dead()
            if dead:
                raise GroupFailed("rank(s) exited: " + ", ".join(f"rank {r} code {c}" for r, c in dead))
            if deadline is not None and time.monotonic() > deadline:
                raise GroupFailed(f"no answer from the group within {timeout:.0f} s")
            wait([self.conn, *self._pidfds], timeout=0.5)

    def wait_ready(self, timeout: float) -> Ready:
        msg = self._receive(timeout)
        if isinstance(msg, StepResult):
            raise GroupFailed(msg.error)
        return msg

    def step(self, plan: StepPlan) -> StepResult:
        try:
            self.conn.send(plan)
        except OSError as e:
            raise GroupFailed(f"cannot reach rank 0 ({e!r})") from e
        result = self._receive(None)
        if result.error:
            raise GroupFailed(result.error)
        return result

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self._close()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the ranks to leave their loop; kill whatever has not exited by the deadline."""
        try:
            if all(p.poll() is None for p in self.procs):
                self.conn.send(StepPlan(stop=True))
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _close(self) -> None:
        remove_shm_buffers(self.port)
        self.conn.close()
        for fd in self._pidfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._pidfds = []
