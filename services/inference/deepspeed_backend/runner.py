"""The model runner every rank runs: one left-padded batch of KV caches, grown and shrunk by plans.

Iteration-level batching on top of transformers' own forward: running requests share one
`DynamicCache` whose rows are left-padded to a common width. A prompt is prefilled alone (batch 1)
and its cache is then padded and concatenated into the batch; a finished row is sliced out and
columns that are padding in every remaining row are trimmed. Every rank applies the same plan to
the same state, so the tensor-parallel collectives inside the model always line up.
"""
from __future__ import annotations

import inspect
import os
import time

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .plan import Prefill, StepPlan, StepResult


class Sampler:
    """Greedy / temperature / top-k / top-p with the request's own generator, so a seeded request
    draws the same tokens whatever else is in the batch."""

    def __init__(self, p: Prefill):
        self.temperature, self.top_p, self.top_k = p.temperature, p.top_p, p.top_k
        self.generator = None
        if self.temperature > 0:
            seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        # logits: [V]
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        x = logits / self.temperature
        if 0 < self.top_k < x.numel():
            kth = torch.topk(x, self.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            remove = (torch.cumsum(probs, dim=-1) - probs) > self.top_p
            remove[0] = False
            x = x.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    # t: [B, H_kv_local, T, D] -> [B, H_kv_local, n + T, D]
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


class BatchRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, sampler_rank: bool):
        self.model = model
        self.device = device
        self.sampler_rank = sampler_rank            # only rank 0 samples; the others just compute
        self.rows: list[str] = []                   # request id of each batch row
        self.pad: list[int] = []                    # left padding of each row, in cache columns
        self.cache: DynamicCache | None = None      # layers hold [B, H_kv_local, width, D]
        self.width = 0
        self.samplers: dict[str, Sampler] = {}
        # transformers renamed past_key_values to cache (5.2x); the GPU images still ship 5.17
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def apply(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        if plan.drop:
            self._drop(set(plan.drop))
        if plan.decode:
            t0 = time.perf_counter()
            result.tokens.update(self._decode(dict(plan.decode)))
            result.decode_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in plan.prefill:
            tok = self._prefill(p)
            if tok is not None:
                result.tokens[p.request_id] = tok
        result.prefill_seconds = time.perf_counter() - t0 if plan.prefill else 0.0
        if plan.score:
            result.scores = self._score(plan.score)
        result.kv_cache_tokens = len(self.rows) * self.width
        return result

    # -- batch surgery ------------------------------------------------------------------------
    def _drop(self, ids: set[str]) -> None:
        for rid in ids:
            self.samplers.pop(rid, None)
        keep = [i for i, rid in enumerate(self.rows) if rid not in ids]
        if not keep:
            self.rows, self.pad, self.cache, self.width = [], [], None, 0
            return
        if len(keep) == len(self.rows):
            return
        trim = min(self.pad[i] for i in keep)       # columns that are padding in every kept row
        index = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:].contiguous()
            layer.values = layer.values.index_select(0, index)[:, :, trim:].contiguous()
        self.rows = [self.rows[i] for i in keep]
        self.pad = [self.pad[i] - trim for i in keep]
        self.width -= trim

    def _merge(self, rid: str, cache: DynamicCache, n: int) -> None:
        if self.cache is None:
            self.rows, self.pad, self.cache, self.width = [rid], [0], cache, n
            return
        width = max(self.width, n)
        grow, pad_new = width - self.width, width - n
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(new.keys, pad_new)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(new.values, pad_new)], dim=0)
        self.rows.append(rid)
        self.pad = [p + grow for p in self.pad] + [pad_new]
        self.width = width

    # -- forwards -----------------------------------------------------------------------------
    def _new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotImplementedError("the deepspeed backend batches full-attention caches only "
                                      "(no sliding-window or linear-attention layers)")
        return cache

    @torch.inference_mode()
    def _prefill(self, p: Prefill) -> int | None:
        n = len(p.prompt_token_ids)
        ids = torch.tensor([p.prompt_token_ids], dtype=torch.long, device=self.device)  # [1, n]
        cache = self._new_cache()
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        self._merge(p.request_id, cache, n)
        if not self.sampler_rank:
            return None
        sampler = self.samplers[p.request_id] = Sampler(p)
        return sampler(out.logits[0, -1].float().cpu())

    @torch.inference_mode()
    def _score(self, token_ids: tuple[int, ...]) -> list[float]:
        """Teacher-forced log-probs of token_ids[1:], one forward without the batch's cache (every
        rank runs it: AutoTP's all-reduces); rank 0 returns them."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)     # [1, T]
        out = self.model(input_ids=ids, use_cache=False)
        if not self.sampler_rank:
            return []
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)              # [T-1, V]
        return logp.gather(-1, ids[0, 1:, None])[:, 0].cpu().tolist()

    @torch.inference_mode()
    def _decode(self, feed: dict[str, int]) -> dict[str, int]:
        if set(feed) != set(self.rows):
            raise RuntimeError(f"plan decodes {len(feed)} rows but the batch holds {len(self.rows)}")
        w = self.width
        ids = torch.tensor([[feed[rid]] for rid in self.rows], dtype=torch.long, device=self.device)  # [B, 1]
        pad = torch.tensor(self.pad, device=self.device)
        cols = torch.arange(w + 1, device=self.device)
        mask = (cols[None, :] >= pad[:, None]).long()                                 # [B, w + 1]
        positions = (w - pad)[:, None]                                                # [B, 1]
        # the causal mask takes the query's column from the cache width (w), its rotary position
        # from position_ids: left padding shifts one and not the other
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: self.cache})
        self.width = w + 1
        if not self.sampler_rank:
            return {}
        logits = out.logits[:, -1].float().cpu()        # [B, V]: one copy; generators live on the CPU
        return {rid: self.samplers[rid](logits[i]) for i, rid in enumerate(self.rows)}
