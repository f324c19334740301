"""Native DeepSeek-V3/R1 model: MLA attention (tp) + MoE (ep), loading only this rank's weights.

The model takes a flat batch of new tokens from any number of sequences (prefill chunks or one
decode token each) and a paged latent cache, and returns the logits of each sequence's last token.
Parallelism lives in the layers' weight loaders and in two all-reduces per layer (after o_proj,
after the MoE/MLP); the layer code is otherwise the single-GPU model.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLAttention, RMSNorm, SeqChunk, _param, rope_inv_freq
from .config import DeepseekConfig
from .loader import WeightReader
from .moe import DenseMLP, MoE
from .parallel import Parallel
from .params import shard_range


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekConfig, i: int, par: Parallel, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLAttention(cfg, par.rank, par.world, dtype)
        self.is_moe = cfg.is_moe_layer(i)
        self.mlp = (MoE(cfg, par.rank, par.world, dtype) if self.is_moe
                    else DenseMLP(cfg.hidden_size, cfg.intermediate_size, par.rank, par.world, dtype))
        self.par = par

    def forward(self, h, cos, sin, seqs, slot_mapping, cache):
        a = self.self_attn(self.input_layernorm(h), cos, sin, seqs, slot_mapping, cache)
        h = h + self.par.all_reduce(a)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + self.par.all_reduce(m)


class DeepseekV3(nn.Module):
    def __init__(self, cfg: DeepseekConfig, par: Parallel | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.par, self.dtype = cfg, par or Parallel(), dtype
        p = self.par
        self.vocab = shard_range(cfg.vocab_size, p.world, p.rank)
        self.vocab_per_rank = -(-cfg.vocab_size // p.world)
        self.embed = _param(self.vocab[1] - self.vocab[0], cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, p, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = _param(self.vocab_per_rank, cfg.hidden_size, dtype=dtype)  # zero-padded rows
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim), persistent=False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, par: Parallel | None = None,
                        dtype: torch.dtype = torch.float32) -> "DeepseekV3":
        cfg = DeepseekConfig.load(folder)
        model = cls(cfg, par, dtype)
        model.load(WeightReader(folder, cfg.fp8_block))
        return model.eval()

    @torch.no_grad()
    def load(self, reader: WeightReader) -> None:
        """Read this rank's slices only; FP8 slices are dequantized on CPU as they are read."""
        def read(name, rows=None, cols=None):
            return reader.read(name, rows, cols, self.dtype)
        self.embed.copy_(read("model.embed_tokens.weight", rows=self.vocab))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_layernorm.weight.copy_(read(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(read(p + "post_attention_layernorm.weight"))
            layer.self_attn.load(read, p + "self_attn.")
            layer.mlp.load(read, p + "mlp.")
        self.norm.weight.copy_(read("model.norm.weight"))
        head = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        n = self.vocab[1] - self.vocab[0]
        self.lm_head.zero_()
        self.lm_head[:n].copy_(read(head, rows=self.vocab))
        self.weight_bytes_read = reader.bytes_read

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())

    def new_cache(self, num_slots: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Latent cache [layers, slots, kv_lora_rank + qk_rope_head_dim] (replicated over tp ranks)."""
        c = self.cfg
        return torch.zeros(c.num_hidden_layers, num_slots, c.kv_lora_rank + c.qk_rope_head_dim,
                           dtype=dtype or self.dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seqs: list[SeqChunk],
                slot_mapping: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """input_ids/positions/slot_mapping: [N]; returns logits [len(seqs), vocab] (float32)."""
        v0, v1 = self.vocab
        local = (input_ids >= v0) & (input_ids < v1)
        h = F.embedding((input_ids - v0).clamp(0, v1 - v0 - 1), self.embed) * local.unsqueeze(-1)
        h = self.par.all_reduce(h)                                            # [N, H]
        freqs = positions.float().unsqueeze(-1) * self.inv_freq               # [N, rope/2]
        af = self.cfg.rope.cos_sin_scale
        cos, sin = (freqs.cos() * af).to(self.dtype), (freqs.sin() * af).to(self.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, seqs, slot_mapping, cache[i])
        last = torch.tensor([s.q_start + s.q_len - 1 for s in seqs])
        x = self.norm(h[last])                                                # [S, H]
        logits = self.par.all_gather_last(F.linear(x, self.lm_head).float())  # [S, V_padded]
        return logits[:, :self.cfg.vocab_size]

    def expert_load(self) -> torch.Tensor:
        """Routed-token counts [moe_layers, n_routed_experts] since load (identical on every rank)."""
        return torch.stack([l.mlp.tokens_per_expert for l in self.layers if l.is_moe])


def imbalance(counts: torch.Tensor, ep: int = 1) -> dict[str, float]:
    """Load imbalance of expert counts [layers, E]: max/mean per expert and per EP rank.

    1.0 is perfect balance; the per-rank figure is what bounds an EP step (the busiest rank
    finishes last). Layers are averaged.
    """
    c = counts.double()
    mean = c.mean(-1).clamp(min=1e-9)
    per_rank = c.view(c.shape[0], ep, -1).sum(-1)
    return {"expert_max_over_mean": float((c.max(-1).values / mean).mean()),
            "rank_max_over_mean": float((per_rank.max(-1).values / per_rank.mean(-1).clamp(min=1e-9)).mean()),
            "tokens_routed": float(c.sum())}
