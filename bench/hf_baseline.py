"""The standing baseline: transformers' greedy generate(), timed per token by a streamer."""
from __future__ import annotations

import time


def hf_token_times(model, ids: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """Run greedy generate() for exactly `new_tokens` and return (start, stamps): perf_counter at the
    call, then one stamp per streamer put(). The first put() is the prompt itself, so stamps[1] is the
    first generated token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamp(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)                      # x: [1, T]
    st = Stamp()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=st, pad_token_id=0)
    return t0, st.times


def decode_rate(times: list[float]) -> float:
    """Tokens per second between the first and last of `times` (stamps of generated tokens)."""
    return (len(times) - 1) / (times[-1] - times[0])
