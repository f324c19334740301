"""The model's own tokenizer and chat template, loaded from the local model folder only."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from privlm.base.errors import InvalidArgument


class ModelTokenizer:
    """Wraps transformers' tokenizer for one model folder (never touches a hub: local_files_only).

    The gateway calls it from its tokenizer threads at once: safe because nothing here changes the
    fast tokenizer's settings (truncation, padding) after loading; encoding only reads them."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        # The fast tokenizer's Rust core: decoding through it avoids Python-level overhead per token.
        self.core = self.hf.backend_tokenizer if hasattr(self.hf, "backend_tokenizer") else self.hf._tokenizer
        if not self.hf.chat_template:
            self.has_chat_template = False
        else:
            self.has_chat_template = True

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.hf.encode(prompt, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidArgument("this model has no chat template: send a raw prompt instead of chat")
        conv = [{"role": r, "content": c} for r, c in messages]
        ids = self.hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))
