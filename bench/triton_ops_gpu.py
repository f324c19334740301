"""GPU check and timing of the Triton decode kernels (services/inference/engine/triton_ops.py).

    PYTHONPATH=. python3 bench/triton_ops_gpu.py            # on an H100/H200: checks + timings
    PYTHONPATH=. python3 bench/triton_ops_gpu.py --smoke    # CPU, Triton interpreter, tiny shapes

Prints JSON lines. Correctness of paged_decode_attention vs an fp32 torch oracle and vs the engine's
decode_attention fed by the CUDA-graph metadata (cuda_graphs._Static.meta_and_inputs), and of
rope_kv_write vs ops.rope + cat + index_copy_, for Llama-3.1-8B per-rank shapes (Hq/Hkv 32/8 and
16/4, D 128, block 16; batch 1, 8, 64; context 200, 1000, 4000), bf16 and fp32. Timings: one CUDA
graph of 32 calls, each call on a different layer's cache (as in a model, so the KV is not L2
resident), in us per call; kernel vs the torch path it replaces, plus partition-size and tile
sweeps at batch 1 and 64, context 4000. A failing case prints {"error"} and the run goes on; the
last line counts failed checks and exceptions (exit status 1 if any).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

CALLS = 32


def emit(**kv) -> None:
    print(json.dumps(kv), flush=True)


def graph_us(fns, device, reps: int = 20) -> float | None:
    """us per call of fns[i % len(fns)], i < CALLS, replayed from one CUDA graph (None on CPU)."""
    import torch

    if device.type != "cuda":
        for f in fns[:2]:
            f()                                                   # smoke: exercise the code path only
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return round(a.elapsed_time(b) * 1000 / (reps * CALLS), 2)


def n_layers(cache_bytes: int, budget: int = 6 << 30) -> int:
    return max(1, min(CALLS, budget // max(cache_bytes, 1)))


class AttnCase:
    """Caches of several 'layers', random non-contiguous block tables, lengths in [ctx/2, ctx]."""

    def __init__(self, dtype, hq, hkv, d, b, ctx, bs, device, timing: bool):
        import torch

        from services.inference.engine.cuda_graphs import CTX_BUCKET, _Static

        g = torch.Generator().manual_seed(b * 7919 + ctx)
        lens = [ctx] + torch.randint(max(1, ctx // 2), ctx + 1, (b - 1,), generator=g).tolist()
        lctx = -(-ctx // CTX_BUCKET) * CTX_BUCKET if device.type == "cuda" else ctx   # the engine's bucket
        self.st = _Static(b, lctx, bs, scratch=0, device=device)
        need = [-(-n // bs) for n in lens]
        nblocks = sum(need) + 1
        table = torch.full((b, self.st.nblk), -1, dtype=torch.int64)
        perm = torch.randperm(nblocks - 1, generator=g) + 1                  # block 0: scratch
        used = 0
        for i, k in enumerate(need):
            table[i, :k] = perm[used:used + k]
            used += k
        self.st.inp[3 * b:4 * b] = torch.tensor(lens, device=device)
        self.st.inp[4 * b:] = table.reshape(-1).to(device)
        self.table = self.st.inp[4 * b:].view(b, self.st.nblk)               # [B, nblk]
        self.lens = torch.tensor(lens, dtype=torch.int32, device=device)     # [B]
        shape = (2 * hkv, nblocks * bs, d)
        layers = n_layers(2 * hkv * nblocks * bs * d * dtype.itemsize) if timing else 1
        gd = torch.Generator(device=device).manual_seed(b * 31 + ctx)      # big tensors made on the device
        self.caches = [torch.randn(shape, generator=gd, device=device).to(dtype) for _ in range(layers)]
        self.q = torch.randn(b, hq, d, generator=gd, device=device).to(dtype)  # [B, Hq, D]
        self.out = torch.empty(b, hq * d, device=device, dtype=dtype)
        self.scale, self.bs, self.hq, self.d = d ** -0.5, bs, hq, d


def check_attn(c: AttnCase, tag: dict) -> bool:
    import torch

    from services.inference.engine import triton_ops as T
    from services.inference.engine.attention import decode_attention

    cache = c.caches[0]
    out = T.paged_decode_attention(c.q, cache, c.table, c.lens, c.scale, c.bs)
    ref = T.paged_decode_attention_torch(c.q.float(), cache.float(), c.table, c.lens, c.scale, c.bs)
    _, _, meta = c.st.meta_and_inputs()
    eng = decode_attention(c.q, cache, meta, c.scale)
    err = (out.float() - ref.float()).abs().max().item()
    err_eng = (eng.float() - ref.float()).abs().max().item()
    tol = 1e-4 if c.q.dtype == torch.float32 else 2e-2
    graph_ok = graph_replay_matches(c) if cache.is_cuda else None
    ok = bool(torch.isfinite(out).all()) and err <= max(tol, 2 * err_eng) and graph_ok is not False
    emit(check="paged_decode_attention", **tag, err_vs_fp32=err, engine_err_vs_fp32=err_eng,
         err_vs_engine=(out.float() - eng.float()).abs().max().item(), finite=bool(torch.isfinite(out).all()),
         graph_replay_equal=graph_ok, ok=ok)
    return ok


def graph_replay_matches(c: AttnCase) -> bool:
    """Capture one call, change the lengths in place on the device, replay: equal to an eager call
    with the new lengths (nothing about the lengths was baked in at capture)."""
    import torch

    from services.inference.engine import triton_ops as T

    cache, lens0 = c.caches[0], c.lens.clone()
    T.paged_decode_attention(c.q, cache, c.table, c.lens, c.scale, c.bs, out=c.out)      # compiled
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        T.paged_decode_attention(c.q, cache, c.table, c.lens, c.scale, c.bs, out=c.out)
    try:
        c.lens.copy_((lens0 - 37).clamp(min=1))
        g.replay()
        torch.cuda.synchronize()
        eager = T.paged_decode_attention(c.q, cache, c.table, c.lens, c.scale, c.bs)
        return bool(torch.equal(c.out, eager))
    finally:
        c.lens.copy_(lens0)


def time_attn(c: AttnCase, tag: dict, sweep: bool) -> None:
    from services.inference.engine import triton_ops as T
    from services.inference.engine.attention import decode_attention

    _, _, meta = c.st.meta_and_inputs()           # per step (shared by all layers), timed on its own
    dev = c.q.device
    tri = graph_us([lambda cc=cc: T.paged_decode_attention(c.q, cc, c.table, c.lens, c.scale, c.bs, out=c.out)
                    for cc in c.caches], dev)
    ref = graph_us([lambda cc=cc: decode_attention(c.q, cc, meta, c.scale) for cc in c.caches], dev)
    meta_us = graph_us([lambda: c.st.meta_and_inputs()], dev)
    p = T.partition_size(c.table.shape[1] * c.bs, c.q.shape[0], c.caches[0].shape[0] // 2, dev)
    emit(timing="paged_decode_attention", **tag, layers=len(c.caches), triton_us=tri, torch_us=ref,
         speedup=round(ref / tri, 2) if tri and ref else None, torch_meta_per_step_us=meta_us,
         part_size=p, n_parts=-(-c.table.shape[1] * c.bs // p))
    if sweep:
        res = {}
        for ps in (64, 128, 256, 512, 1024, 2048):
            res[ps] = graph_us([lambda cc=cc, ps=ps: T.paged_decode_attention(
                c.q, cc, c.table, c.lens, c.scale, c.bs, out=c.out, part_size=ps) for cc in c.caches], dev)
        emit(timing="paged_decode_attention.part_size_sweep", **tag, us_by_part_size=res)
        saved = T.BLOCK_N, T.NUM_WARPS, T.NUM_STAGES
        res = {}
        try:
            for cfg in ((32, 4, 3), (64, 4, 3), (64, 8, 3), (64, 4, 1), (128, 8, 3)):
                T.BLOCK_N, T.NUM_WARPS, T.NUM_STAGES = cfg
                res["block%d_warps%d_stages%d" % cfg] = graph_us([lambda cc=cc: T.paged_decode_attention(
                    c.q, cc, c.table, c.lens, c.scale, c.bs, out=c.out) for cc in c.caches], dev)
        finally:
            T.BLOCK_N, T.NUM_WARPS, T.NUM_STAGES = saved
        emit(timing="paged_decode_attention.tile_sweep", **tag, us_by_config=res)


def rope_case(dtype, hq, hkv, d, b, device, timing: bool, compiled: bool, tag: dict) -> bool:
    import torch

    from services.inference.engine import ops
    from services.inference.engine import triton_ops as T

    g = torch.Generator().manual_seed(b)
    nslots = max(4096, 4 * b)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=g).to(device=device, dtype=dtype)
    pos = torch.randint(0, 4000, (b,), generator=g)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(pos.float(), inv).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    sin[:, :d // 2] = -sin[:, :d // 2]
    cos, sin = cos.to(device=device, dtype=dtype)[:, None], sin.to(device=device, dtype=dtype)[:, None]
    slots = torch.randperm(nslots, generator=g)[:b].to(device)
    layers = n_layers(2 * hkv * nslots * d * dtype.itemsize, 1 << 30) if timing else 1
    caches = [torch.randn(2 * hkv, nslots, d, generator=g).to(device=device, dtype=dtype) for _ in range(layers)]
    ref_cache = caches[0].clone()
    q = T.rope_kv_write(qkv, cos, sin, slots, caches[0], hq, hkv, d)
    ref_q = T.rope_kv_write_torch(qkv, cos, sin, slots, ref_cache, hq, hkv, d)
    q_err = (q.float() - ref_q.float()).abs().max().item()
    c_err = (caches[0].float() - ref_cache.float()).abs().max().item()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    ok = q_err <= tol and c_err <= tol
    emit(check="rope_kv_write", **tag, q_err=q_err, cache_err=c_err, ok=ok)
    if not timing:
        return ok
    tri = graph_us([lambda cc=cc: T.rope_kv_write(qkv, cos, sin, slots, cc, hq, hkv, d) for cc in caches], device)
    eager = graph_us([lambda cc=cc: T.rope_kv_write_torch(qkv, cos, sin, slots, cc, hq, hkv, d) for cc in caches], device)
    comp = None
    if compiled:                                   # the engine runs ops.rope torch.compile'd on CUDA
        try:
            ops.enable_compile()
            comp = graph_us([lambda cc=cc: T.rope_kv_write_torch(qkv, cos, sin, slots, cc, hq, hkv, d)
                             for cc in caches], device)
        except Exception as e:  # noqa: BLE001
            emit(error=f"compiled rope reference: {e!r}", **tag)
        finally:
            ops.disable_compile()
    emit(timing="rope_kv_write", **tag, triton_us=tri, torch_eager_us=eager, torch_compiled_rope_us=comp,
         speedup_vs_compiled=round(comp / tri, 2) if tri and comp else None)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes, no timing")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"      # before triton_ops first imports triton
    import torch

    from services.inference.engine import triton_ops as T

    if not T.available():
        emit(error="triton is not importable")
        return 1
    import triton

    device = torch.device("cpu" if args.smoke else "cuda")
    timing = not args.smoke and not args.no_timing
    emit(info="triton_ops_gpu", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
         torch=torch.__version__, triton=triton.__version__, calls_per_graph=CALLS)
    if args.smoke:
        heads, batches, ctxs, d = [(8, 2)], [1, 3], [20, 150], 64
    else:
        heads, batches, ctxs, d = [(32, 8), (16, 4)], [1, 8, 64], [200, 1000, 4000], 128
    dtypes = [torch.bfloat16, torch.float32]
    failures = 0
    for dtype in dtypes:
        for hq, hkv in heads:
            for b in batches:
                tag = dict(dtype=str(dtype).removeprefix("torch."), hq=hq, hkv=hkv, d=d, batch=b)
                try:
                    failures += not rope_case(dtype, hq, hkv, d, b, device,
                                              timing and dtype == torch.bfloat16 or args.smoke,
                                              compiled=not args.smoke, tag=tag)
                except Exception as e:  # noqa: BLE001
                    failures += 1
                    emit(error=repr(e), case="rope_kv_write", **tag, trace=traceback.format_exc()[-1500:])
                for ctx in ctxs:
                    t = dict(tag, ctx=ctx, block_size=16)
                    try:
                        c = AttnCase(dtype, hq, hkv, d, b, ctx, 16, device, timing and dtype == torch.bfloat16)
                        failures += not check_attn(c, t)
                        if timing and dtype == torch.bfloat16 or args.smoke:
                            time_attn(c, t, sweep=b in (1, 64) and hq == 32 and ctx == 4000 or args.smoke and b == 1)
                        del c
                    except Exception as e:  # noqa: BLE001
                        failures += 1
                        emit(error=repr(e), case="paged_decode_attention", **t, trace=traceback.format_exc()[-1500:])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    emit(done=True, failures=failures)          # failed checks + exceptions
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
