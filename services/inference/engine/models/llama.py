"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2) written with tensor-parallel layers.

The model never mentions ranks: sharding lives in the layer classes and their weight loaders.
Checkpoint names map onto fused parameters through `packed_modules_mapping`.
"""
from __future__ import annotations

import torch
from torch import nn

from services.inference.engine import ops, triton_ops
from services.inference.engine.attention import AttnMetadata, paged_attention
from services.inference.engine.comm import Comm
from services.inference.engine.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from services.inference.engine.rope import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg, comm: Comm, dtype, device, qkv_bias: bool, o_bias: bool):
        super().__init__()
        hidden = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, qkv_bias, comm, dtype, device)
        self.hq, self.hkv = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        d = self.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, hidden, o_bias, comm, dtype, device,
                                        in_part=(self.qkv_proj.q_head_start * d, self.hq * d))
        self.scale = d ** -0.5
        self.o_proj.fuse_region = 0

    def core(self, x, rope: RotaryEmbedding, cos, sin, meta: AttnMetadata, cache):
        """Attention output before o_proj: [N, Hq_local * D]."""
        n, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj.forward(x)                                  # [N, (Hq + 2 Hkv) * D]
        if meta.decode_table is not None:                # pure decode, kernels: 2 launches, no gather
            q = triton_ops.rope_kv_write(qkv, cos, sin, meta.slot_mapping, cache, self.hq, self.hkv, d)
            return triton_ops.paged_decode_attention(q, cache, meta.decode_table, meta.decode_lens, self.scale,
                                                     meta.block_size)   # [N, Hq * D]
        qk = qkv[:, :(self.hq + self.hkv) * d].view(n, self.hq + self.hkv, d)
        qk = ops.rope(qk, cos, sin, rope.half)                  # [N, Hq + Hkv, D]
        q, k = qk[:, :self.hq], qk[:, self.hq:]
        v = qkv[:, (self.hq + self.hkv) * d:].view(n, self.hkv, d)
        return paged_attention(q, k, v, cache, meta, self.scale)   # [N, Hq * D]


class LlamaMLP(nn.Module):
    def __init__(self, cfg, comm: Comm, dtype, device, bias: bool):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], bias, comm, dtype, device)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias, comm, dtype, device)
        self.inter = self.gate_up_proj.parts[0][1]
        self.down_proj.fuse_region = 1
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported")

    def forward_add_norm(self, x, residual, next_norm):
        """down_proj.add_norm of silu(gate) * up; the batch-1 GEMV applies the SiLU as it reads
        gate|up (gemv.py, gated), so the activation is not a kernel of its own there."""
        gu = self.gate_up_proj.forward(x)                               # [N, 2 * I_local]
        if self.down_proj.gemv and gu.shape[0] == 1:
            return self.down_proj.add_norm(gu, residual, next_norm, gated=True)
        return self.down_proj.add_norm(ops.silu_mul(gu, self.inter), residual, next_norm)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, comm: Comm, dtype, device, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, comm, dtype, device, qkv_bias, o_bias)
        self.mlp = LlamaMLP(cfg, comm, dtype, device, mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, h, residual, rope, cos, sin, meta, cache, next_norm: RMSNorm):
        """h: this layer's normed input, residual: the stream before it. Returns (next_norm's
        output, residual stream): each row-parallel projection is reduced together with the add and
        norm after it (one kernel on the fused all-reduce path, RowParallelLinear.add_norm)."""
        o = self.self_attn.core(h, rope, cos, sin, meta, cache)
        h, residual = self.self_attn.o_proj.add_norm(o, residual, self.post_attention_layernorm)
        return self.mlp.forward_add_norm(h, residual, next_norm)


class LlamaModel(nn.Module):
    def __init__(self, cfg, comm: Comm, dtype, device, qkv_bias, o_bias, mlp_bias):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, comm, dtype, device, qkv_bias, o_bias, mlp_bias)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    """Runner interface: kv_cache_spec(), forward(ids, positions, meta, caches), compute_logits()."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias_default = False
    supports_decode_kernels = True      # LlamaAttention.core runs triton_ops on pure-decode graph steps

    def __init__(self, cfg, comm: Comm, dtype: torch.dtype, device: torch.device, max_pos: int):
        super().__init__()
        self.cfg = cfg
        qkv_bias = getattr(cfg, "attention_bias", self.qkv_bias_default)
        o_bias = getattr(cfg, "attention_bias", False)
        mlp_bias = getattr(cfg, "mlp_bias", False)
        self.model = LlamaModel(cfg, comm, dtype, device, qkv_bias, o_bias, mlp_bias)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, comm, dtype, device)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        attn = self.model.layers[0].self_attn
        self.rope = RotaryEmbedding(cfg, attn.head_dim, max_pos, dtype, device)

    def kv_cache_spec(self) -> tuple[int, tuple[int, ...]]:
        """(number of cache layers, per-token-slot shape of one layer on this rank)."""
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), (2, attn.hkv, attn.head_dim)

    def allocate_kv_cache(self, num_slots: int, dtype, device) -> torch.Tensor:
        """[layers, 2 * Hkv, slots, D]: head-major, so gathered context feeds matmuls directly."""
        attn = self.model.layers[0].self_attn
        return torch.zeros((len(self.model.layers), 2 * attn.hkv, num_slots, attn.head_dim), dtype=dtype,
                           device=device)

    fused_decode = None          # cpu_decode.FusedDecode when the runner enabled it (CPU, tp = 1)

    def forward(self, input_ids, positions, meta: AttnMetadata, caches):
        # input_ids, positions: [N]; caches: [layers, 2 * Hkv, slots, D] -> hidden [N, hidden]
        fused = self.fused_decode
        if fused is not None and fused.can_run(input_ids, meta):
            return fused(input_ids, positions, meta, caches)                # same ops, one C++ call
        cos, sin = self.rope.tables(positions)
        residual = self.model.embed_tokens(input_ids)
        layers = self.model.layers
        ln = layers[0].input_layernorm
        h = ops.rms_norm(residual, ln.weight, ln.eps)
        norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        for layer, cache, nxt in zip(layers, caches, norms):
            # .forward: skip nn.Module.__call__'s hook machinery (~1 us x 200 calls per step)
            h, residual = layer.forward(h, residual, self.rope, cos, sin, meta, cache, nxt)
        return h

    def compute_logits(self, hidden):
        """hidden: [S, hidden] -> logits [S, vocab] on rank 0, None on other ranks."""
        return self.lm_head(hidden)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        return "rotary_emb" in name or (self.tied and name == "lm_head.weight")


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama layout with biases on q/k/v only."""

    def __init__(self, cfg, comm, dtype, device, max_pos):
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("Qwen2 sliding-window attention is not supported")
        nn.Module.__init__(self)
        self.cfg = cfg
        self.model = LlamaModel(cfg, comm, dtype, device, True, False, False)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, comm, dtype, device)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg, self.model.layers[0].self_attn.head_dim, max_pos, dtype, device)
