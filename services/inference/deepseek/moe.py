"""DeepSeek-V3 mixture of experts with expert parallelism, and the dense MLP of the first layers.

Router (replicated, float32): sigmoid scores; e_score_correction_bias is added only to choose
experts; experts are grouped in n_group groups, each group scored by the sum of its 2 best biased
scores, only the topk_group best groups are eligible; the top num_experts_per_tok eligible experts
are taken, their *unbiased* scores normalised (norm_topk_prob) and scaled by routed_scaling_factor.

Expert parallelism: each rank holds experts [rank*E/ep, (rank+1)*E/ep) and nothing else of the
routed experts. Attention runs tensor parallel, so after its all-reduce every rank already holds
every token's hidden state: dispatch needs no communication (each rank picks the tokens routed to
its experts), and the combine is the one all-reduce of partial outputs the layer needs anyway for
the row-parallel shared expert. An all-to-all dispatch/combine pays off only when attention is data
parallel (each rank holding different tokens, as in DeepSeek's own multi-node serving); with
TP attention it would move the same N x H values per layer in two collectives instead of one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.inference.engine import moe_triton

from . import route_triton
from .config import DeepseekConfig
from .fp8 import FP8
from .params import experts_of_rank, shard_range
from .weights import Linear, sharded_param


class DenseMLP(nn.Module):
    """SwiGLU, column/row parallel over tp ranks; returns the partial down projection.

    stacked: gate and up live in one tensor w13 [1, 2n, H] and down in w2 [1, H, n] (FP8 scales
    likewise), the parameters being views named as the checkpoint's keys, so that decode-sized
    inputs run as the fused MoE's single "shared" expert (kernels: engine/moe_triton.py)."""

    def __init__(self, hidden: int, inter: int, tp_rank: int, tp: int, dtype, device=None, block=None,
                 keep_fp8: bool = False, kernels: bool = False, stacked: bool = True):
        super().__init__()
        cols = shard_range(inter, tp, tp_rank)
        n = cols[1] - cols[0]
        lin = dict(block=block, keep_fp8=keep_fp8, kernels=kernels)
        self.gate_proj = Linear(n, hidden, dtype, device, rows=cols, **lin)
        self.up_proj = Linear(n, hidden, dtype, device, rows=cols, **lin)
        self.down_proj = Linear(hidden, n, dtype, device, cols=cols, **lin)
        self.fused: moe_triton.Experts | None = None
        fp8 = self.gate_proj.weight.dtype == FP8
        if stacked and n:
            w13, w2, s13, s2 = stack_experts([self], fp8)
            aligned = not fp8 or (cols[0] % 128 == 0 and n % 128 == 0 and tuple(block) == (128, 128))
            if kernels and aligned:
                self.fused = moe_triton.Experts(w13, w2, s13, s2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and moe_triton.applies(x, None, self.fused):
            return moe_triton.fused_moe(x, None, None, None, self.fused)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def stack_experts(mlps: list[DenseMLP], fp8: bool):
    """Rebind the MLPs' weights (and FP8 scales) as views of stacked tensors; returns
    (w13 [E, 2I, H], w2 [E, H, I], s13 [E, 2 ceil(I/128), ceil(H/128)] | None, s2 | None)."""
    g, d = mlps[0].gate_proj.weight, mlps[0].down_proj.weight
    E, (I, H) = len(mlps), g.shape
    w13 = torch.empty(E, 2 * I, H, dtype=g.dtype, device=g.device)
    w2 = torch.empty(E, H, I, dtype=d.dtype, device=d.device)
    s13 = s2 = None
    if fp8:
        gs, ds = mlps[0].gate_proj.weight_scale_inv, mlps[0].down_proj.weight_scale_inv
        s13 = torch.empty(E, 2 * gs.shape[0], gs.shape[1], dtype=gs.dtype, device=gs.device)
        s2 = torch.empty(E, *ds.shape, dtype=ds.dtype, device=ds.device)
    for j, m in enumerate(mlps):
        for lin, view, sview in ((m.gate_proj, w13[j, :I], None if s13 is None else s13[j, :s13.shape[1] // 2]),
                                 (m.up_proj, w13[j, I:], None if s13 is None else s13[j, s13.shape[1] // 2:]),
                                 (m.down_proj, w2[j], None if s2 is None else s2[j])):
            view.copy_(lin.weight.data)
            lin.weight = rebind(lin.weight, view)
            if sview is not None:
                sview.copy_(lin.weight_scale_inv.data)
                lin.weight_scale_inv = rebind(lin.weight_scale_inv, sview)
    return w13, w2, s13, s2


class Router(nn.Module):
    """The replicated router: weight [E, H] and e_score_correction_bias [E], float32."""

    def __init__(self, E: int, H: int, device=None):
        super().__init__()
        self.weight = sharded_param((E, H), torch.float32, device)
        self.e_score_correction_bias = sharded_param((E,), torch.float32, device)


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekConfig, rank: int, world: int, dtype, device=None,
                 placement: list[list[int]] | None = None, kernels: bool = False):
        super().__init__()
        self.cfg, self.rank = cfg, rank
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        if placement is None:
            if E % world:
                raise ValueError(f"n_routed_experts {E} must divide by the expert-parallel size {world}")
            placement = [list(experts_of_rank(cfg, world, r)) for r in range(world)]
        if len(placement) != world or sorted({e for h in placement for e in h}) != list(range(E)):
            raise ValueError("an expert placement must list every expert, for every rank of the group")
        self.local = sorted(placement[rank])
        n = len(self.local)
        # replica choice: pair (token t, expert e) runs on owners[e, t % n_rep[e]]
        reps = [[r for r in range(world) if e in placement[r]] for e in range(E)]
        width = max(len(o) for o in reps)
        self.register_buffer("owners", torch.tensor([o + [o[0]] * (width - len(o)) for o in reps],
                                                    device=device), persistent=False)    # [E, width]
        self.register_buffer("n_rep", torch.tensor([len(o) for o in reps], device=device), persistent=False)
        index = torch.full((E,), n, dtype=torch.long)
        index[self.local] = torch.arange(n)
        self.register_buffer("local_index", index.to(device), persistent=False)          # [E] -> slot
        self.gate = Router(E, H, device)
        # this rank's experts live in two stacked tensors (one grouped GEMM each on GPU); the
        # per-expert parameters are views into them, named as the checkpoint's keys
        fp8 = cfg.keep_fp8 and cfg.fp8_block is not None
        self.experts = nn.ModuleDict()
        mlps = [DenseMLP(H, I, 0, 1, dtype, device, cfg.fp8_block, fp8, stacked=False) for _ in self.local]
        for e, mlp in zip(self.local, mlps):
            self.experts[str(e)] = mlp
        w13, w2, s13, s2 = stack_experts(mlps, fp8)
        self.register_buffer("w13", w13, persistent=False)                   # [n, 2I, H]
        self.register_buffer("w2", w2, persistent=False)                     # [n, H, I]
        self.shared_experts = (DenseMLP(H, I * cfg.n_shared_experts, rank, world, dtype, device, cfg.fp8_block, fp8,
                                        kernels=kernels) if cfg.n_shared_experts else None)
        # kernels (decode-sized batches): route_triton + engine/moe_triton.py, chosen here
        self.fused = None
        if kernels and n and (not fp8 or (I % 128 == 0 and tuple(cfg.fp8_block) == (128, 128))) \
                and (self.shared_experts is None or self.shared_experts.fused is not None):
            self.fused = moe_triton.Experts(w13, w2, s13, s2)
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("computed_pairs", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        # "grouped": torch grouped GEMM over the stacked experts, no host sync (default on CUDA, bf16);
        # "loop": one GEMM pair per expert that received tokens (default on CPU);
        # "masked": every local expert on every token, no host sync (what "loop" becomes while a
        # CUDA graph is captured: FP8 or fp32 experts on CUDA)
        # (CUDA's grouped GEMM is a bf16 kernel; other dtypes there take the loop)
        cuda = torch.device(device or "cpu").type == "cuda"
        self.impl = "grouped" if (cuda and _GROUPED_MM and dtype == torch.bfloat16 and not fp8) else "loop"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, H] -> (weights [N, k] float32, expert ids [N, k])."""
        c = self.cfg
        N, E, G = x.shape[0], c.n_routed_experts, c.n_group
        scores = F.linear(x.float(), self.gate.weight).sigmoid()              # [N, E]
        choice = scores + self.gate.e_score_correction_bias
        group_scores = choice.view(N, G, E // G).topk(min(2, E // G), dim=-1).values.sum(-1)  # [N, G]
        top_groups = group_scores.topk(c.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, top_groups, 1.0).bool()
        allowed = group_mask.unsqueeze(-1).expand(N, G, E // G).reshape(N, E)
        ids = choice.masked_fill(~allowed, float("-inf")).topk(c.num_experts_per_tok, dim=-1, sorted=False).indices
        w = scores.gather(1, ids)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * c.routed_scaling_factor, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] -> this rank's partial output [N, H] (local experts + its shared-expert share)."""
        c = self.cfg
        if self.fused is not None and route_triton.applies(x, c.n_routed_experts, c.n_group) \
                and moe_triton.applies(x, self.fused, None):
            w, lid = route_triton.route(
                x, self.gate.weight, self.gate.e_score_correction_bias, n_group=c.n_group, topk_group=c.topk_group,
                top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob, scaling=c.routed_scaling_factor,
                local_index=self.local_index, owners=self.owners, n_rep=self.n_rep, rank=self.rank,
                n_local=len(self.local), counts=self.tokens_per_expert, computed=self.computed_pairs)
            sh = self.shared_experts.fused if self.shared_experts is not None else None
            return moe_triton.fused_moe(x, lid, w, self.fused, sh)
        w, ids = self.route(x)
        flat = ids.flatten()                                                  # [N*k]
        self.tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))
        # slot of each (token, expert) pair in this rank's experts; len(local) = not computed here
        tok = torch.arange(flat.numel(), device=flat.device) // ids.shape[1]
        owner = self.owners[flat, tok % self.n_rep[flat]]
        lid = torch.where(owner == self.rank, self.local_index[flat], len(self.local))
        self.computed_pairs += (lid < len(self.local)).sum()
        impl = self.impl
        if impl == "loop" and x.is_cuda and torch.cuda.is_current_stream_capturing():
            impl = "masked"                          # the loop's host sync cannot be captured
        out = {"grouped": self._grouped, "loop": self._loop, "masked": self._masked}[impl](x, w.flatten(), lid, tok)
        if self.shared_experts is not None:
            out += self.shared_experts(x)
        return out

    def _expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert j on rows x [c, H] -> [c, H]."""
        if self.w13.dtype == FP8:                                             # FP8 Linears (weights.Linear)
            return self.experts[str(self.local[j])](x)
        I = self.cfg.moe_intermediate_size
        gu = F.linear(x, self.w13[j])                                         # [c, 2I]
        return F.linear(F.silu(gu[:, :I]) * gu[:, I:], self.w2[j])            # [c, H]

    def _loop(self, x, w, lid, tok) -> torch.Tensor:
        """Group pairs by local expert with one sort and one host sync for the counts."""
        out = torch.zeros_like(x)
        n = len(self.local)
        order = lid.argsort(stable=True)
        counts = torch.bincount(lid, minlength=n + 1)[:n]
        starts, local_counts = torch.stack([counts.cumsum(0) - counts, counts]).tolist()
        for j, (s, c) in enumerate(zip(starts, local_counts)):
            if c == 0:
                continue
            pairs = order[s:s + c]                                            # flat (token, slot) ids
            ye = self._expert(j, x[tok[pairs]])
            out.index_add_(0, tok[pairs], (ye * w[pairs, None]).to(out.dtype))
        return out

    def _masked(self, x, w, lid, tok) -> torch.Tensor:
        """Every local expert on all N tokens, scaled by the token's routing weight for it (0 when
        not routed to it or computed on another rank). No host synchronisation, so it can be
        captured; it reads every local expert's weights each step (fine for decode at large batch,
        wasteful at batch 1). A token picks an expert at most once, so no pair is lost."""
        N, n = x.shape[0], len(self.local)
        coef = torch.zeros(N * (n + 1), dtype=torch.float32, device=x.device)
        coef = coef.scatter_add_(0, tok * (n + 1) + lid, w.float()).view(N, n + 1)   # column n: elsewhere
        out = torch.zeros_like(x)
        for j in range(n):
            out += (self._expert(j, x) * coef[:, j:j + 1]).to(out.dtype)    # as _loop: weight in float32
        return out

    def _grouped(self, x, w, lid, tok) -> torch.Tensor:
        """Pairs computed on other ranks carry the sentinel slot len(local), which sorts last and
        lies past the last group offset, so the grouped GEMMs skip them; their rows are zeroed
        before the combine. No host synchronisation (CUDA-graph friendly)."""
        n, I = len(self.local), self.cfg.moe_intermediate_size
        sid, perm = torch.sort(lid)
        hist_in = sid.float() if x.device.type == "cpu" else sid.int()
        offs = torch.histc(hist_in, bins=n, min=0, max=n - 1).cumsum(0, dtype=torch.int32)
        t = tok[perm]
        gu = _GROUPED_MM(x[t], self.w13.transpose(-2, -1), offs=offs)         # [N*k, 2I]
        y = _GROUPED_MM(F.silu(gu[:, :I]) * gu[:, I:], self.w2.transpose(-2, -1), offs=offs)  # [N*k, H]
        y = torch.where((sid < n).unsqueeze(-1), y * w[perm, None].to(y.dtype), 0)
        return torch.zeros_like(x).index_add_(0, t, y.to(x.dtype))


def rebind(param: nn.Parameter, view: torch.Tensor) -> nn.Parameter:
    """A parameter over `view`'s storage carrying `param`'s loader attributes (and FP8 partner)."""
    new = nn.Parameter(view, requires_grad=False)
    new.__dict__.update(param.__dict__)
    if getattr(param, "partner", None) is not None:
        param.partner.partner = new
    return new


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
