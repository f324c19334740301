"""One-shot all-reduce over torch symmetric memory, for the small tensors of a decode step (CUDA).

Why: at batch 1 a Llama-8B step at TP=2 does 65 all-reduces of 8 KB. NCCL's latency for such a
message is ~15-20 us even inside a CUDA graph; a one-shot all-reduce (each GPU copies its part to
a buffer its peers can read over NVLink, one barrier, each GPU sums all parts) is a few us. This
uses PyTorch's own symmetric-memory kernels (`torch.ops.symm_mem.one_shot_all_reduce_out`, peer
loads only, no NVLink multicast). Tensors over `max_bytes` (prefill) still go through NCCL.

The group is named and registered with symmetric memory directly from the group's TCPStore, so
the engine keeps its private process groups (comm.py). Enabling is collective and verified: every
rank checks the result against NCCL on a test tensor, and the path is used only if all ranks
succeeded (otherwise NCCL, with a warning, and `Comm.all_reduce_path` says so).
"""
from __future__ import annotations

import logging
import uuid

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


_RENDEZVOUS = [0]        # symmetric-memory rendezvous this process has done


def _register(name: str, store, rank: int, size: int, device: torch.device, nccl_backend):
    """A ProcessGroup over an existing NCCL backend, registered under `name` (symmetric memory
    resolves groups by name; torch 2.11 needs the registration, set_group_info alone is not enough)."""
    from torch._C._distributed_c10d import _register_process_group, _SymmetricMemory

    pg = dist.ProcessGroup(store, rank, size)
    pg._set_default_backend(dist.ProcessGroup.BackendType.NCCL)
    pg._register_backend(device, dist.ProcessGroup.BackendType.NCCL, nccl_backend)
    pg._set_group_name(name)
    _register_process_group(name, pg)
    try:
        _SymmetricMemory.set_group_info(name, rank, size, store)
    except Exception:  # noqa: BLE001 - newer torch resolves it from the registered group
        pass
    return pg


def _rendezvous(buf: torch.Tensor, name: str) -> None:
    from torch.distributed import _symmetric_memory as symm

    symm.rendezvous(buf, name)
    _RENDEZVOUS[0] += 1


class SymmAllReduce:
    def __init__(self, comm, dtype: torch.dtype, max_bytes: int):
        from torch.distributed import _symmetric_memory as symm

        store, rank, size = comm.store, comm.rank, comm.size
        # PyTorch numbers the store keys of symmetric-memory rendezvous with a per-process counter,
        # so ranks whose processes did different numbers of them (an earlier engine in the same
        # process: tests, benchmarks) would wait on each other's keys until the timeout. Refuse
        # instead (the caller then uses NCCL); a worker process builds one engine, so ranks agree.
        if len(set(comm.all_gather_int(_RENDEZVOUS[0]))) > 1:
            raise RuntimeError("an earlier symmetric-memory group in this process (one engine per process "
                               "gets the one-shot all-reduce)")
        if rank == 0:
            store.set("privlm_symm_name", f"privlm_tp_{uuid.uuid4().hex[:12]}")
        self.name = store.get("privlm_symm_name").decode()
        # Registered over the engine's own NCCL backend (what init_process_group would do).
        self.group = _register(self.name, dist.PrefixStore(self.name, store), rank, size, comm.device, comm.pg)
        self.dtype = dtype
        self.numel = max_bytes // dtype.itemsize
        self.buf = symm.empty(self.numel, dtype=dtype, device=comm.device)      # [numel] flat
        _rendezvous(self.buf, self.name)

    def fits(self, t: torch.Tensor) -> bool:
        return t.dtype == self.dtype and t.numel() <= self.numel and t.is_contiguous()

    def linear_all_reduce(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """sum over ranks of x @ w.T, the matmul writing straight into the shared buffer (no copy);
        x: [N, K], w: [M, K] -> [N, M]. None if it does not fit (the caller uses the plain path)."""
        n, m = x.shape[0], w.shape[0]
        if x.dim() != 2 or x.dtype != self.dtype or n * m > self.numel:
            return None
        part = self.buf[:n * m].view(n, m)
        torch.mm(x, w.t(), out=part)
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
        torch.ops.symm_mem.one_shot_all_reduce_out(part, "sum", self.name, out)
        return out

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of t across ranks (t: any shape, contiguous, fits())."""
        flat = t.view(-1)
        buf = self.buf[:flat.numel()]
        buf.copy_(flat)
        torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.name, flat)
        return t


def try_enable(comm, dtype: torch.dtype, max_bytes: int = 1 << 20) -> str:
    """Collectively enable the one-shot path on comm (CUDA, size > 1); returns the path in use."""
    ok, err, ar = 1, "", None
    try:
        ar = SymmAllReduce(comm, dtype, max_bytes)
        x = torch.arange(4096, device=comm.device, dtype=torch.float32).to(dtype) * (comm.rank + 1)
        got = ar.all_reduce_(x.clone())
        comm.pg.allreduce([x]).wait()                                          # NCCL reference
        torch.cuda.synchronize(comm.device)
        if not torch.equal(got, x):
            ok, err = 0, "result differs from NCCL"
    except Exception as exc:  # noqa: BLE001 - reported, then NCCL is used on every rank
        ok, err = 0, f"{type(exc).__name__}: {exc}"
    if min(comm.all_gather_int(ok)) == 1:
        comm.symm = ar
        return "symmetric-memory one-shot (small tensors) + NCCL"
    log.warning("custom all-reduce unavailable (%s); using NCCL for every all-reduce", err or "another rank failed")
    return "NCCL (custom all-reduce unavailable: " + (err or "another rank failed") + ")"
