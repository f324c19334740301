"""Native inference engine: torch-free scheduler + paged KV block manager, tensor-parallel model
runner, continuous batching with chunked prefill.

    create_engine(config: EngineConfig) -> Engine   (rank 0; spawns local ranks when tp > 1)
    run_follower(config: EngineConfig) -> None       (ranks != 0 under torchrun / deepspeed launcher)
"""
from services.inference.engine.launch import create_engine, run_follower

__all__ = ["create_engine", "run_follower"]
