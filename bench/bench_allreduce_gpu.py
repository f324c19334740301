"""All-reduce latency on two GPUs for decode-sized tensors: the engine's one-shot symmetric-memory
path vs NCCL (the baseline), both captured in a CUDA graph the way a decode step runs them.

  allreduce.gpu2.oneshot_vs_nccl_us   per-all-reduce time of [B, 4096] bf16, graph of 64 calls
  allreduce.gpu2.fused_norm_vs_oneshot_us   matmul + all-reduce + add + RMSNorm: fused kernel vs
                                      one-shot + add_rms_norm (opt-in fused_all_reduce_norm)

`python -m bench.bench_allreduce_gpu`   (needs 2 GPUs; prints JSON lines)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CALLS = 64


def _graph_us(comm, body, reps: int = 20):
    """Capture body() (CALLS collective calls) in a CUDA graph after a warm-up on a side stream,
    replay it reps times with every rank starting together: (us per call, body's output)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    comm.all_gather_int(0)                                   # start together
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (reps * CALLS) * 1e6, out


def _time_graph(comm, x, use_symm: bool) -> float:
    """Microseconds per all-reduce of x (one-shot or NCCL), CALLS of them in one graph."""
    saved = comm.symm
    comm.symm = saved if use_symm else None
    try:
        def body():
            for _ in range(CALLS):
                comm.all_reduce(x)
        return _graph_us(comm, body)[0]
    finally:
        comm.symm = saved


def _time_fused(comm, b: int, fused: bool):
    """Microseconds per (row-parallel matmul + all-reduce + residual add + RMSNorm) of [b, 4096]
    bf16, CALLS of them in one graph (K = 256: the matmul is small), fused kernel or one-shot +
    ops.add_rms_norm; returns (us, last normed output)."""
    import torch

    from services.inference.engine import ops

    g = torch.Generator(device=comm.device).manual_seed(7)
    dt, dev, symm = torch.bfloat16, comm.device, comm.symm
    x = torch.randn((b, 256), generator=g, device=dev).to(dt)
    w = (torch.randn((4096, 256), generator=g, device=dev) / 16).to(dt)
    res = torch.randn((b, 4096), generator=g, device=dev).to(dt)
    nw = torch.rand(4096, generator=g, device=dev).to(dt)

    def body():
        h, r = None, res
        for i in range(CALLS):
            if fused:
                h, r = symm.linear_add_rms_norm(x, w, r, nw, 1e-5, i % 2)
            else:
                h, r = ops.add_rms_norm(symm.linear_all_reduce(x, w), r, nw, 1e-5)
        return h

    us, out = _graph_us(comm, body)
    return us, out.clone()


def _rank(rank: int, port: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from services.inference.engine.comm import Comm

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False)
    comm = Comm.create(store, rank, 2, f"cuda:{rank}")
    path = comm.enable_custom_all_reduce(torch.bfloat16, fuse_norm=True)
    from services.inference.engine import ops

    ops.enable_compile()                  # as the engine on CUDA: add + RMSNorm is one compiled kernel
    rows = []
    for b in (1, 8, 64):
        x = torch.full((b, 4096), 0.5 * (rank + 1), dtype=torch.bfloat16, device=comm.device)
        nccl = _time_graph(comm, x.clone(), False)
        one = _time_graph(comm, x.clone(), True) if comm.symm is not None else None
        y = x.clone()
        comm.all_reduce(y)
        ok = bool(torch.all(y == 1.5).item())
        row = {"batch": b, "nccl_us": round(nccl, 2), "oneshot_us": None if one is None else round(one, 2),
               "sum_ok": ok}
        if comm.symm is not None and comm.symm.fused:       # + residual add + RMSNorm, fused or not
            plain, ref = _time_fused(comm, b, False)
            fused, got = _time_fused(comm, b, True)
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row.update(oneshot_add_norm_us=round(plain, 2), fused_us=round(fused, 2), fused_rel_err=round(err, 5))
        rows.append(row)
    comm.quiesce()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"path": path, "rows": rows}))


def main(argv: list[str]) -> None:
    import socket

    import torch
    import torch.multiprocessing as mp

    from bench.report import report

    if torch.cuda.device_count() < 2:
        print("# bench_allreduce_gpu: needs 2 GPUs, skipped", file=sys.stderr)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"allreduce-{os.getpid()}.json")
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    res = json.loads(Path(out).read_text())
    b1 = res["rows"][0]
    if b1["oneshot_us"] is None:
        print(json.dumps({"name": "allreduce.gpu2.oneshot_vs_nccl_us", "error": res["path"], "rows": res["rows"]}))
        return
    report("allreduce.gpu2.oneshot_vs_nccl_us", "us", b1["oneshot_us"], b1["nccl_us"], None, better="lower",
           path=res["path"], rows=res["rows"], calls_per_graph=CALLS, gpu=torch.cuda.get_device_name(0))
    if "fused_us" in b1:
        report("allreduce.gpu2.fused_norm_vs_oneshot_us", "us", b1["fused_us"], b1["oneshot_add_norm_us"], None,
               better="lower", rows=res["rows"], calls_per_graph=CALLS, gpu=torch.cuda.get_device_name(0),
               note="row-parallel matmul (K=256) + all-reduce + residual add + RMSNorm, per call")


if __name__ == "__main__":
    main(sys.argv[1:])
