"""All-reduce latency on two GPUs for decode-sized tensors: the engine's one-shot symmetric-memory
path vs NCCL (the baseline), both captured in a CUDA graph the way a decode step runs them.

  allreduce.gpu2.oneshot_vs_nccl_us   per-all-reduce time of [B, 4096] bf16, graph of 64 calls

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


def _time_graph(comm, x, use_symm: bool, reps: int = 20) -> float:
    """Microseconds per all-reduce of x, CALLS of them replayed as one graph."""
    import torch

    saved = comm.symm
    comm.symm = saved if use_symm else None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                comm.all_reduce(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(CALLS):
                comm.all_reduce(x)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        comm.all_gather_int(0)                                   # start together
        t = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / (reps * CALLS) * 1e6
    finally:
        comm.symm = saved


def _rank(rank: int, port: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from services.inference.engine.comm import Comm

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False)
    comm = Comm.create(store, rank, 2, f"cuda:{rank}")
    path = comm.enable_custom_all_reduce(torch.bfloat16)
    rows = []
    for b in (1, 8, 64):
        x = torch.full((b, 4096), 0.5 * (rank + 1), dtype=torch.bfloat16, device=comm.device)
        nccl = _time_graph(comm, x.clone(), False)
        one = _time_graph(comm, x.clone(), True) if comm.symm is not None else None
        y = x.clone()
        comm.all_reduce(y)
        ok = bool(torch.all(y == 1.5).item())
        rows.append({"batch": b, "nccl_us": round(nccl, 2), "oneshot_us": None if one is None else round(one, 2),
                     "sum_ok": ok})
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


if __name__ == "__main__":
    main(sys.argv[1:])
