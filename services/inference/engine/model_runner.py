"""Model runner: owns one rank's model shard and KV cache and executes a StepPlan.

Rank 0 broadcasts each plan to the follower ranks, every rank runs the same forward (the
tensor-parallel layers all-reduce inside), and rank 0 gets the logits of the rows to sample.
An idle rank 0 sends IDLE at least every config.keepalive_s: a follower waits for the next plan
inside a collective that times out after rank_timeout_s, and idle is a normal state.
"""
from __future__ import annotations

import math
import os
import time

import torch
from transformers import AutoConfig

from services.inference.config import EngineConfig
from services.inference.engine.attention import AttnMetadata, PrefillMeta
from services.inference.engine.comm import Comm
from services.inference.engine.loader import load_weights
from services.inference.engine.models import model_class
from services.inference.engine.scheduler import StepPlan
from services.inference.engine.step_tokens import StepTokens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IDLE = "idle"          # rank 0 -> followers: no work yet, keep waiting (a keep-alive)


def context_window(hf_config) -> int:
    return int(getattr(hf_config, "max_position_embeddings", 0) or 4096)


class ModelRunner:
    def __init__(self, config: EngineConfig, comm: Comm):
        self.config, self.comm = config, comm
        self._sent = time.monotonic()       # rank 0: when followers last got a message
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", config.tp))   # ranks sharing this host
        threads = config.threads or max(1, (os.cpu_count() or 1) // max(1, local_ranks))
        torch.set_num_threads(threads)
        self.hf_config = AutoConfig.from_pretrained(config.model)
        self.architecture = (getattr(self.hf_config, "architectures", None) or ["?"])[0]
        self.dtype = DTYPES[config.dtype]
        self.device = comm.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)    # per thread: this one (the compute thread) runs every step
        self.max_model_len = min(config.max_model_len or context_window(self.hf_config),
                                 context_window(self.hf_config))
        cls = model_class(self.architecture)
        extra = {}
        if config.keep_fp8:
            if not getattr(cls, "supports_keep_fp8", False):
                raise ValueError(f"keep_fp8 applies to FP8 block-scaled checkpoints of models that support it "
                                 f"(DeepSeek-V3/R1), not {self.architecture}")
            extra["keep_fp8"] = True
        with torch.no_grad():
            self.model = cls(self.hf_config, comm, self.dtype, self.device, self.max_model_len, **extra).eval()
            if config.load_format == "dummy":
                self.weight_bytes_read = 0
                init = getattr(self.model, "init_dummy_weights", None)   # FP8 blocks need valid scales
                if init is not None:
                    init()
                else:
                    for prm in self.model.parameters():
                        prm.uniform_(-0.02, 0.02)
            else:
                self.weight_bytes_read = load_weights(self.model, config.model)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        from services.inference.engine import triton_ops

        self.decode_kernels = self._decode_kernels(config, cls)
        triton_ops.PDL = bool(self.decode_kernels and config.pdl)   # per process (one engine per worker)
        if config.custom_all_reduce:
            comm.enable_custom_all_reduce(self.dtype, config.fused_all_reduce_norm)   # collective; CUDA tp > 1
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            from services.inference.engine.layers import prepack_cpu

            prepack_cpu(self.model)
        if self.device.type == "cpu" and comm.size == 1 and config.cpu_fused_decode \
                and hasattr(type(self.model), "fused_decode"):
            from services.inference.engine.cpu_decode import FusedDecode, extension

            ext = extension()               # built once with the C++ compiler; None: Python path
            if ext is not None:
                self.model.fused_decode = FusedDecode(self.model, ext)
        self.parameters_local = sum(p.numel() for p in self.model.parameters())
        # KV cache: [layers, slots, *per-slot shape]; all ranks must agree on the block count.
        layers, slot_shape = self.model.kv_cache_spec()
        bs = config.block_size
        block_bytes = layers * bs * math.prod(slot_shape) * self.dtype.itemsize
        blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // block_bytes)
        self.num_blocks = min(comm.all_gather_int(blocks))
        # One extra block at the end: its first slot is the scratch target for padded rows of
        # CUDA-graph batches, and it pads block-granular gathers. Zeros, so masked-out context read
        # from unused slots is always finite.
        self.scratch_slot = self.num_blocks * bs
        slots = (self.num_blocks + 1) * bs          # + one zero block: scratch / padding
        if hasattr(self.model, "allocate_kv_cache"):
            self.kv_cache = self.model.allocate_kv_cache(slots, self.dtype, self.device)
        else:
            self.kv_cache = torch.zeros((layers, slots, *slot_shape), dtype=self.dtype, device=self.device)
        self.last_ids: torch.Tensor | None = None    # [S] device argmax of the last device_greedy step
        self._tokens = StepTokens(self.device) if comm.rank == 0 else None
        comm.logits_everywhere = config.overlap_enabled   # every rank takes the argmax (device_greedy)
        if self.decode_kernels:
            from services.inference.engine.layers import enable_gemv

            enable_gemv(self.model)         # batch-1 linear layers: Triton GEMV (engine/gemv.py)
        self.graphs = None
        if self.device.type == "cuda" and config.compile_kernels:
            from services.inference.engine import ops

            ops.enable_compile()
        # tp > 1 captures the all-reduces (one-shot or NCCL) inside the graphs (cuda_graphs_tp).
        if self.device.type == "cuda" and config.cuda_graphs and (comm.size == 1 or config.cuda_graphs_tp):
            from services.inference.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)

    def _decode_kernels(self, config: EngineConfig, cls) -> bool:
        """Whether pure-decode graph steps use triton_ops (see EngineConfig.decode_kernels)."""
        from services.inference.engine import triton_ops

        if config.decode_kernels == "torch" or not getattr(cls, "supports_decode_kernels", False):
            return False
        if config.decode_kernels == "triton":
            if not triton_ops.available():
                raise ValueError("decode_kernels='triton' needs the triton package")
            return True
        return self.device.type == "cuda" and triton_ops.available()

    # -- driver / follower entry points -----------------------------------------------------
    def step(self, plan: StepPlan) -> torch.Tensor | None:
        """Rank 0: broadcast the plan, run it; returns logits [S, V] of the rows to sample."""
        self._publish(plan)
        return self.execute(plan)

    def launch(self, plan: StepPlan):
        """Rank 0, plan.device_greedy: broadcast and enqueue the plan without waiting for the device;
        returns a handle whose .tokens() waits for the argmax of its sampled rows (list[int])."""
        self._publish(plan)
        self.execute(plan)
        return self._tokens.start(self.last_ids)

    def keepalive_due_s(self) -> float | None:
        """Rank 0: seconds until idle followers need a keep-alive (None: no followers)."""
        if self.comm.size == 1:
            return None
        return max(0.0, self.config.keepalive_s - (time.monotonic() - self._sent))

    def keep_alive(self) -> None:
        """Rank 0 while idle: send IDLE if followers got nothing for keepalive_s (steps count, so
        a busy group never sends one)."""
        if self.comm.size > 1 and time.monotonic() - self._sent >= self.config.keepalive_s:
            self._publish(IDLE)

    def _publish(self, msg) -> None:
        self.comm.broadcast_object(msg)
        self._sent = time.monotonic()

    def follow(self) -> None:
        """Followers: execute broadcast plans until rank 0 sends None (skipping keep-alives)."""
        while True:
            plan = self.comm.broadcast_object()
            if plan is None:
                self.comm.quiesce()
                return
            if plan == IDLE:
                continue
            self.execute(plan)

    def stop_followers(self) -> None:
        self._publish(None)
        self.comm.quiesce()

    # -- one forward -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Logits [S, V] of the rows to sample (rank 0; every rank for device_greedy plans, which
        also leave their argmax in self.last_ids)."""
        if self.graphs is not None and self.graphs.can_run(plan):
            logits = self.graphs.run(plan, self.last_ids)
            publish = getattr(self.model, "publish_expert_load", None)   # replays skip Python: refresh stats
            if publish is not None:
                publish()
        else:
            ids, pos, meta, sample_rows = self._prepare(plan)
            if plan.prev_rows is not None:                               # inputs still on the device
                nd = plan.num_decode
                ids[:nd] = self.last_ids[torch.tensor(plan.prev_rows, device=self.device)]
            hidden = self.model(ids, pos, meta, self.kv_cache)              # [N, hidden]
            if not sample_rows:
                return None
            rows = hidden[sample_rows] if len(sample_rows) < hidden.shape[0] else hidden
            logits = self.model.compute_logits(rows)                        # [S, V]
        if plan.device_greedy:
            self.last_ids = logits.argmax(dim=-1)                           # [S], same on every rank
        return logits

    def _prepare(self, plan: StepPlan):
        bs, dev = self.config.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for c in plan.chunks:
            bt = c.block_table
            for i, tok in enumerate(c.token_ids):       # PENDING_TOKEN (-1): replaced in execute()
                p = c.start_pos + i
                ids.append(tok)
                pos.append(p)
                slots.append(bt[p // bs] * bs + p % bs)
            if c.score:
                sample_rows.extend(range(len(ids) - len(c.token_ids), len(ids)))
            elif c.sample:
                sample_rows.append(len(ids) - 1)
        meta = AttnMetadata(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev))
        nd = plan.num_decode
        if nd:
            self._prepare_decode(plan.chunks[:nd], meta)
        row = nd
        for c in plan.chunks[nd:]:
            t = len(c.token_ids)
            pm = PrefillMeta(q_start=row, q_end=row + t, start_pos=c.start_pos, ctx_slots=None, mask=None)
            if c.start_pos > 0:
                length = c.start_pos + t
                p = torch.arange(length, device=dev)
                blocks = c.block_table[:-(-length // bs)]
                if all(blocks[i + 1] == blocks[i] + 1 for i in range(len(blocks) - 1)):
                    pm.ctx_range = (blocks[0] * bs, blocks[0] * bs + length)
                bt = torch.tensor(blocks, dtype=torch.int64, device=dev)
                pm.ctx_slots = bt[p // bs] * bs + p % bs                           # [L]
                q_pos = torch.arange(c.start_pos, length, device=dev)
                pm.mask = p[None, :] <= q_pos[:, None]                              # [T, L]
            meta.prefills.append(pm)
            row += t
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.int64, device=dev)
        return ids_t, pos_t, meta, sample_rows

    def _prepare_decode(self, dec, meta: AttnMetadata) -> None:
        bs, dev = self.config.block_size, self.device
        lens = [c.start_pos + 1 for c in dec]
        lmax = max(lens)
        nblk = -(-lmax // bs)
        meta.num_decode, meta.decode_len = len(dec), lmax
        if len(dec) == 1:
            bt = dec[0].block_table[:nblk]
            if all(bt[i + 1] == bt[i] + 1 for i in range(len(bt) - 1)):
                meta.decode_range = (bt[0] * bs, bt[0] * bs + lmax)
                return
        pad = self.num_blocks                                                    # the zero block
        table = torch.tensor([list(c.block_table[:nblk]) + [pad] * (nblk - min(nblk, len(c.block_table)))
                              for c in dec], dtype=torch.int64, device=dev)      # [B, nblk]
        p = torch.arange(lmax, device=dev)
        meta.decode_slots = (table[:, p // bs] * bs + p % bs).reshape(-1)       # [B * Lmax]
        lt = torch.tensor(lens, device=dev)
        if min(lens) != lmax:
            mask = torch.zeros((len(dec), lmax), dtype=torch.float32, device=dev)
            mask.masked_fill_(p[None, :] >= lt[:, None], float("-inf"))
            meta.decode_mask = mask[:, None, None, :]                            # [B, 1, 1, Lmax]
        if self.kv_cache.dim() == 4:             # head-major [layers, 2 Hkv, slots, D]: the block gather
            pb = torch.arange(nblk * bs, device=dev)
            bmask = torch.zeros((len(dec), nblk * bs), dtype=torch.float32, device=dev)
            bmask.masked_fill_(pb[None, :] >= lt[:, None], float("-inf"))
            heads, per_head = self.kv_cache.shape[1], self.kv_cache.shape[2] // bs
            rows = torch.arange(heads, device=dev)[:, None] * per_head + table.reshape(-1)[None, :]
            meta.block_size = bs
            meta.decode_block_rows = rows.reshape(-1)                            # [2 Hkv * B * nblk]
            meta.decode_block_mask = bmask[:, None, None, :]                     # [B, 1, 1, nblk * bs]
