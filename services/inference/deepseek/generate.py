"""Batch greedy generation over the native model without the engine's scheduler.

Used by tests (against transformers' generate()) and the GPU bench; serving goes through the
engine, whose runner builds the same AttnMetadata from its paged block tables. Every rank of a
group calls this with the same prompts (the steps are collective); rank 0 picks the tokens and
broadcasts them.
"""
from __future__ import annotations

import torch

from services.inference.engine.attention import AttnMetadata, PrefillMeta

from .model import DeepseekV3ForCausalLM


def _prefill_meta(starts: list[int], lens: list[int], slots: list[torch.Tensor]) -> AttnMetadata:
    smap, prefills, row = [], [], 0
    for st, n, sl in zip(starts, lens, slots):
        smap.append(sl[st:st + n])
        pm = PrefillMeta(q_start=row, q_end=row + n, start_pos=st, ctx_slots=None, mask=None)
        if st > 0:
            p = torch.arange(st + n, device=sl.device)
            pm.ctx_slots = sl[:st + n]
            pm.mask = p[None, :] <= torch.arange(st, st + n, device=sl.device)[:, None]   # [T, L]
        prefills.append(pm)
        row += n
    return AttnMetadata(slot_mapping=torch.cat(smap), prefills=prefills)


def _decode_meta(lens: list[int], slots: list[torch.Tensor]) -> AttnMetadata:
    """lens: context length of each sequence including the token being fed."""
    L = max(lens)
    table = torch.stack([sl[:L] for sl in slots])                                  # [B, L]
    meta = AttnMetadata(slot_mapping=torch.stack([sl[n - 1] for sl, n in zip(slots, lens)]),
                        num_decode=len(lens), decode_slots=table.reshape(-1))
    meta.decode_len = L
    if min(lens) != L:
        lt = torch.tensor(lens, device=table.device)
        mask = torch.zeros(len(lens), L, device=table.device)
        mask.masked_fill_(torch.arange(L, device=table.device)[None, :] >= lt[:, None], float("-inf"))
        meta.decode_mask = mask[:, None, None, :]                                  # [B, 1, 1, L] additive
    return meta


@torch.no_grad()
def greedy(model: DeepseekV3ForCausalLM, prompts: list[list[int]], max_new_tokens: int,
           prefill_chunk: int | None = None, on_step=None, cache: torch.Tensor | None = None,
           span: int | None = None) -> list[list[int]]:
    """Prompts -> max_new_tokens greedy ids each (no EOS stop). Sequence b owns cache slots
    [b * span, (b + 1) * span); prompts are prefilled in chunks of `prefill_chunk` tokens.
    on_step(kind, batch) is called after each forward ("prefill"/"decode") for timing."""
    comm = model.comm
    dev = model.inv_freq.device
    span = span or max(len(p) for p in prompts) + max_new_tokens
    if cache is None:
        layers, slot_shape = model.kv_cache_spec()
        cache = torch.zeros(layers, span * len(prompts), *slot_shape, dtype=model.dtype, device=dev)
    slots = [torch.arange(b * span, (b + 1) * span, device=dev) for b in range(len(prompts))]

    def run(ids, pos, meta, rows):
        hidden = model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta, cache)
        logits = model.compute_logits(hidden[torch.tensor(rows, device=dev)])
        picked = None if logits is None else logits.argmax(-1).tolist()
        return comm.broadcast_object(picked)

    done = [0] * len(prompts)
    nxt = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        who = [b for b, p in enumerate(prompts) if done[b] < len(p)]
        lens = [min(len(prompts[b]) - done[b], prefill_chunk or len(prompts[b])) for b in who]
        ids = [t for b, n in zip(who, lens) for t in prompts[b][done[b]:done[b] + n]]
        pos = [i for b, n in zip(who, lens) for i in range(done[b], done[b] + n)]
        meta = _prefill_meta([done[b] for b in who], lens, [slots[b] for b in who])
        rows = list(torch.tensor(lens).cumsum(0).sub(1).tolist())
        for b, t in zip(who, run(ids, pos, meta, rows)):
            nxt[b] = t
        for b, n in zip(who, lens):
            done[b] += n
        if on_step:
            on_step("prefill", len(who))
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        for b in range(len(prompts)):
            out[b].append(nxt[b])
        if step == max_new_tokens - 1:
            break
        pos = [len(p) + step for p in prompts]                # position of the token being fed
        nxt = run(nxt, pos, _decode_meta([q + 1 for q in pos], slots), list(range(len(prompts))))
        if on_step:
            on_step("decode", len(prompts))
    return out
