"""A request's state inside the engine (torch-free): tokens, progress, KV blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.inference.types import FinishReason, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation request. `tokens` = prompt + generated; KV holds the first `num_computed`.

    A sequence whose KV covers all but its last token is decoding; otherwise it is (re)prefilling.
    After preemption `num_computed` drops to 0 and the whole token list is recomputed.
    """
    seq_id: int
    request_id: str
    prompt_len: int
    tokens: list[int]
    sampling: SamplingParams
    max_len: int                          # hard cap on len(tokens) (context window)
    eos_token_ids: frozenset[int] = frozenset()
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    deferred: bool = False                # prefill chunk skipped last step for a new arrival

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens whose KV is not yet computed (1 while decoding)."""
        return len(self.tokens) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.remaining == 1 and self.num_output > 0

    def append(self, token: int) -> FinishReason | None:
        """Add a sampled token; return the finish reason if the sequence is done."""
        self.tokens.append(token)
        if token in self.eos_token_ids:
            return FinishReason.END_OF_SEQUENCE
        if self.num_output >= self.sampling.max_new_tokens or len(self.tokens) >= self.max_len:
            return FinishReason.LENGTH
        return None
