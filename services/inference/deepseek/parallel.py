"""The process group a DeepSeek model runs in: attention tensor parallel and expert parallel share it.

With tp == ep == world, every rank holds 1/world of the attention heads, of the dense/shared MLPs,
of the vocabulary, and of the routed experts. No-ops at world == 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world: int = 1
    group: object | None = None   # a torch.distributed ProcessGroup (gloo on CPU, NCCL on GPU)

    @classmethod
    def from_default_group(cls) -> "Parallel":
        if not dist.is_initialized():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), None)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (partial outputs of row-parallel layers and of local experts)."""
        if self.world > 1:
            if t.dtype == torch.bfloat16 and t.device.type == "cpu":
                # gloo has no bf16 sum on every build: reduce in f32 (exact for a sum of bf16 values
                # up to rounding of the final cast)
                f = t.float()
                dist.all_reduce(f, group=self.group)
                t.copy_(f)
            else:
                dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized shards along the last dim (vocab-parallel logits)."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
