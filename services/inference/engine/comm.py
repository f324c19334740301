"""The tensor-parallel group: a private torch.distributed process group (gloo on CPU, NCCL on CUDA).

The group is built directly from a TCPStore rather than through init_process_group, so several
engines (or an engine and a test) can live in one process without fighting over the default group.
"""
from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist


class Comm:
    """Rank/size plus the few collectives the engine needs. tp=1 needs no process group."""

    def __init__(self, rank: int = 0, size: int = 1, pg=None, store=None, device: str = "cpu", cpu_pg=None):
        self.rank, self.size, self.pg, self.store = rank, size, pg, store
        self.cpu_pg = cpu_pg if cpu_pg is not None else pg      # control plane: plans, small ints
        self.device = torch.device(device)

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
        return cls(rank, size, pg, store, device, cpu_pg)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum across ranks."""
        if self.size > 1:
            self.pg.allreduce([t]).wait()
        return t

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor | None:
        """Concatenate equal-shaped [N, P] shards along dim -1 on rank 0 (None elsewhere)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.allgather([outs], [t]).wait()
        return torch.cat(outs, dim=-1) if self.rank == 0 else None

    def broadcast_object(self, obj=None):
        """Send a picklable object from rank 0 to all ranks (two collectives: length, bytes)."""
        if self.size == 1:
            return obj
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self.cpu_pg.broadcast(length, 0).wait()
        if self.rank != 0:
            data = torch.empty(int(length.item()), dtype=torch.uint8)
        self.cpu_pg.broadcast(data, 0).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def all_gather_int(self, value: int) -> list[int]:
        if self.size == 1:
            return [value]
        t = torch.tensor([value], dtype=torch.int64)
        outs = [torch.empty_like(t) for _ in range(self.size)]
        self.cpu_pg.allgather([outs], [t]).wait()
        return [int(o.item()) for o in outs]
