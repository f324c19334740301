"""Native inference engine: torch-free scheduler + paged KV block manager, tensor-parallel model
runner, continuous batching with chunked prefill.

    create_engine(config: EngineConfig) -> Engine   (rank 0; spawns local ranks when tp > 1)
    run_follower(config: EngineConfig) -> None       (ranks != 0 under torchrun / deepspeed launcher)

Importing this package does not import torch (the scheduler is usable without it).
"""
from __future__ import annotations


def create_engine(config):
    """Rank 0's engine (services.inference.types.Engine); see engine/launch.py."""
    from services.inference.engine.launch import create_engine as _create

    return _create(config)


def run_follower(config) -> None:
    """Blocking loop of a follower rank started by a launcher; see engine/launch.py."""
    from services.inference.engine.launch import run_follower as _run

    _run(config)


__all__ = ["create_engine", "run_follower"]
