"""Batch greedy generation over the native model, without the engine's scheduler.

Used by tests (against transformers' generate()) and the GPU bench; serving goes through the
engine runner, which builds the same SeqChunk batches from its paged block tables. Every rank of
a group calls this with the same prompts (the steps are collective).
"""
from __future__ import annotations

import torch

from .attention import SeqChunk
from .model import DeepseekV3


@torch.no_grad()
def greedy(model: DeepseekV3, prompts: list[list[int]], max_new_tokens: int,
           prefill_chunk: int | None = None) -> list[list[int]]:
    """Prompts -> generated token ids (max_new_tokens each, no EOS stop). Sequence b owns cache
    slots [b * span, (b + 1) * span); prompts are prefilled in chunks of `prefill_chunk` tokens."""
    span = max(len(p) for p in prompts) + max_new_tokens
    cache = model.new_cache(span * len(prompts))
    dev = cache.device
    slots = [torch.arange(b * span, (b + 1) * span, device=dev) for b in range(len(prompts))]
    out: list[list[int]] = [[] for _ in prompts]
    # prefill: all prompts of one chunk index in one step
    done = [0] * len(prompts)
    last_logits = [None] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        ids, pos, smap, seqs, who = [], [], [], [], []
        for b, p in enumerate(prompts):
            if done[b] >= len(p):
                continue
            n = min(len(p) - done[b], prefill_chunk or len(p))
            seqs.append(SeqChunk(len(ids), n, done[b] + n, slots[b]))
            ids += p[done[b]:done[b] + n]
            pos += range(done[b], done[b] + n)
            smap.append(slots[b][done[b]:done[b] + n])
            who.append(b)
            done[b] += n
        logits = model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), seqs,
                       torch.cat(smap), cache)
        for j, b in enumerate(who):
            last_logits[b] = logits[j]
    nxt = [int(l.argmax()) for l in last_logits]
    for step in range(max_new_tokens):
        for b in range(len(prompts)):
            out[b].append(nxt[b])
        if step == max_new_tokens - 1:
            break
        lens = [len(p) + step for p in prompts]           # position of the token being fed
        seqs = [SeqChunk(b, 1, lens[b] + 1, slots[b]) for b in range(len(prompts))]
        smap = torch.stack([slots[b][lens[b]] for b in range(len(prompts))])
        logits = model(torch.tensor(nxt, device=dev), torch.tensor(lens, device=dev), seqs, smap, cache)
        nxt = logits.argmax(-1).tolist()
    return out
