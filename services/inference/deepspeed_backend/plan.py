"""Messages between the driver (the Engine in the caller's process) and the rank processes.

Torch-free and picklable: the driver sends one `StepPlan` to rank 0 over a local pipe, rank 0
broadcasts it to every rank (torch.distributed, gloo), all ranks apply it to their identical batch
state, and rank 0 answers with a `StepResult`. A plan is fully explicit (which rows to drop, which
prompts to prefill, which token each running row feeds next) so that no rank ever decides anything
on its own and the ranks cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prefill:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@dataclass(frozen=True)
class StepPlan:
    drop: tuple[str, ...] = ()                      # rows leaving the batch (finished, cancelled)
    prefill: tuple[Prefill, ...] = ()               # prompts joining the batch, one forward each
    decode: tuple[tuple[str, int], ...] = ()        # (request_id, token to feed) for running rows
    score: tuple[int, ...] = ()                     # teacher-forced log-probs of these tokens (the canary)
    stop: bool = False                              # shut the group down


@dataclass
class StepResult:
    tokens: dict[str, int] = field(default_factory=dict)   # request_id -> sampled token
    error: str = ""                                         # the step failed: the group is unusable
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_cache_tokens: int = 0                                # batch rows x cache width, padding included
    scores: list[float] = field(default_factory=list)       # log p(score[i+1] | score[:i+1])


@dataclass(frozen=True)
class Ready:
    """Rank 0's first message: the group has loaded and wrapped the model."""
    model_id: str
    architecture: str
    context_window: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    parameters: int
    load_seconds: float
    rank0_weight_bytes: int          # after AutoTP: rank 0's share of the weights
