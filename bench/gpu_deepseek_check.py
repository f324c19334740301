"""GPU-only checks of the DeepSeek-V3/R1 work (issue 4): FP8 tensor-core matmul, native vs transformers
on CUDA, keep_fp8 through the engine. One run, JSON lines on stdout, < 5 minutes on an H100.

    python3 bench/gpu_deepseek_check.py              # CUDA GPU (sm90 for the FP8 blockwise GEMM)
    python3 bench/gpu_deepseek_check.py --smoke      # CPU: checks this script (the FP8 kernel is
                                                     # emulated, engine parts on CPU, small shapes)
    --parts a,b,c  subset; --v2lite-layers N  bench_deepseek.check depth (0 skips it);
    --budget-s S   the optional parts (c_engine_tp2, b_v2lite, run last) start only before S seconds

Each part prints {"part": NAME, ...}; a part that fails prints {"part": NAME, "error": ...} and the
next one still runs; the last line is {"part": "summary", ...} with every part's verdict.
  env              versions, GPU, the blockwise scaled-mm variant fp8_matmul.probe chose (and why)
  a_scaled_mm      per R1 weight shape x batch 1/32/256: kernel vs fp8_block_matmul_reference
                   (ok: max error <= 1% of max |ref|), speed vs bf16 F.linear and weight-only FP8
  b_tiny_fp32/bf16 the tests' tiny DeepSeek-V3: native greedy vs transformers generate() on CUDA;
                   fp32 must be equal; bf16: first divergence, logit margins there, router top-k
                   decisions that differ between the two implementations on that prefix
  b_engine_fp32/bf16  the same through LLMEngine on CUDA (CUDA graphs on): fp32 tokens must equal
                   generate(); bf16 vs the native eager greedy() (graph/paged path; flips = info)
  b_v2lite         bench_deepseek.check(): V2-Lite widths, fp32/bf16 logits, graphs, tokens
  c_fp8            FP8 copy with keep_fp8: tensor-core share, tokens and logits vs the dequantized
                   model (tolerances stated in the line)
  c_engine         keep_fp8 through LLMEngine with CUDA graphs (the MoE's capturable masked path)
  c_engine_tp2     the same on 2 GPUs (unaligned tp slices: weight-only for those), when 2 GPUs
                   (--smoke: 2 CPU ranks over gloo)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests" / "deepseek")):
    if p not in sys.path:
        sys.path.insert(0, p)

VERDICTS: dict[str, str] = {}
SHIM = False          # set by main(): no-op engine meters (opentelemetry missing)


def emit(part: str, **kw) -> None:
    print(json.dumps({"part": part, **kw}, default=str), flush=True)


def run_part(name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        ok = fn(*args)
        VERDICTS[name] = "ok" if ok in (True, None) else ("info" if ok == "info" else "FAIL")
    except Exception as exc:  # noqa: BLE001 - one failing part must not stop the others
        VERDICTS[name] = "error"
        emit(name, error=f"{type(exc).__name__}: {exc}"[:800],
             trace=traceback.format_exc().splitlines()[-6:])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    emit(name + ".time", seconds=round(time.perf_counter() - t0, 1))


class _NoOpInstruments:
    """Stand-in for privlm.base.telemetry.instruments.get() where opentelemetry is not installed."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def telemetry_shim() -> bool:
    """LLMEngine imports privlm.base.telemetry.instruments, which imports opentelemetry at module level;
    the GPU machines have no opentelemetry. Engine parts need no telemetry, so register no-op meters
    in that case (reported in the env line). Returns True when the shim was installed."""
    try:
        import opentelemetry.metrics  # noqa: F401
        return False
    except ImportError:
        import types

        mod = types.ModuleType("privlm.base.telemetry.instruments")
        mod.get = lambda: _NoOpInstruments()
        sys.modules["privlm.base.telemetry.instruments"] = mod
        import privlm.base.telemetry as tel

        tel.instruments = mod
        return True


def within_budget(name: str, t0: float, budget_s: float) -> bool:
    spent = time.perf_counter() - t0
    if spent > budget_s:
        VERDICTS[name] = "skipped"
        emit(name, skipped=f"time budget: {spent:.0f} s spent > --budget-s {budget_s:.0f}")
        return False
    return True


def timed_us(fn, dev, iters: int) -> float:
    """Median microseconds of fn() (CUDA events on GPU)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e6)
    return sorted(ts)[len(ts) // 2]


def kernel(dev):
    """(backend, label) of the FP8 GEMM to check: the probed real one, or the CPU emulation."""
    from services.inference.deepseek.fp8_matmul import Backend, probe

    if dev.type != "cuda":
        return Backend("emulate", True, 1), "emulated on CPU (checks the script, not the kernel)"
    be, reason, _ = probe(dev)
    return be, reason


# -- env ----------------------------------------------------------------------------------------------
def part_env(dev):
    import transformers

    from services.inference.deepseek.fp8_matmul import probe

    info = dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0],
                telemetry_noop_shim=SHIM,
                has_F_scaled_mm=hasattr(F, "scaled_mm"), has_torch__scaled_mm=hasattr(torch, "_scaled_mm"),
                device=str(dev))
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), capability=torch.cuda.get_device_capability(dev),
                    gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
        be, reason, tried = probe(dev)
        info.update(fp8_backend=str(be), fp8_reason=reason, fp8_tried=tried)
    emit("env", **info)
    return True if dev.type != "cuda" else probe(dev)[0] is not None


# -- (a) the kernel -------------------------------------------------------------------------------------
def part_a(dev, smoke: bool):
    from services.inference.deepseek.fp8 import dequant_slice, quantize_block
    from services.inference.deepseek.fp8_matmul import (
        _mm,
        blockwise_linear,
        fp8_block_matmul_reference,
        outer_major,
        prepare_weight,
        quantize_act_1x128,
    )

    be, label = kernel(dev)
    if be is None:
        emit("a_scaled_mm", error="no blockwise scaled-mm backend: " + label)
        return False
    shapes = [("expert down_proj / o_proj tp8 [7168, 2048]", 7168, 2048),
              ("expert gate/up_proj [2048, 7168]", 2048, 7168),
              ("dense gate/up_proj [18432, 7168]", 18432, 7168),
              ("dense down_proj [7168, 18432]", 7168, 18432),
              ("q_b_proj tp8 [3072, 1536]", 3072, 1536),
              ("kv_a_proj_with_mqa [576, 7168] (partial row block)", 576, 7168)]
    if smoke:
        shapes = [("smoke [256, 384]", 256, 384), ("smoke [200, 300] (padded)", 200, 300)]
    iters = 5 if smoke else 50
    ok_all = True
    g = torch.Generator(device=dev).manual_seed(0)
    for name, N, K in shapes:
        wq, ws = quantize_block(torch.randn(N, K, device=dev, generator=g) * 0.02)
        w16 = dequant_slice(wq, ws, dtype=torch.bfloat16)                         # [N, K]
        wp, sb = prepare_weight(wq, ws, be)
        for M in (1, 32, 256):
            x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
            y = blockwise_linear(x, wp, sb, N, be, torch.bfloat16).float()
            ref = fp8_block_matmul_reference(x, wq, ws)                             # float32
            err = (y - ref).abs()
            rel = float(err.max() / ref.abs().max())
            bf16_vs_ref = float((F.linear(x, w16).float() - ref).abs().max() / ref.abs().max())
            q, sa = quantize_act_1x128(F.pad(x, (0, 0, 0, (-M) % be.m_align)))     # rows padded as the kernel needs
            sa = outer_major(sa)
            t_fp8 = timed_us(lambda x=x, wp=wp, sb=sb: blockwise_linear(x, wp, sb, N, be, torch.bfloat16), dev, iters)
            t_gemm = timed_us(lambda q=q, sa=sa, wp=wp, sb=sb: _mm(be, q, sa, wp, sb), dev, iters)
            t_bf16 = timed_us(lambda x=x, w16=w16: F.linear(x, w16), dev, iters)
            t_wo = timed_us(lambda x=x, wq=wq, ws=ws: F.linear(x, dequant_slice(wq, ws, dtype=torch.bfloat16)),
                            dev, max(3, iters // 5))
            ok = rel <= 1e-2
            ok_all &= ok
            emit("a_scaled_mm", shape=name, N=N, K=K, M=M, kernel=label, ok=ok,
                 max_abs_err=float(err.max()), rel_err_of_max=rel, bf16_linear_vs_ref_rel=bf16_vs_ref,
                 us_fp8_total=round(t_fp8, 1), us_fp8_gemm_only=round(t_gemm, 1), us_bf16_linear=round(t_bf16, 1),
                 us_weight_only_fp8=round(t_wo, 1), speedup_vs_bf16=round(t_bf16 / t_fp8, 3),
                 gemm_speedup_vs_bf16=round(t_bf16 / t_gemm, 3))
        del wq, ws, w16, wp, sb
    return ok_all


# -- (b) native vs transformers -------------------------------------------------------------------------
def hf_load(folder, dtype, dev):
    from transformers import DeepseekV3ForCausalLM

    try:
        m = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype)
    except TypeError:
        m = DeepseekV3ForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    return m.to(dev).eval()


def hf_generate(hf, prompt, n, dev):
    ids = torch.tensor([prompt], device=dev)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def native_logits(model, ids: list[int], dev) -> torch.Tensor:
    """Teacher-forced float32 logits [T, V] of one prompt (one prefill)."""
    from services.inference.deepseek.generate import _prefill_meta

    T = len(ids)
    layers, shape = model.kv_cache_spec()
    cache = torch.zeros(layers, T, *shape, dtype=model.dtype, device=dev)
    pos = torch.arange(T, device=dev)
    hidden = model(torch.tensor(ids, device=dev), pos, _prefill_meta([0], [T], [pos]), cache)
    return model.compute_logits(hidden)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def margin(logits: torch.Tensor) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


def routing_flips(native, hf, ids: list[int], dev) -> dict:
    """Router inputs of both implementations on the same prefix, each routed with the same (native)
    router: how many (token, layer) top-k expert sets differ, and how close the flipped choices were."""
    moes = [l.mlp for l in native.model.layers if l.is_moe]
    gates = [l.mlp.gate for l in hf.model.layers if hasattr(l.mlp, "gate")]
    got: dict[str, list] = {"native": [], "hf": []}
    hooks = [m.register_forward_pre_hook(lambda mod, args: got["native"].append(args[0].detach())) for m in moes]
    hooks += [g.register_forward_pre_hook(lambda mod, args: got["hf"].append(args[0].detach())) for g in gates]
    try:
        with torch.no_grad():
            native_logits(native, ids, dev)
            hf(torch.tensor([ids], device=dev))
    finally:
        for h in hooks:
            h.remove()
    differ = total = last = 0
    for moe, xn, xh in zip(moes, got["native"], got["hf"]):
        H = xn.shape[-1]
        _, a = moe.route(xn.reshape(-1, H))
        _, b = moe.route(xh.reshape(-1, H).to(xn.dtype))
        d = (a.sort(-1).values != b.sort(-1).values).any(-1)                       # [T]
        differ += int(d.sum())
        total += d.numel()
        last += int(d[-1])
    return {"router_topk_sets_differing": differ, "router_decisions": total,
            "router_differing_at_last_token_layers": last, "moe_layers": len(moes)}


def part_b_tiny(dev, folder, dtype, n: int):
    from ds_tiny import prompts

    from services.inference.deepseek.generate import greedy
    from services.inference.deepseek.model import DeepseekV3ForCausalLM as Native

    name = "b_tiny_" + str(dtype).replace("torch.", "")
    ps = prompts(4, seed=13)
    hf = hf_load(folder, dtype, dev)
    native = Native.from_pretrained(folder, dtype=dtype, device=str(dev))
    impl = next(l.mlp.impl for l in native.model.layers if l.is_moe)
    ours = greedy(native, ps, n)
    theirs = [hf_generate(hf, p, n, dev) for p in ps]
    div = [first_divergence(a, b) for a, b in zip(ours, theirs)]
    out = dict(dtype=str(dtype), moe_impl=impl, new_tokens=n, prompts=len(ps),
               tokens_equal=[d is None for d in div], first_divergence=div)
    j = next((i for i, d in enumerate(div) if d is not None), 0)
    d = div[j] if div[j] is not None else n - 1
    prefix = ps[j] + ours[j][:d]
    with torch.no_grad():
        ln = native_logits(native, prefix, dev)[-1]
        lh = hf(torch.tensor([prefix], device=dev)).logits[0, -1].float()
    out.update(analysed_prompt=j, analysed_position=d, native_margin=margin(ln), hf_margin=margin(lh),
               native_argmax=int(ln.argmax()), hf_argmax=int(lh.argmax()),
               logits_rel_diff=float((ln - lh).abs().max() / lh.abs().max()),
               **routing_flips(native, hf, prefix, dev))
    emit(name, **out)
    if dtype == torch.float32:
        return all(x is None for x in div)
    return "info"


def part_engine(dev, folder, dtype, n: int, name: str, ref: str = "native", keep_fp8=False, tp=1):
    """LLMEngine on this device (CUDA graphs on): tokens vs transformers generate() (ref "hf") or vs
    the native model's eager greedy() (ref "native": isolates the engine's paged/graphed path)."""
    from ds_tiny import prompts

    from privlm.testing.engine import generate
    from services.inference.config import EngineConfig
    from services.inference.deepseek.generate import greedy
    from services.inference.deepseek.model import DeepseekV3ForCausalLM as Native
    from services.inference.engine import create_engine

    ps = prompts(4, seed=13)
    if ref == "hf":
        hf = hf_load(folder, dtype, dev)
        want = [hf_generate(hf, p, n, dev) for p in ps]
        del hf
    else:
        model = Native.from_pretrained(folder, dtype=dtype, device=str(dev), keep_fp8=keep_fp8)
        want = greedy(model, ps, n)
        del model
    cfg = EngineConfig(model=str(folder), device=dev.type, dtype=str(dtype).replace("torch.", ""), tp=tp,
                       block_size=16, num_kv_blocks=64, max_num_batched_tokens=64, keep_fp8=keep_fp8,
                       cuda_graphs=True, threads=1 if dev.type == "cpu" else None)
    engine = create_engine(cfg)
    try:
        got = generate(engine, ps, n)
        extra = engine.stats().extra
    finally:
        engine.shutdown()
    div = [first_divergence(a, b) for a, b in zip(got, want)]
    emit(name, dtype=str(dtype), tp=tp, keep_fp8=keep_fp8, cuda_graphs=dev.type == "cuda", reference=ref,
         tokens_equal=[d is None for d in div], first_divergence=div, stats_extra=extra)
    hard = extra.get("tokens_routed", 0) > 0
    if keep_fp8 and dev.type == "cuda" and tp == 1:
        hard &= extra.get("fp8_tensor_core_fraction") == 1.0
    equal = all(d is None for d in div)
    if not hard:
        return False
    if dtype == torch.float32 and tp == 1:
        return equal                 # fp32: the engine's paged/graphed path must give the same tokens
    return True if equal else "info"  # bf16 / tp 2: near-tie flips are reported, not failed


def part_v2lite(dev, layers: int):
    from bench.bench_deepseek import check

    check(dev, layers)          # prints its own JSON line ({"check": "deepseek", ...})
    return "info"


# -- (c) keep_fp8 -----------------------------------------------------------------------------------------
def force_kernel(model, be) -> None:
    """Run every FP8 GEMM-able Linear through backend `be` (the CPU smoke run's emulation; on CUDA the
    fp32 emulation is the reference arithmetic with FP8 activations)."""
    from services.inference.deepseek.fp8_matmul import TENSOR_CORE
    from services.inference.deepseek.weights import Linear

    for m in model.modules():
        if isinstance(m, Linear) and m.fp8_mode is not None and "absorbed" not in m.fp8_reason \
                and "boundary" not in m.fp8_reason:
            m.fp8_mode, m.weight.tc_backend = TENSOR_CORE, be
            m.weight.__dict__.pop("gemm_operands", None)


def part_c(dev, fp8, deq, n: int):
    """keep_fp8 on this device vs the dequantized model. On a random 4-layer model FP8 activations move
    the logits a lot (CPU, exact reference arithmetic: up to ~40% of the largest logit at some
    positions, through routing flips), so the end-to-end tolerance is relative to the same model
    with the kernel emulated in torch (fp8_block_matmul_reference's arithmetic) in the same run:
      kernel:      every FP8 Linear's output on the model's real activations vs
                   fp8_block_matmul_reference: max error <= 1% of max |ref| (bf16 output rounding)
      end to end:  rel(tc, deq_bf16) <= 1.5 * rel(emulated, deq_bf16) + 0.02 (max over positions)"""
    from ds_tiny import prompts

    from services.inference.deepseek.fp8 import dequant_slice
    from services.inference.deepseek.fp8_matmul import TENSOR_CORE, Backend, fp8_block_matmul_reference
    from services.inference.deepseek.generate import greedy
    from services.inference.deepseek.model import DeepseekV3ForCausalLM as Native
    from services.inference.deepseek.weights import Linear
    from services.inference.engine import fp8_gemv

    d = str(dev)
    tc = Native.from_pretrained(fp8, dtype=torch.bfloat16, device=d, keep_fp8=True)
    mode, frac, kinds = tc.fp8_matmul, tc.fp8_tensor_core_fraction, tc.fp8_linears
    if dev.type != "cuda":
        force_kernel(tc, kernel(dev)[0])
    em = Native.from_pretrained(fp8, dtype=torch.bfloat16, device=d, keep_fp8=True)
    force_kernel(em, Backend("emulate", True, 1))
    deq16 = Native.from_pretrained(deq, dtype=torch.bfloat16, device=d)
    deq32 = Native.from_pretrained(deq, dtype=torch.float32, device=d)
    models = {"tc_bf16": tc, "emulated_bf16": em, "deq_bf16": deq16, "deq_fp32": deq32}
    ps = prompts(4, seed=53)
    toks = {k: greedy(m, ps, n) for k, m in models.items()}
    seq = ps[0] + toks["deq_fp32"][0]
    lin_err = []

    def hook(mod, args, out):
        x = args[0]
        if mod.kernels and mod.block_aligned and x.dim() == 2 and fp8_gemv.applies(x, mod.weight, mod.weight_scale_inv):
            # decode-sized rows: engine/fp8_gemv.py (activation kept in bf16, weight dequantized)
            ref = F.linear(x.float(), dequant_slice(mod.weight, mod.weight_scale_inv, dtype=torch.float32))
        else:
            ref = fp8_block_matmul_reference(x, mod.weight, mod.weight_scale_inv)
        lin_err.append(float((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)))
    hooks = [m.register_forward_hook(hook) for m in tc.modules()
             if isinstance(m, Linear) and m.fp8_mode == TENSOR_CORE]
    with torch.no_grad():
        lg = {k: native_logits(m, seq, dev) for k, m in models.items()}          # [T, V] each
    for h in hooks:
        h.remove()

    def rel(a, b):
        per_pos = (lg[a] - lg[b]).abs().max(-1).values / lg[b].abs().max()
        return {"max": round(float(per_pos.max()), 5), "mean": round(float(per_pos.mean()), 5)}

    r = {"tc_vs_deq_bf16": rel("tc_bf16", "deq_bf16"), "emulated_vs_deq_bf16": rel("emulated_bf16", "deq_bf16"),
         "tc_vs_emulated": rel("tc_bf16", "emulated_bf16"), "bf16_noise_deq_bf16_vs_fp32": rel("deq_bf16", "deq_fp32")}
    tol = 1.5 * r["emulated_vs_deq_bf16"]["max"] + 0.02
    div = {f"{a}_vs_{b}": [first_divergence(x, y) for x, y in zip(toks[a], toks[b])]
           for a, b in (("tc_bf16", "deq_bf16"), ("emulated_bf16", "deq_bf16"), ("tc_bf16", "emulated_bf16"))}
    kernel_ok = bool(lin_err) and max(lin_err) <= 1e-2
    ok = kernel_ok and r["tc_vs_deq_bf16"]["max"] <= tol
    if dev.type == "cuda":
        ok &= frac == 1.0
    emit("c_fp8", fp8_matmul=mode, fp8_tensor_core_fraction=frac, fp8_linears=kinds,
         kernel="real" if dev.type == "cuda" else kernel(dev)[1],
         linear_calls_checked=len(lin_err), linear_max_rel_err_vs_reference=max(lin_err or [float("nan")]),
         logits_rel_diff=r, tolerance={"linear <=": 1e-2, "tc_vs_deq_bf16 max <=": round(tol, 5)},
         first_divergence=div, ok=ok,
         note="logits: teacher-forced over prompt 0 + its fp32 greedy tokens; per position max |diff| / "
              "max |logit|, max and mean over positions")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_deepseek_check", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU run of the script itself (kernel emulated)")
    ap.add_argument("--parts", default="env,a,b,c", help="comma list of env,a,b,c")
    ap.add_argument("--new", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--v2lite-layers", type=int, default=8, help="bench_deepseek.check depth; 0 skips")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="optional parts (c_engine_tp2, b_v2lite) start only before this many seconds")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if not args.smoke and not torch.cuda.is_available():
        emit("env", error="no CUDA device: run with --smoke for the CPU check of this script")
        return 1
    dev = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False          # fp32 comparisons must be fp32
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    global SHIM
    SHIM = telemetry_shim()
    t0 = time.perf_counter()
    if "env" in parts:
        run_part("env", part_env, dev)
    if "a" in parts:
        run_part("a_scaled_mm", part_a, dev, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "tiny"
        try:
            from ds_tiny import build

            build(folder, seed=11, eos_token_id=None)
        except Exception as exc:  # noqa: BLE001
            emit("tiny_model", error=f"{type(exc).__name__}: {exc}"[:800])
            parts -= {"b", "c"}
        fp8, deq = tmp / "fp8", tmp / "deq"
        if "b" in parts:
            for dt in (torch.float32, torch.bfloat16):
                run_part("b_tiny_" + str(dt)[6:], part_b_tiny, dev, folder, dt, args.new)
            for dt, ref in ((torch.float32, "hf"), (torch.bfloat16, "native")):
                run_part("b_engine_" + str(dt)[6:], part_engine, dev, folder, dt, args.new,
                         "b_engine_" + str(dt)[6:], ref)
        if "c" in parts:
            from services.inference.deepseek.fp8 import dequantize_checkpoint, quantize_checkpoint

            quantize_checkpoint(folder, fp8)
            dequantize_checkpoint(fp8, deq)
            run_part("c_fp8", part_c, dev, fp8, deq, args.new)
            run_part("c_engine", part_engine, dev, fp8, torch.bfloat16, args.new, "c_engine", "native", True)
        # optional, longest last: skipped (said so) once the time budget is spent
        if "c" in parts and (dev.type == "cpu" or torch.cuda.device_count() >= 2):     # CPU smoke: gloo
            if within_budget("c_engine_tp2", t0, args.budget_s):
                run_part("c_engine_tp2", part_engine, dev, fp8, torch.bfloat16, args.new, "c_engine_tp2", "native",
                         True, 2)
        if "b" in parts and args.v2lite_layers and not args.smoke:
            if within_budget("b_v2lite", t0, args.budget_s):
                run_part("b_v2lite", part_v2lite, dev, args.v2lite_layers)
    emit("summary", verdicts=VERDICTS, seconds=round(time.perf_counter() - t0, 1),
         legend="ok: checked and passed; FAIL: checked and failed; info: figures only; error: could not run; "
                "skipped: time budget")
    return 0 if all(v in ("ok", "info", "skipped") for v in VERDICTS.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
