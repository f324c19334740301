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

from services.inference.engine.gemv import mm_out

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


def _rendezvous(buf: torch.Tensor, name: str):
    from torch.distributed import _symmetric_memory as symm

    handle = symm.rendezvous(buf, name)
    _RENDEZVOUS[0] += 1
    return handle


class SymmAllReduce:
    """Buffer layout (elements of dtype): [one-shot region | fused region 0 | fused region 1 | flags]."""

    fused = False                 # linear_add_rms_norm available (fused_all_reduce.py; set by try_enable)

    def __init__(self, comm, dtype: torch.dtype, max_bytes: int, fuse_norm: bool = False):
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
        from services.inference.engine.fused_all_reduce import MAX_ROWS, MAX_WORLD

        self.dtype, self.rank = dtype, rank
        self.numel = max_bytes // dtype.itemsize
        # The fused regions, flags and peer views exist only when the fused path is asked for.
        total = 3 * self.numel + MAX_ROWS * MAX_WORLD * 4 // dtype.itemsize if fuse_norm else self.numel
        self.buf = symm.empty(total, dtype=dtype, device=comm.device)            # [total] flat
        handle = _rendezvous(self.buf, self.name)
        self.flags_off = 3 * self.numel * dtype.itemsize // 4                    # in int32 elements
        self.ptrs, self.peers = None, []
        if fuse_norm:
            self.buf[3 * self.numel:].zero_()
            torch.cuda.synchronize(comm.device)
            comm.all_gather_int(0)                                               # flags zero everywhere
            self.ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=comm.device)  # [W]
            self.peers = [self.buf if r == rank else handle.get_buffer(r, (total,), dtype) for r in range(size)]

    def fits(self, t: torch.Tensor) -> bool:
        return t.dtype == self.dtype and t.numel() <= self.numel and t.is_contiguous()

    def linear_all_reduce(self, x: torch.Tensor, w: torch.Tensor, use_gemv: bool = False,
                          gated: bool = False) -> torch.Tensor | None:
        """sum over ranks of x @ w.T, the matmul writing straight into the shared buffer (no copy);
        x: [N, K] ([N, 2K] gate|up when gated, gemv.mm_out), w: [M, K] -> [N, M]. None if it does
        not fit (the caller uses the plain path)."""
        n, m = x.shape[0], w.shape[0]
        if x.dim() != 2 or x.dtype != self.dtype or n * m > self.numel:
            return None
        part = self.buf[:n * m].view(n, m)
        mm_out(x, w, part, use_gemv, gated)
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
        torch.ops.symm_mem.one_shot_all_reduce_out(part, "sum", self.name, out)
        return out

    def linear_add_rms_norm(self, x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor,
                            norm_w: torch.Tensor, eps: float, region: int, use_gemv: bool = False,
                            gated: bool = False):
        """(rms_norm(residual + sum over ranks of x @ w.T) * norm_w, residual + sum) in one
        all-reduce kernel (fused_all_reduce.py); x: [N, K], w: [M, K], residual: [N, M]. `region`
        (0 or 1) must differ between consecutive call sites (the module docstring there says why).
        None if it does not apply (the caller uses the plain path)."""
        from services.inference.engine.fused_all_reduce import MAX_ROWS, ar_add_rms_norm

        n, m = x.shape[0], w.shape[0]
        if not self.fused or x.dim() != 2 or x.dtype != self.dtype or n > MAX_ROWS or n * m > self.numel \
                or residual.shape != (n, m) or not residual.is_contiguous():
            return None
        off = (1 + region) * self.numel
        mm_out(x, w, self.buf[off:off + n * m].view(n, m), use_gemv, gated)
        parts = [b[off:off + n * m].view(n, m) for b in self.peers]
        return ar_add_rms_norm(self.ptrs, self.flags_off, parts, residual, norm_w, eps, self.rank)

    def release(self) -> None:
        """Drop the peer views, the pointer table and the buffer (Comm.quiesce, all ranks idle)."""
        self.peers, self.ptrs, self.buf, self.fused = [], None, None, False
        try:
            from torch._C._distributed_c10d import _unregister_process_group

            _unregister_process_group(self.name)          # the registry held the NCCL backend alive
        except (ImportError, RuntimeError):
            pass

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of t across ranks (t: any shape, contiguous, fits())."""
        flat = t.view(-1)
        buf = self.buf[:flat.numel()]
        buf.copy_(flat)
        torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.name, flat)
        return t


def _check_fused(comm, ar: SymmAllReduce) -> str:
    """Collective: try the fused all-reduce + add + RMSNorm against NCCL + ops.add_rms_norm on a
    test row; sets ar.fused on every rank only if every rank got the right result."""
    from services.inference.engine import ops
    from services.inference.engine.fused_all_reduce import ar_add_rms_norm

    ok, err = 1, ""
    try:          # a single-rank launch first: no rank may spin on a peer that cannot launch the kernel
        t = ar.buf[ar.numel:ar.numel + 4096].view(1, 4096)
        ar_add_rms_norm(ar.ptrs[ar.rank:ar.rank + 1], ar.flags_off, [t], torch.zeros_like(t), t[0], 1e-5, 0)
        torch.cuda.synchronize(comm.device)
    except Exception as exc:  # noqa: BLE001 - no triton / no compiler: the unfused path on every rank
        ok, err = 0, f"{type(exc).__name__}: {exc}"[:300]
    if min(comm.all_gather_int(ok)) == 0:
        log.warning("fused all-reduce + RMSNorm unavailable (%s); unfused one-shot path", err or "another rank failed")
        return ""
    try:
        g = torch.Generator(device=comm.device).manual_seed(1234)
        dev, dt = comm.device, ar.dtype
        x = torch.randn((3, 256), generator=g, device=dev).to(dt)
        w = (torch.randn((4096, 256), generator=g, device=dev) * (comm.rank + 1) / 16).to(dt)
        res = torch.randn((3, 4096), generator=g, device=dev).to(dt)
        nw = torch.rand(4096, generator=g, device=dev).to(dt)
        ar.fused = True
        got, got_res = ar.linear_add_rms_norm(x, w, res, nw, 1e-5, 0)
        got2, _ = ar.linear_add_rms_norm(x, w, got_res, nw, 1e-5, 1)     # the other region, chained
        y = x @ w.t()
        comm.pg.allreduce([y]).wait()
        ref, ref_res = ops.add_rms_norm(y, res, nw, 1e-5)
        ref2, _ = ops.add_rms_norm(y, ref_res, nw, 1e-5)
        torch.cuda.synchronize(dev)
        tol = 0.02 if dt != torch.float32 else 1e-4
        for a, b in ((got, ref), (got_res, ref_res), (got2, ref2)):
            if not ((a.float() - b.float()).abs().max() <= tol * b.float().abs().max()):
                ok, err = 0, "fused all-reduce result differs from NCCL + add_rms_norm"
    except Exception as exc:  # noqa: BLE001 - reported, the unfused path is used on every rank
        ok, err = 0, f"{type(exc).__name__}: {exc}"[:300]
    ar.fused = min(comm.all_gather_int(ok)) == 1
    if ar.fused:
        return " + fused all-reduce/add/RMSNorm (Triton)"
    log.warning("fused all-reduce + RMSNorm unavailable (%s); unfused one-shot path", err or "another rank failed")
    return ""


def try_enable(comm, dtype: torch.dtype, max_bytes: int = 1 << 20, fuse_norm: bool = False) -> str:
    """Collectively enable the one-shot path on comm (CUDA, size > 1); returns the path in use."""
    ok, err, ar = 1, "", None
    try:
        ar = SymmAllReduce(comm, dtype, max_bytes, fuse_norm)
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
        fused = _check_fused(comm, ar) if fuse_norm else ""
        return "symmetric-memory one-shot (small tensors)" + fused + " + NCCL"
    log.warning("custom all-reduce unavailable (%s); using NCCL for every all-reduce", err or "another rank failed")
    return "NCCL (custom all-reduce unavailable: " + (err or "another rank failed") + ")"
