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
    """Fixed input buffer and output of one captured shape.

    All per-step inputs travel in one int64 buffer (one host-to-device copy):
    [ids B | positions B | own slot B | context length B | block table B * nblk (-1 = none)].
    Context slots and the mask are computed inside the graph from the block table."""

    def __init__(self, b: int, lctx: int, block_size: int, scratch: int, device, kernels: bool = False):
        self.b, self.lctx, self.nblk = b, lctx, lctx // block_size + 1
        self.inp = torch.zeros(4 * b + b * self.nblk, dtype=torch.int64, device=device)
        p = torch.arange(lctx, device=device)
        self.p, self.p_blk, self.p_off = p, p // block_size, p % block_size
        self.block_size, self.scratch = block_size, scratch
        self.kernels = kernels           # triton_ops reads the block table itself: no slots, no mask
        self.graph = None
        self.logits = None

    def meta_and_inputs(self):
        b = self.b
        ids, pos, own, lens = self.inp[:4 * b].view(4, b)
        table = self.inp[4 * b:].view(b, self.nblk)                        # [B, nblk]
        if self.kernels:
            return ids, pos, AttnMetadata(slot_mapping=own, num_decode=b, decode_len=self.lctx,
                                          block_size=self.block_size, decode_table=table, decode_lens=lens)
        blk = table[:, self.p_blk]                                          # [B, Lctx]
        # Padded rows (no blocks) attend to the scratch slot alone, so every row stays finite: a NaN
        # written to the scratch slot would leak into real rows through masked positions.
        valid = self.p[None, :] < lens[:, None]
        slots = torch.where(valid & (blk >= 0), blk * self.block_size + self.p_off, self.scratch)
        mask = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))
        meta = AttnMetadata(slot_mapping=own, num_decode=b, decode_len=self.lctx,
                            decode_slots=slots.reshape(-1), decode_mask=mask[:, None, None, :])
        return ids, pos, meta


class DecodeGraphs:
    def __init__(self, runner, capture: bool = True):
        self.runner = runner
        self.capture = capture
        self.shapes: dict[tuple[int, int], _Static] = {}
        self.pool = None
        self.max_ctx = -(-runner.max_model_len // CTX_BUCKET) * CTX_BUCKET

    def can_run(self, plan: StepPlan) -> bool:
        return plan.num_decode == len(plan.chunks) > 0 and plan.num_decode <= BATCH_BUCKETS[-1]

    def run(self, plan: StepPlan, last_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] (rank 0, or every rank with comm.logits_everywhere) for a pure-decode plan;
        with plan.prev_rows the input tokens are taken from last_ids [S] on the device."""
        chunks = plan.chunks
        b = len(chunks)
        bp = next(x for x in BATCH_BUCKETS if x >= b)
        lctx = min(self.max_ctx, -(-max(c.start_pos + 1 for c in chunks) // CTX_BUCKET) * CTX_BUCKET)
        st = self.shapes.get((bp, lctx))
        new = st is None
        if new:
            st = self.shapes[(bp, lctx)] = _Static(bp, lctx, self.runner.config.block_size,
                                                   self.runner.scratch_slot, self.runner.device,
                                                   self.runner.decode_kernels)
        self._fill(st, chunks, bp, lctx)
        if plan.prev_rows is not None:       # before a capture too: its warm-up runs on these inputs
            if plan.prev_rows == tuple(range(b)):
                st.inp[:b].copy_(last_ids[:b])
            else:
                rows = torch.tensor(plan.prev_rows, dtype=torch.int64)
                if st.inp.is_cuda:
                    rows = rows.pin_memory().to(st.inp.device, non_blocking=True)
                st.inp[:b].copy_(last_ids[rows])
        if new:
            self._capture(st)                # leaves st.inp as it is
        if st.graph is not None:
            st.graph.replay()
            logits = st.logits
        else:
            logits = self._forward(st)
        return None if logits is None else logits[:b]

    def _forward(self, st: _Static):
        ids, pos, meta = st.meta_and_inputs()
        hidden = self.runner.model(ids, pos, meta, self.runner.kv_cache)            # [B, hidden]
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
        """Pack this step's ids, positions, own slots, lengths and block tables into st.inp."""
        bs, scratch, nblk = self.runner.config.block_size, self.runner.scratch_slot, st.nblk
        pad = bp - len(chunks)
        vals = [c.token_ids[0] for c in chunks] + [0] * pad
        vals += [c.start_pos for c in chunks] + [0] * pad
        vals += [c.block_table[c.start_pos // bs] * bs + c.start_pos % bs for c in chunks] + [scratch] * pad
        vals += [c.start_pos + 1 for c in chunks] + [1] * pad
        for c in chunks:
            bt = list(c.block_table[:nblk])
            vals += bt + [-1] * (nblk - len(bt))
        vals += [-1] * (nblk * pad)
        host = torch.tensor(vals, dtype=torch.int64)
        if st.inp.is_cuda:      # pinned: the copy is queued behind the running step, the host goes on
            host = host.pin_memory()    # (the caching host allocator keeps it until the copy is done)
        st.inp.copy_(host, non_blocking=st.inp.is_cuda)
