"""DeepSpeed inference backend (`--backend deepspeed`): transformers + deepspeed.init_inference (AutoTP).

The compatibility path of the deployment guide, served through the same Engine protocol as the
native engine. See engine.py (driver), launch.py (rank processes), rank.py and runner.py (per rank).
"""
from .engine import DeepSpeedEngine, create_deepspeed_engine

__all__ = ["DeepSpeedEngine", "create_deepspeed_engine"]
