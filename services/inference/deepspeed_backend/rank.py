"""One rank of the DeepSpeed worker group: `python -m services.inference.deepspeed_backend.rank`.

Started by `launch.RankGroup` with the rank's environment already set (RANK, WORLD_SIZE,
MASTER_ADDR/PORT, LOCAL_RANK, LOCAL_SIZE, OMP_NUM_THREADS, TORCH_EXTENSIONS_DIR). Loads the model
with transformers, wraps it with deepspeed.init_inference (AutoTP, no kernel injection), then runs
plans: rank 0 reads each plan from the driver's pipe and broadcasts it; every rank applies it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from .plan import Ready, StepPlan, StepResult

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _exit_with_parent(parent: int) -> None:
    """A rank whose driver died must not linger (it would spin or block in a collective)."""
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _eos_ids(model) -> tuple[int, ...]:
    # transformers' generate() stops on the generation config's ids; fall back to the model config
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _load(cfg: dict, rank: int, world: int):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype, local_files_only=True)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    info = dict(
        model_id=Path(cfg["model"]).name,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        context_window=int(getattr(model.config, "max_position_embeddings", 0) or 0),
        vocab_size=int(model.config.vocab_size),
        eos_token_ids=_eos_ids(model),
        parameters=int(parameters),
    )
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=dtype,
                                      replace_with_kernel_inject=False)
    module = engine.module
    # each rank loaded the whole model; after AutoTP it keeps its slices (plus replicated norms/embeddings)
    info["rank0_weight_bytes"] = sum(t.numel() * t.element_size()
                                     for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values())
    return module, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--conn-fd", type=int, default=-1, help="rank 0: the driver's socket")
    args = ap.parse_args(argv)
    cfg = json.loads(args.config_json)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _exit_with_parent(os.getppid())
    conn = Connection(args.conn_fd) if rank == 0 else None
    t0 = time.perf_counter()
    try:
        import deepspeed
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        cuda = cfg["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        # plans travel as pickled objects: always over gloo, whatever carries the tensors
        plan_group = dist.new_group(backend="gloo") if cuda else None
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        model, info = _load(cfg, rank, world)
        from .runner import BatchRunner

        runner = BatchRunner(model, device, sampler_rank=rank == 0)
        dist.barrier(group=plan_group)
    except BaseException as e:
        traceback.print_exc()
        if conn is not None:
            conn.send(StepResult(error=f"rank {rank} failed to start: {type(e).__name__}: {e}"))
        return 1
    if conn is not None:
        conn.send(Ready(load_seconds=time.perf_counter() - t0, **info))

    while True:
        box = [None]
        if rank == 0:
            try:
                box[0] = conn.recv()
            except (EOFError, OSError):
                box[0] = StepPlan(stop=True)        # the driver went away: take the group down
        dist.broadcast_object_list(box, src=0, group=plan_group)
        plan: StepPlan = box[0]
        if plan.stop:
            break
        try:
            result = runner.apply(plan)
        except Exception as e:
            traceback.print_exc()
            err = f"rank {rank} step failed: {type(e).__name__}: {e}"
            if conn is not None:
                conn.send(StepResult(error=err))
            os._exit(1)                            # peers may be stuck in a collective: the driver kills them
        if conn is not None:
            conn.send(result)
    # every rank has the stop plan: leave without the slow interpreter and process-group teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
