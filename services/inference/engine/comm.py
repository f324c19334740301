"""The tensor-parallel group: a private torch.distributed process group (gloo on CPU, NCCL on CUDA).

The group is built directly from a TCPStore rather than through init_process_group, so several
engines (or an engine and a test) can live in one process without fighting over the default group.
"""
from __future__ import annotations

import datetime
import logging
import pickle

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class Comm:
    """Rank/size plus the few collectives the engine needs. tp=1 needs no process group."""

    def __init__(self, rank: int = 0, size: int = 1, pg=None, store=None, device: str = "cpu", cpu_pg=None,
                 timeout_s: float = 60.0):
        self.rank, self.size, self.pg, self.store = rank, size, pg, store
        self.timeout_s = timeout_s                               # the group's rank timeout
        self.cpu_pg = cpu_pg if cpu_pg is not None else pg      # control plane: plans, small ints
        self.device = torch.device(device)
        self.symm = None                                         # SymmAllReduce when enabled (CUDA)
        self.channel = None                                      # ShmChannel for plans (local groups)
        self.all_reduce_path = "none" if size == 1 else ("NCCL" if self.device.type == "cuda" else "gloo")

    @classmethod
    def create(cls, store, rank: int, size: int, device: str, timeout_s: float = 60.0) -> "Comm":
        """Tensors go through NCCL on CUDA (gloo on CPU); step plans always through gloo on CPU."""
        timeout = datetime.timedelta(seconds=timeout_s)
        cpu_pg = dist.ProcessGroupGloo(dist.PrefixStore("privlm_ctl", store), rank, size, timeout)
        pg = cpu_pg
        if str(device).startswith("cuda"):
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(dist.PrefixStore("privlm_tp", store), rank, size, opts)
        return cls(rank, size, pg, store, device, cpu_pg, timeout_s)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum across ranks."""
        if self.size > 1:
            if self.symm is not None and self.symm.fits(t):
                return self.symm.all_reduce_(t)
            self.pg.allreduce([t]).wait()
        return t

    def enable_custom_all_reduce(self, dtype: torch.dtype, fuse_norm: bool = False) -> str:
        """CUDA, size > 1: one-shot all-reduce for small tensors (symm_all_reduce.py), and with
        fuse_norm the all-reduce + residual add + RMSNorm kernel (fused_all_reduce.py). Collective."""
        if self.size > 1 and self.device.type == "cuda":
            from services.inference.engine.symm_all_reduce import try_enable

            self.all_reduce_path = try_enable(self, dtype, fuse_norm=fuse_norm)
        return self.all_reduce_path

    logits_everywhere = False       # gather_cat assembles on every rank (the runner's device argmax)

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor | None:
        """Concatenate equal-shaped [N, P] shards along dim -1 on rank 0 (None elsewhere, unless
        logits_everywhere: it is an all-gather either way, the concatenation is the only extra)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.allgather([outs], [t]).wait()
        return torch.cat(outs, dim=-1) if self.rank == 0 or self.logits_everywhere else None

    HEADER = 16384                  # bytes of a plan sent in the first (usually only) broadcast

    def broadcast_object(self, obj=None):
        """Send a picklable object from rank 0 to all ranks (shared memory when enabled)."""
        if self.size == 1:
            return obj
        if self.channel is not None:
            if self.rank == 0:
                self.channel.send(obj, self._gloo_broadcast_object)
                return obj
            return self.channel.recv(self._gloo_broadcast_object)
        return self._gloo_broadcast_object(obj)

    def enable_shm_plans(self, offer: bool = False) -> bool:
        """Collective: rank 0 offers a shared-memory plan channel (only when every rank is on its
        host); followers attach. Returns whether plans now go through shared memory."""
        if self.size == 1:
            return False
        from services.inference.engine.shm_channel import ShmChannel

        if self.rank == 0:
            ch = ShmChannel(None, 0, self.size, timeout_s=self.timeout_s) if offer else None
            self._gloo_broadcast_object(None if ch is None else ch.name)
        else:
            name = self._gloo_broadcast_object()
            ch = None if name is None else ShmChannel(name, self.rank, self.size, timeout_s=self.timeout_s)
        self.channel = ch
        return ch is not None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _gloo_broadcast_object(self, obj=None):
        """Send a picklable object from rank 0 to all ranks through gloo.

        One gloo broadcast of a fixed HEADER-byte buffer ([8-byte length | payload]) carries any
        object that fits (every decode plan of a normal batch); a larger one needs a second
        broadcast for the rest. One host round trip per step instead of two."""
        head = torch.zeros(self.HEADER, dtype=torch.uint8)
        if self.rank == 0:
            data = pickle.dumps(obj)
            n = len(data)
            head[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
            first = min(n, self.HEADER - 8)
            head[8:8 + first] = torch.frombuffer(bytearray(data[:first]), dtype=torch.uint8)
        self.cpu_pg.broadcast(head, 0).wait()
        if self.rank == 0:
            if n > self.HEADER - 8:
                rest = torch.frombuffer(bytearray(data[self.HEADER - 8:]), dtype=torch.uint8)
                self.cpu_pg.broadcast(rest, 0).wait()
            return obj
        n = int(head[:8].view(torch.int64).item())
        data = head[8:8 + min(n, self.HEADER - 8)].numpy().tobytes()
        if n > self.HEADER - 8:
            rest = torch.empty(n - (self.HEADER - 8), dtype=torch.uint8)
            self.cpu_pg.broadcast(rest, 0).wait()
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def quiesce(self) -> None:
        """Before a rank stops (every rank, between barriers): wait until all device work is done,
        drop the symmetric-memory buffer and the views of the peers' buffers, then shut the NCCL
        communicator down on every rank at once. The fused all-reduce has no exit barrier (a peer
        may still read this rank's buffer), and freeing symmetric memory can be collective (NVSHMEM
        backend: pytorch/pytorch#195500): left to the garbage collector it would run at some later
        point on one rank only and hang there. Left to the destructor at exit, NCCL's abort waited
        60 s on rank 0 for peers already gone ("ProcessGroup abort timed out after 60000 ms")."""
        if self.size == 1 or self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        self.all_gather_int(0)
        if self.symm is not None:
            self.symm.release()
            self.symm = None
            torch.cuda.synchronize(self.device)
            self.all_gather_int(0)
        stop = getattr(self.pg, "shutdown", None) or getattr(self.pg, "_shutdown", None)
        if stop is not None and self.pg is not self.cpu_pg:
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - stopping anyway; the destructor aborts instead
                log.warning("NCCL communicator shutdown failed: %s", exc)
        self.all_gather_int(0)

    def all_gather_int(self, value: int) -> list[int]:
        if self.size == 1:
            return [value]
        t = torch.tensor([value], dtype=torch.int64)
        outs = [torch.empty_like(t) for _ in range(self.size)]
        self.cpu_pg.allgather([outs], [t]).wait()
        return [int(o.item()) for o in outs]
