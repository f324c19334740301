"""Streaming text from token ids: whole UTF-8 characters only, and stop sequences held back."""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas that never split a character.

    Byte-level BPE may emit part of a multi-byte character in one token; decoding that alone gives
    U+FFFD. We decode a short window (prefix_offset:) and only emit text once it no longer ends in a
    replacement character, the approach of text-generation-inference and vLLM.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens and return newly completed text (possibly empty)."""
        out = []
        for tid in token_ids:
            self.ids.append(tid)
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
                out.append(full[len(prefix):])
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.ids)
        return "".join(out)

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        rest = full[len(prefix):]
        return rest.replace(REPLACEMENT, "")


class StopMatcher:
    """Hold back text that could still become a stop sequence; report the first full match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.longest = max((len(s) for s in self.stops), default=0)

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped). After a match, nothing more should be pushed."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            emit, self.pending = self.pending[:cut], ""
            return emit, True
        # keep the longest suffix that is a proper prefix of some stop sequence
        keep = 0
        for k in range(min(self.longest - 1, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        emit = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return emit, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest
