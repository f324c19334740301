"""Native DeepSeek-V3/R1 for the engine: MLA attention (tensor parallel) + MoE (expert parallel).

Implements the engine's model interface (services/inference/engine/models/__init__.py):
    cls(hf_config, comm, dtype, device, max_pos); kv_cache_spec(); forward(ids, positions, meta,
    caches) -> hidden; compute_logits(hidden) -> logits on rank 0; skip_checkpoint_tensor(name)
Parameter names equal the checkpoint's, and each parameter reads only this rank's slice, so the
engine's load_weights loads it (FP8 block weights dequantized per slice as they arrive). Ranks
share one group: 1/world of the heads, dense/shared MLP columns, vocabulary and routed experts
each; two all-reduces per layer (after o_proj, after the MoE/MLP).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.engine import gemv
from services.inference.engine.attention import AttnMetadata
from services.inference.engine.comm import Comm
from services.inference.engine.loader import load_weights

from . import norm_triton
from .attention import MLAttention, RMSNorm, rope_inv_freq
from .balance import load_placement
from .config import DeepseekConfig
from .fp8_matmul import TENSOR_CORE, WEIGHT_ONLY
from .moe import DenseMLP, MoE
from .params import shard_range
from .weights import Linear, init_dummy, sharded_param

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekConfig, i: int, comm: Comm, dtype, device, placement=None,
                 kernels: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLAttention(cfg, comm.rank, comm.size, dtype, device, kernels)
        self.is_moe = cfg.is_moe_layer(i)
        self.mlp = (MoE(cfg, comm.rank, comm.size, dtype, device, placement, kernels) if self.is_moe
                    else DenseMLP(cfg.hidden_size, cfg.intermediate_size, comm.rank, comm.size, dtype, device,
                                  cfg.fp8_block, cfg.keep_fp8, kernels))
        self.comm = comm

    def forward(self, h, cos, sin, meta, cache):
        h = h + self.comm.all_reduce(self.self_attn(self.input_layernorm(h), cos, sin, meta, cache))
        return h + self.comm.all_reduce(self.mlp(self.post_attention_layernorm(h)))

    def forward_fused(self, h, pending, cos, sin, meta, cache):
        """Decode-kernel steps: the residual adds fused with the next RMSNorm (norm_triton). pending:
        the previous layer's MLP output not yet added to h (None for the first layer). Returns
        (h, this layer's MLP output), the same values as forward() in the same roundings."""
        eps = self.input_layernorm.eps
        if pending is None:
            x = norm_triton.rms_norm(h, self.input_layernorm.weight, eps)
        else:
            h, x = norm_triton.add_rms_norm(h, pending, self.input_layernorm.weight, eps)
        a = self.comm.all_reduce(self.self_attn(x, cos, sin, meta, cache))
        h, x = norm_triton.add_rms_norm(h, a, self.post_attention_layernorm.weight, eps)
        return h, self.comm.all_reduce(self.mlp(x))


class VocabEmbedding(nn.Module):
    def __init__(self, rows: tuple[int, int], hidden: int, dtype, device):
        super().__init__()
        self.rows = rows
        self.weight = sharded_param((rows[1] - rows[0], hidden), dtype, device, rows=rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:        # ids: [N] -> partial [N, H]
        v0, v1 = self.rows
        local = (ids >= v0) & (ids < v1)
        return F.embedding((ids - v0).clamp(0, max(v1 - v0 - 1, 0)), self.weight) * local.unsqueeze(-1)


class DeepseekModel(nn.Module):
    def __init__(self, cfg: DeepseekConfig, comm: Comm, dtype, device, placement: dict | None = None,
                 kernels: bool = False):
        super().__init__()
        self.embed_tokens = VocabEmbedding(shard_range(cfg.vocab_size, comm.size, comm.rank),
                                           cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, comm, dtype, device, (placement or {}).get(i), kernels)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class DeepseekV3ForCausalLM(nn.Module):
    supports_keep_fp8 = True          # the engine passes keep_fp8=True when EngineConfig.keep_fp8
    supports_decode_kernels = True    # graphed decode steps carry block tables (AttnMetadata.decode_table)

    def __init__(self, hf_config, comm: Comm | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_pos: int | None = None, folder: str | Path | None = None,
                 keep_fp8: bool = False, decode_kernels: bool | None = None):
        """hf_config: a transformers config (the engine's call) or a DeepseekConfig. An expert
        placement (balance.py) is read from the model folder when one is there. keep_fp8: an FP8
        checkpoint's linear weights stay FP8 in memory; `fp8_matmul` says how they are multiplied
        (FP8 tensor cores on a CUDA GPU that has them, else dequantized per call: weights.Linear).
        decode_kernels: Triton kernels for decode-sized batches (GEMVs, fused MoE, MLA decode over
        block tables, norms); None = on for CUDA when triton imports."""
        super().__init__()
        cfg = hf_config if isinstance(hf_config, DeepseekConfig) else DeepseekConfig.from_dict(hf_config.to_dict())
        cfg = dataclasses.replace(cfg, keep_fp8=bool(keep_fp8 and cfg.fp8_block))
        folder = folder or getattr(hf_config, "_name_or_path", None)
        if cfg.tie_word_embeddings:
            raise ValueError("tied embeddings are not supported for DeepSeek-V3 (R1 does not tie them)")
        self.cfg, self.comm, self.dtype = cfg, comm or Comm(), dtype
        c = self.comm
        device = torch.device(device)
        self.placement = load_placement(folder, c.size)
        if decode_kernels is None:
            from services.inference.engine import triton_ops

            decode_kernels = device.type == "cuda" and triton_ops.available()
        self.decode_kernels = bool(decode_kernels)
        self.model = DeepseekModel(cfg, c, dtype, device, self.placement, self.decode_kernels)
        self.vocab_per_rank = -(-cfg.vocab_size // c.size)
        self.lm_head = nn.Module()
        self.lm_head.weight = sharded_param((self.vocab_per_rank, cfg.hidden_size), dtype, device,
                                            rows=shard_range(cfg.vocab_size, c.size, c.rank))
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim).to(device),
                             persistent=False)
        self.held = {i: set(l.mlp.local) for i, l in enumerate(self.model.layers) if l.is_moe}  # layer -> experts
        self._published_load: torch.Tensor | None = None     # CPU snapshot of expert_load() (publish_expert_load)
        self._pending_load = None                            # (pinned host tensor, CUDA event) in flight
        self.fp8_matmul, self.fp8_linears, self.fp8_tensor_core_fraction = self._fp8_summary()
        if self.fp8_matmul is not None:
            log.info("keep_fp8: FP8 weights, matmul %s; linears by mode: %s", self.fp8_matmul, self.fp8_linears)

    @classmethod
    def from_pretrained(cls, folder: str | Path, comm: Comm | None = None, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", keep_fp8: bool = False,
                        decode_kernels: bool | None = None) -> "DeepseekV3ForCausalLM":
        model = cls(DeepseekConfig.load(folder), comm, dtype, device, folder=folder, keep_fp8=keep_fp8,
                    decode_kernels=decode_kernels)
        with torch.no_grad():
            model.weight_bytes_read = load_weights(model, folder)
        return model.eval()

    # -- engine interface -------------------------------------------------------------------
    def init_dummy_weights(self) -> None:
        """load_format "dummy": random weights, FP8 ones with valid block scales (weights.init_dummy)."""
        init_dummy(self)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """Other ranks' experts and the MTP module(s) stored after the last layer are never read."""
        m = _EXPERT.match(name)
        if m and int(m.group(2)) not in self.held.get(int(m.group(1)), ()):
            return True
        m = _LAYER.match(name)
        return bool(m and int(m.group(1)) >= self.cfg.num_hidden_layers) or "rotary_emb" in name

    def kv_cache_spec(self) -> tuple[int, tuple[int, ...]]:
        """One latent + rope key per token and layer, the same on every rank (MLA)."""
        return self.cfg.num_hidden_layers, (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                caches: torch.Tensor) -> torch.Tensor:
        """input_ids/positions: [N]; caches: [layers, slots, kv_lora + rope] -> normed hidden [N, H]."""
        h = self.comm.all_reduce(self.model.embed_tokens(input_ids))         # [N, H]
        freqs = positions.float().unsqueeze(-1) * self.inv_freq              # [N, rope/2]
        af = self.cfg.rope.cos_sin_scale
        cos, sin = (freqs.cos() * af).to(self.dtype), (freqs.sin() * af).to(self.dtype)
        if self.decode_kernels and meta.decode_table is not None and not meta.prefills:
            pending = None
            for layer, cache in zip(self.model.layers, caches):
                h, pending = layer.forward_fused(h, pending, cos, sin, meta, cache)
            self.publish_expert_load()
            return norm_triton.add_rms_norm(h, pending, self.model.norm.weight, self.model.norm.eps)[1]
        for layer, cache in zip(self.model.layers, caches):
            h = layer(h, cos, sin, meta, cache)
        self.publish_expert_load()
        return self.model.norm(h)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [S, H] -> float32 logits [S, vocab] on rank 0, None on other ranks."""
        w = self.lm_head.weight
        local = gemv.gemv(hidden, w) if self.decode_kernels and gemv.applies(hidden, w) else F.linear(hidden, w)
        logits = self.comm.gather_cat(local.float())
        return None if logits is None else logits[:, :self.cfg.vocab_size]

    # -- expert load ------------------------------------------------------------------------
    def expert_load(self) -> torch.Tensor:
        """Routed-token counts [moe_layers, n_routed_experts] since load (identical on every rank)."""
        return torch.stack([l.mlp.tokens_per_expert for l in self.model.layers if l.is_moe]).cpu()

    def publish_expert_load(self) -> None:
        """Publish a CPU copy of the expert counts for other threads (engine stats), from the thread
        that runs the model: called after each eager forward. Never synchronises with the GPU: a
        CUDA copy goes to pinned memory asynchronously and becomes the published value once its event
        has completed (seen at a later call), and nothing is issued while a CUDA graph is captured.
        Decode steps replayed from a CUDA graph do not run this; the runner may call it after them."""
        moe = [l.mlp.tokens_per_expert for l in self.model.layers if l.is_moe]
        if not moe:
            return
        if moe[0].device.type != "cuda":
            self._published_load = torch.stack(moe)                           # [L, E], a new tensor
            return
        if torch.cuda.is_current_stream_capturing():
            return
        if self._pending_load is not None and self._pending_load[1].query():
            self._published_load, self._pending_load = self._pending_load[0], None
        if self._pending_load is None:                       # at most one copy in flight
            counts = torch.stack(moe)                                          # [L, E] on the GPU
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending_load = (host, ev)

    def engine_stats(self) -> dict[str, float]:
        """Figures for EngineStats.extra, safe to call from any thread: reads only the published CPU
        snapshot (never the live counters) and constants. Expert load over the group's EP ranks
        (identical on every rank, so rank 0's model suffices); fp8_tensor_core_fraction when keep_fp8
        (share of FP8 linear weights multiplied on FP8 tensor cores; 0 = weight-only FP8)."""
        out: dict[str, float] = {}
        if self.fp8_tensor_core_fraction is not None:
            out["fp8_tensor_core_fraction"] = self.fp8_tensor_core_fraction
        counts = self._published_load
        if counts is not None:
            out.update(self.load_imbalance(counts))
        return out

    def load_imbalance(self, counts: torch.Tensor) -> dict[str, float]:
        """imbalance(counts, ep) with the rank figure of this group's expert placement when one is set."""
        ep = self.comm.size
        out = imbalance(counts, ep)
        if self.placement:
            from .balance import contiguous, max_over_mean, rank_loads

            moe = [i for i, l in enumerate(self.model.layers) if l.is_moe]
            E = self.cfg.n_routed_experts
            per = [max_over_mean(rank_loads(counts[j], self.placement.get(i, contiguous(E, ep))))
                   for j, i in enumerate(moe)]
            out["rank_max_over_mean"] = float(sum(per) / len(per))
        return out

    def _fp8_summary(self) -> tuple[str | None, dict[str, int], float | None]:
        """(fp8_matmul mode, {mode: number of linears}, share of FP8 GEMM weights on tensor cores)."""
        kinds: dict[str, int] = {}
        tc = total = 0
        for m in self.modules():
            if isinstance(m, Linear) and m.fp8_mode is not None:
                key = m.fp8_mode if m.fp8_mode == TENSOR_CORE else f"{m.fp8_mode}: {m.fp8_reason}"
                kinds[key] = kinds.get(key, 0) + 1
                if "absorbed" in m.fp8_reason:          # MLA's kv_b_proj: not a GEMM with activations
                    continue
                total += m.weight.numel()
                tc += m.weight.numel() if m.fp8_mode == TENSOR_CORE else 0
        if not kinds:
            return None, {}, None
        frac = tc / total if total else 0.0
        mode = TENSOR_CORE if frac == 1.0 else WEIGHT_ONLY if frac == 0.0 else f"mixed ({frac:.1%} {TENSOR_CORE})"
        return mode, kinds, frac

    def computed_pairs(self) -> int:
        """(token, expert) pairs this rank's experts computed since load, all MoE layers."""
        return int(sum(l.mlp.computed_pairs for l in self.model.layers if l.is_moe))

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())


def imbalance(counts: torch.Tensor, ep: int = 1) -> dict[str, float]:
    """Load imbalance of expert counts [layers, E]: max/mean per expert and per EP rank.

    1.0 is perfect balance; the per-rank figure bounds an EP step (the busiest rank finishes
    last). Averaged over layers.
    """
    c = counts.double()
    mean = c.mean(-1).clamp(min=1e-9)
    per_rank = c.view(c.shape[0], ep, -1).sum(-1)
    return {"expert_max_over_mean": float((c.max(-1).values / mean).mean()),
            "rank_max_over_mean": float((per_rank.max(-1).values / per_rank.mean(-1).clamp(min=1e-9)).mean()),
            "tokens_routed": float(c.sum())}
