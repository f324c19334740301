"""Tensor-parallel layers with their own weight loaders (the nano-vllm pattern).

Models are written with these classes and never mention ranks. Each parameter carries a
`weight_loader(param, src, shard_id)` that reads only this rank's slice from `src`, a safetensors
slice (`safe_open(...).get_slice(name)`) or a tensor, so no rank materialises the full weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.engine import gemv, ops
from services.inference.engine.comm import Comm


def partition(n: int, size: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank's part when n items are split as evenly as possible."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def _read(src, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, start+length) of a safetensors slice or tensor."""
    if dim == 0:
        return src[start:start + length]
    return src[:, start:start + length]


def _shape(src) -> list[int]:
    return list(src.get_shape()) if hasattr(src, "get_shape") else list(src.shape)


def default_weight_loader(param: nn.Parameter, src, shard_id=None) -> None:
    """Replicated parameter: every rank reads it whole."""
    t = src[:] if not isinstance(src, torch.Tensor) else src
    if list(t.shape) != list(param.shape):
        raise ValueError(f"shape mismatch: checkpoint {list(t.shape)} vs parameter {list(param.shape)}")
    param.data.copy_(t)


def _param(shape, dtype, device, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = loader
    return p


def _matmul(module, x, bias=None, gated: bool = False):
    """x @ W.T (+ bias) with the module's oneDNN-prepacked weight when it has one (CPU bf16), or
    the Triton batch-1 GEMV when the runner turned it on (module.gemv: decode_kernels, CUDA).
    gated: x is [N, 2K] gate|up and the input is ops.silu_mul(x) (inside the GEMV when it runs)."""
    if module.gemv and gemv.applies(x, module.weight, gated):
        y = gemv.gemv(x, module.weight, gated=gated)    # [1, M]
        return y if bias is None else y.add_(bias)
    if gated:
        x = ops.silu_mul(x, x.shape[1] // 2)
    packed = module.packed
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, module.weight, bias)


def enable_gemv(model: nn.Module) -> int:
    """Batch-1 matmuls of every linear layer through engine/gemv.py. Returns the layer count."""
    n = 0
    for m in model.modules():
        if isinstance(m, (_Linear, ParallelLMHead)) and m.packed is None:
            m.gemv = True
            n += 1
    return n


def prepack_cpu(model: nn.Module) -> int:
    """Reorder every linear weight into oneDNN's blocked layout (CPU, bf16): batch-1 GEMV goes from
    ~15.5 to ~19.4 GB/s on the development machines. Keeps the plain weights (models may read
    them directly). Returns the number of packed layers."""
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in model.modules():
        if hasattr(m, "packed") and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu":
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1)
            n += 1
    return n


class _Linear(nn.Module):
    gemv = False                    # batch-1 matmuls through engine/gemv.py (enable_gemv)

    def __init__(self, out_features: int, in_features: int, bias: bool, comm: Comm, dtype, device):
        super().__init__()
        self.comm = comm
        self.weight = _param((out_features, in_features), dtype, device, self.weight_loader)
        self.bias = _param((out_features,), dtype, device, self.weight_loader) if bias else None
        self.packed = None

    def weight_loader(self, param, src, shard_id=None):  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x):
        return _matmul(self, x, self.bias)


class MergedColumnParallelLinear(_Linear):
    """Several column-parallel projections of the same input fused in one matmul (gate+up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, comm: Comm, dtype, device):
        self.parts = [partition(n, comm.size, comm.rank) for n in out_sizes]
        super().__init__(sum(p[1] for p in self.parts), in_features, bias, comm, dtype, device)

    def weight_loader(self, param, src, shard_id: int):
        offset = sum(p[1] for p in self.parts[:shard_id])
        start, local = self.parts[shard_id]
        param.data[offset:offset + local].copy_(_read(src, 0, start, local))


class QKVParallelLinear(_Linear):
    """Fused q, k, v projections split by attention heads.

    KV heads are split across ranks as evenly as possible (so 3 KV heads work at TP=2: 2 + 1) and
    query heads follow their KV group. With fewer KV heads than ranks, KV heads are replicated.
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 comm: Comm, dtype, device):
        tp, r = comm.size, comm.rank
        if num_heads % num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        group = num_heads // num_kv_heads
        if num_kv_heads >= tp:
            kv_start, kv_local = partition(num_kv_heads, tp, r)
            q_start, q_local = kv_start * group, kv_local * group
        else:
            if tp % num_kv_heads or num_heads % tp:
                raise ValueError(f"cannot split {num_heads} heads / {num_kv_heads} KV heads over {tp} ranks")
            kv_start, kv_local = r // (tp // num_kv_heads), 1
            q_local = num_heads // tp
            q_start = r * q_local
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = q_local, kv_local
        self.q_head_start, self.kv_head_start = q_start, kv_start
        out = (q_local + 2 * kv_local) * head_dim
        super().__init__(out, hidden, bias, comm, dtype, device)

    def weight_loader(self, param, src, shard_id: str):
        d = self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            offset, start, local = 0, self.q_head_start * d, q
        elif shard_id == "k":
            offset, start, local = q, self.kv_head_start * d, kv
        else:
            offset, start, local = q + kv, self.kv_head_start * d, kv
        param.data[offset:offset + local].copy_(_read(src, 0, start, local))


class RowParallelLinear(_Linear):
    """Input features split across ranks; partial outputs summed with one all-reduce.

    `in_parts` gives each rank's input slice when it is not an even split (attention heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Comm, dtype, device,
                 in_part: tuple[int, int] | None = None):
        self.start, self.local = in_part or partition(in_features, comm.size, comm.rank)
        super().__init__(out_features, self.local, bias, comm, dtype, device)

    def weight_loader(self, param, src, shard_id=None):
        if param.dim() == 1:                     # bias: added once, after the reduction
            param.data.copy_(src[:] if not isinstance(src, torch.Tensor) else src)
        else:
            param.data.copy_(_read(src, 1, self.start, self.local))

    def forward(self, x, gated: bool = False):
        """x: [N, K_local] ([N, 2 K_local] gate|up when gated: silu(gate) * up is the input)."""
        symm = self.comm.symm                    # CUDA one-shot path: matmul into the shared buffer
        y = symm.linear_all_reduce(x, self.weight, self.gemv, gated) \
            if symm is not None and self.packed is None else None
        if y is None:
            y = _matmul(self, x, gated=gated)
            self.comm.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    fuse_region: int | None = None       # 0 / 1: alternate between consecutive call sites (add_norm)

    def add_norm(self, x, residual, norm: "RMSNorm", gated: bool = False):
        """(norm(residual + self(x)), residual + self(x)): on the symmetric-memory path one kernel
        does the all-reduce, the add and the norm (fused_all_reduce.py); else ops.add_rms_norm."""
        symm = self.comm.symm
        if symm is not None and symm.fused and self.packed is None and self.bias is None \
                and self.fuse_region is not None:
            got = symm.linear_add_rms_norm(x, self.weight, residual, norm.weight, norm.eps, self.fuse_region,
                                           self.gemv, gated)
            if got is not None:
                return got
        return ops.add_rms_norm(self.forward(x, gated), residual, norm.weight, norm.eps)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks (padded to equal shards); lookups summed by all-reduce."""

    def __init__(self, vocab: int, hidden: int, comm: Comm, dtype, device):
        super().__init__()
        self.comm, self.vocab = comm, vocab
        self.shard = -(-vocab // comm.size)
        self.start = comm.rank * self.shard
        self.local = max(0, min(vocab, self.start + self.shard) - self.start)
        self.weight = _param((self.shard, hidden), dtype, device, self.weight_loader)

    def weight_loader(self, param, src, shard_id=None):
        param.data.zero_()
        if self.local:
            param.data[:self.local].copy_(_read(src, 0, self.start, self.local))

    def forward(self, ids):                       # ids: [N] -> [N, hidden]
        if self.comm.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection; full logits are assembled on rank 0 only.

    With tied embeddings the model points `weight` at the embedding's (same shard layout)."""

    packed = None
    gemv = False

    def forward(self, x):                         # x: [S, hidden] -> logits [S, vocab] on rank 0
        logits = _matmul(self, x)
        full = self.comm.gather_cat(logits)
        return None if full is None else full[:, :self.vocab]


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = _param((hidden,), dtype, device, default_weight_loader)

    def forward(self, x):
        # Same arithmetic as transformers' LlamaRMSNorm: normalise in fp32, scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
