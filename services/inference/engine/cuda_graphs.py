"""Captured decode steps (CUDA graphs): one graph per (padded batch, context bucket).

A pure-decode step at batch B and longest context L runs as the graph for B rounded up to a batch
bucket and L rounded up to CTX_BUCKET, so shapes are static: padded rows write their KV to the
runner's scratch slot and attend to it alone; context beyond a sequence's length is masked out.
Replaying a graph removes the per-kernel launch cost that dominates small-batch decode on GPU.
With capture=False the same padded path runs eagerly (used to test the padding logic on CPU).
"""
from __future__ import annotations

import torch

from services.inference.engine.attention import AttnMetadata
from services.inference.engine.scheduler import StepPlan

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CTX_BUCKET = 256


class _Static:
    """Fixed input buffers and output of one captured shape."""

    def __init__(self, b: int, lctx: int, device):
        z = dict(dtype=torch.int64, device=device)
        self.ids = torch.zeros(b, **z)                                      # [B]
        self.pos = torch.zeros(b, **z)                                      # [B]
        self.slot_mapping = torch.zeros(b, **z)                             # [B]
        self.slots = torch.zeros(b * lctx, **z)                             # [B * Lctx]
        self.mask = torch.zeros((b, 1, 1, lctx), dtype=torch.float32, device=device)
        self.meta = AttnMetadata(slot_mapping=self.slot_mapping, num_decode=b, decode_len=lctx,
                                 decode_slots=self.slots, decode_mask=self.mask)
        self.graph = None
        self.logits = None


class DecodeGraphs:
    def __init__(self, runner, capture: bool = True):
        self.runner = runner
        self.capture = capture
        self.shapes: dict[tuple[int, int], _Static] = {}
        self.pool = None
        self.max_ctx = -(-runner.max_model_len // CTX_BUCKET) * CTX_BUCKET

    def can_run(self, plan: StepPlan) -> bool:
        return plan.num_decode == len(plan.chunks) > 0 and plan.num_decode <= BATCH_BUCKETS[-1]

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [B, V] (rank 0) for a pure-decode plan."""
        chunks = plan.chunks
        b = len(chunks)
        bp = next(x for x in BATCH_BUCKETS if x >= b)
        lctx = min(self.max_ctx, -(-max(c.start_pos + 1 for c in chunks) // CTX_BUCKET) * CTX_BUCKET)
        st = self.shapes.get((bp, lctx))
        if st is None:
            st = self.shapes[(bp, lctx)] = _Static(bp, lctx, self.runner.device)
            self._fill(st, chunks, bp, lctx)
            self._capture(st)
        self._fill(st, chunks, bp, lctx)
        if st.graph is not None:
            st.graph.replay()
            logits = st.logits
        else:
            logits = self._forward(st)
        return None if logits is None else logits[:b]

    def _forward(self, st: _Static):
        hidden = self.runner.model(st.ids, st.pos, st.meta, self.runner.kv_cache)   # [B, hidden]
        return self.runner.model.compute_logits(hidden)                             # [B, V]

    def _capture(self, st: _Static) -> None:
        if not self.capture:
            return
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._forward(st)
        torch.cuda.current_stream().wait_stream(s)
        st.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(st.graph, pool=self.pool):
            st.logits = self._forward(st)
        self.pool = st.graph.pool()

    def _fill(self, st: _Static, chunks, bp: int, lctx: int) -> None:
        """Copy this step's ids, positions, slots and mask into the static buffers."""
        bs, scratch = self.runner.config.block_size, self.runner.scratch_slot
        b = len(chunks)
        nblk = lctx // bs + 1
        table = torch.full((bp, nblk), -1, dtype=torch.int64)
        for i, c in enumerate(chunks):
            bt = c.block_table[:nblk]
            table[i, :len(bt)] = torch.tensor(bt, dtype=torch.int64)
        p = torch.arange(lctx)
        slots = table[:, p // bs] * bs + p % bs                              # [Bp, Lctx]
        lens = torch.tensor([c.start_pos + 1 for c in chunks] + [1] * (bp - b))
        valid = p[None, :] < lens[:, None]
        slots = torch.where(valid & (table[:, p // bs] >= 0), slots, torch.full_like(slots, scratch))
        slots[b:] = scratch
        pos = torch.tensor([c.start_pos for c in chunks] + [0] * (bp - b))
        ids = torch.tensor([c.token_ids[0] for c in chunks] + [0] * (bp - b))
        own = torch.tensor([c.block_table[c.start_pos // bs] * bs + c.start_pos % bs for c in chunks]
                           + [scratch] * (bp - b))
        mask = torch.zeros((bp, lctx), dtype=torch.float32).masked_fill_(~valid, float("-inf"))
        nb = self.runner.device.type == "cuda"
        st.ids.copy_(ids, non_blocking=nb)
        st.pos.copy_(pos, non_blocking=nb)
        st.slot_mapping.copy_(own, non_blocking=nb)
        st.slots.copy_(slots.reshape(-1), non_blocking=nb)
        st.mask.copy_(mask[:, None, None, :], non_blocking=nb)
