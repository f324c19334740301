"""Greedy decode with the whole step (forward + logits + argmax) captured in one CUDA graph.

Decode at small batch is bound by kernel launches, not bandwidth: a DeepSeek layer is ~40 small
kernels. A graph needs fixed shapes, so each sequence attends over a fixed window of `max_len`
cache slots with an additive mask (-inf past its length) updated in place before each replay.
Everything in the step is free of host synchronisation (the MoE's grouped path included); with
world > 1 the NCCL all-reduces are captured too. Used by the GPU bench; CPU runs the eager path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from services.inference.engine.attention import AttnMetadata

from .generate import greedy
from .model import DeepseekV3ForCausalLM


@torch.no_grad()
def greedy_graph(model: DeepseekV3ForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                 on_step=None) -> list[list[int]]:
    """Same tokens as generate.greedy (prefill eager, decode replayed from a CUDA graph)."""
    dev = model.inv_freq.device
    B = len(prompts)
    span = max(len(p) for p in prompts) + max_new_tokens
    layers, slot_shape = model.kv_cache_spec()
    cache = torch.zeros(layers, span * B, *slot_shape, dtype=model.dtype, device=dev)
    table = torch.arange(span * B, device=dev).view(B, span)                       # [B, span]

    # prefill eagerly through the shared path, into this cache
    first = greedy(model, prompts, 1, cache=cache, span=span)
    ids = torch.tensor([t[0] for t in first], device=dev)                          # [B]
    lens = torch.tensor([len(p) for p in prompts], device=dev)                     # position fed next
    pos = lens.clone()
    slot_mapping = table[torch.arange(B, device=dev), pos]
    mask = torch.zeros(B, 1, 1, span, device=dev)
    meta = AttnMetadata(slot_mapping=slot_mapping, num_decode=B, decode_slots=table.reshape(-1))
    meta.decode_len = span
    meta.decode_mask = mask
    ar = torch.arange(span, device=dev)

    def set_step(p: torch.Tensor) -> None:
        pos.copy_(p)
        slot_mapping.copy_(table[torch.arange(B, device=dev), p])
        mask.copy_(torch.where(ar[None, :] <= p[:, None], 0.0, float("-inf"))[:, None, None, :])

    comm = model.comm

    def step() -> torch.Tensor:
        hidden = model(ids, pos, meta, cache)
        local = F.linear(hidden, model.lm_head.weight).float()                    # [B, V/world]
        if comm.size > 1:          # every rank needs the tokens: all-gather, not gather to rank 0
            parts = [torch.empty_like(local) for _ in range(comm.size)]
            comm.pg.allgather([parts], [local]).wait()
            local = torch.cat(parts, dim=-1)
        return local[:, :model.cfg.vocab_size].argmax(-1)

    # warm up on a side stream (allocator pools, lazy inits), then capture one decode step
    # (the warm-up and capture write position `lens` of the cache; the first replay rewrites it
    # with the same values before reading it)
    set_step(lens)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    toks = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
    toks[:, 0] = ids
    p = lens.clone()
    for i in range(1, max_new_tokens):
        set_step(p)
        graph.replay()
        ids.copy_(out)
        toks[:, i] = out
        p += 1
        if on_step:
            on_step("decode", B)
    return toks.tolist()
