"""Triton decode kernels (services/inference/engine/triton_ops.py) against the torch path they replace,
run on CPU tensors under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton defines the kernels, so all cases run once in a
subprocess (this file run as a script) that prints one JSON line of measured errors per case; the
tests assert on those figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)


# ----------------------------------------------------------------- cases (run in the subprocess)

def _rope_case(dtype, hq, hkv, d, n=5, nslots=64):
    import torch

    from services.inference.engine import triton_ops as T

    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(n, (hq + 2 * hkv) * d + 8, generator=g).to(dtype)
    qkv = big[:, 8:]                                      # [N, (Hq + 2 Hkv) * D], row stride != width
    pos = torch.randint(0, 500, (n,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(pos.float(), inv).repeat(1, 2)      # [N, D]
    cos, sin = emb.cos(), emb.sin()
    sin[:, :d // 2] = -sin[:, :d // 2]
    cos, sin = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    slots = torch.randperm(nslots, generator=g)[:n]
    cache = torch.randn(2 * hkv, nslots, d, generator=g).to(dtype)
    ref_cache, orig = cache.clone(), cache.clone()
    q = T.rope_kv_write(qkv, cos, sin, slots, cache, hq, hkv, d)
    ref_q = T.rope_kv_write_torch(qkv, cos, sin, slots, ref_cache, hq, hkv, d)
    untouched = torch.ones(nslots, dtype=torch.bool)
    untouched[slots] = False
    return {"q_err": (q.float() - ref_q.float()).abs().max().item(),
            "q_shape": list(q.shape), "q_dtype": str(q.dtype),
            "written_err": (cache[:, slots].float() - ref_cache[:, slots].float()).abs().max().item(),
            "untouched_equal": torch.equal(cache[:, untouched], ref_cache[:, untouched]),
            "written_changed": not torch.equal(cache[:, slots], orig[:, slots])}


def _attn_case(dtype, hq, hkv, d, lens, block_size, part_size, nslots_blocks=64):
    """Random non-contiguous block tables; entries past each length are -1 or out of range."""
    import torch

    from services.inference.engine import triton_ops as T
    from services.inference.engine.attention import decode_attention
    from services.inference.engine.cuda_graphs import _Static

    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(2)
    b = len(lens)
    cache = torch.randn(2 * hkv, nslots_blocks * block_size, d, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    lctx = max(lens)
    st = _Static(b, lctx, block_size, scratch=0, device="cpu")             # the engine's graph metadata
    table = torch.full((b, st.nblk), -1, dtype=torch.int64)
    perm = torch.randperm(nslots_blocks, generator=g)
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // block_size)
        table[i, :k] = perm[used:used + k]
        used += k
    garbage = table.clone()
    garbage[garbage < 0] = 10 ** 9                                          # never dereferenced
    st.inp[3 * b:4 * b] = torch.tensor(lens)
    st.inp[4 * b:] = table.reshape(-1)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    scale = d ** -0.5
    out = T.paged_decode_attention(q, cache, garbage, lens_t, scale, block_size, part_size=part_size)
    ref = T.paged_decode_attention_torch(q.float(), cache.float(), table, lens_t, scale, block_size)
    _, _, meta = st.meta_and_inputs()
    engine = decode_attention(q, cache, meta, scale)                       # [B, Hq * D]
    buf = torch.empty(b, hq * d, dtype=dtype)
    res = T.paged_decode_attention(q, cache, table, lens_t, scale, block_size, out=buf, part_size=part_size)
    n_parts = -(-table.shape[1] * block_size // (part_size or T.partition_size(lctx, b, hkv, q.device)))
    return {"err_vs_fp32": (out.float() - ref.float()).abs().max().item(),
            "err_vs_engine": (out.float() - engine.float()).abs().max().item(),
            "engine_vs_fp32": (engine.float() - ref.float()).abs().max().item(),
            "out_buffer_used": res.data_ptr() == buf.data_ptr() and torch.equal(buf, out),
            "shape": list(out.shape), "dtype": str(out.dtype), "n_parts": n_parts}


def _engine_padded_case():
    """The CUDA-graph buffers as the engine fills them (cuda_graphs._Static: int64 lengths and a -1
    padded block table, views of one input buffer), with a padding row (length 1, no blocks)."""
    import torch

    from services.inference.engine import triton_ops as T
    from services.inference.engine.cuda_graphs import _Static

    g = torch.Generator().manual_seed(3)
    hq, hkv, d, bs, lens = 8, 2, 64, 16, [70, 1, 33]
    b = len(lens) + 1                                                       # + one padding row
    st = _Static(b, 96, bs, scratch=0, device="cpu")
    cache = torch.randn(2 * hkv, 32 * bs, d, generator=g)
    cache[:, 0] = float("nan")                                              # the scratch slot
    table = torch.full((b, st.nblk), -1, dtype=torch.int64)
    table[0, :5] = torch.tensor([9, 3, 12, 1, 20])
    table[1, 0] = 7
    table[2, :3] = torch.tensor([30, 2, 15])
    st.inp[3 * b:4 * b] = torch.tensor(lens + [1])
    st.inp[4 * b:] = table.reshape(-1)
    _, _, meta = st.meta_and_inputs()
    lens_v = st.inp[:4 * b].view(4, b)[3]                                   # int64 view
    table_v = st.inp[4 * b:].view(b, st.nblk)
    q = torch.randn(b, hq, d, generator=g)
    res = {}
    for ps in (64, None):
        out = T.paged_decode_attention(q, cache, table_v, lens_v, d ** -0.5, bs, part_size=ps)
        ref = T.paged_decode_attention_torch(q[:3], cache, table[:3], lens_v[:3], d ** -0.5, bs)
        res[str(ps)] = {"err": (out[:3] - ref).abs().max().item(), "pad_row_zero": bool((out[3] == 0).all())}
    return res


CASES = {
    "attn_engine_padded": _engine_padded_case,
    "rope_fp32_d64": lambda: _rope_case("float32", 8, 2, 64),
    "rope_fp32_d128": lambda: _rope_case("float32", 4, 1, 128, n=3),
    "rope_bf16_d128": lambda: _rope_case("bfloat16", 8, 2, 128),
    # lengths incl. 1, exactly one partition (64), crossing partition boundaries (65, 150); G = 4
    "attn_fp32_multi": lambda: _attn_case("float32", 8, 2, 64, [1, 64, 65, 150], 16, 64),
    "attn_fp32_single": lambda: _attn_case("float32", 8, 2, 128, [37, 1, 90], 16, None),
    "attn_fp32_bs8": lambda: _attn_case("float32", 8, 2, 64, [129, 3], 8, 64),
    "attn_fp32_bs32": lambda: _attn_case("float32", 4, 1, 64, [200, 31], 32, 128),
    "attn_bf16_multi": lambda: _attn_case("bfloat16", 8, 2, 128, [1, 100, 190], 16, 64),
}


def _compile_sm90():
    """Compile every kernel variant to an sm_90 cubin with the ptxas bundled in triton (no GPU
    needed), specialised as the launcher does (16-byte aligned pointers, strides % 16 == 0)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from services.inference.engine import triton_ops as T

    rope, attn, merge, interpreted = T._kernels()
    assert not interpreted
    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, const, div, **opts):
        full = {n: "constexpr" if n in const else sig[n] for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
        k = triton.compile(triton.compiler.ASTSource(fn, full, const, attrs), target=target, options=opts)
        gdc = sum(ln.strip().startswith("griddepcontrol") for ln in k.asm["ptx"].splitlines())
        return {"name": fn.__name__, **{k_: str(v) for k_, v in const.items()}, "cubin_bytes": len(k.asm["cubin"]),
                "shared": k.metadata.shared, "griddepcontrol": gdc}

    out = []
    for dt, rnd in (("bf16", 1), ("fp32", 0)):
        for hq, hkv, d in ((32, 8, 128), (8, 2, 64)):
            p = "*" + dt
            out.append(build(rope, dict(qkv=p, cos=p, sin=p, slots="*i64", cache=p, q_out=p, s_qkv_n="i32",
                                        s_cos_n="i32", s_sin_n="i32", s_c_h="i64", s_c_s="i32", s_q_n="i32",
                                        s_q_h="i32"),
                             dict(HQ=hq, HKV=hkv, D=d, ROUND=rnd, PDL=True),
                             ["qkv", "cos", "sin", "slots", "cache", "q_out"],
                             enable_fp_fusion=False))
            for single in (True, False):
                sig = dict(q=p, cache=p, table="*i64", lens="*i32", out=p, m_buf="*fp32", l_buf="*fp32",
                           acc_buf="*fp32", scale_log2="fp32", part_size="i32", s_qb="i32", s_qh="i32",
                           s_ch="i64", s_cs="i32", s_tb="i32", s_ob="i32", n_parts="i32")
                const = dict(HQ=hq, HKV=hkv, G=hq // hkv, GP=16, D=d, BS=16, BLOCK=T.BLOCK_N, SINGLE=single,
                             F32DOT=dt == "fp32", ROUND=rnd, PDL=single)
                out.append(build(attn, sig, const, ["q", "cache", "table", "lens", "out", "m_buf", "l_buf", "acc_buf",
                                                    "part_size", "s_qb", "s_qh", "s_ch", "s_cs", "s_ob"],
                                 num_warps=T.NUM_WARPS, num_stages=T.NUM_STAGES))
            out.append(build(merge, dict(m_buf="*fp32", l_buf="*fp32", acc_buf="*fp32", out=p, s_ob="i32",
                                         n_parts="i32"), dict(HQ=hq, D=d, NPP=32, ROUND=rnd, PDL=True),
                             ["m_buf", "l_buf", "acc_buf", "out", "s_ob"]))
    return out


def _main():
    if sys.argv[1:] == ["--sm90"]:
        print(json.dumps(_compile_sm90()))
        return
    for name, fn in CASES.items():
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001  (reported to the test as a failure)
            res = {"error": repr(e)}
        print(json.dumps({"case": name, **res}), flush=True)


# ----------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = {}
    for line in p.stdout.splitlines():
        r = json.loads(line)
        out[r.pop("case")] = r
    return out


def _case(results, name):
    r = results[name]
    assert "error" not in r, r["error"]
    return r


@pytest.mark.parametrize("name", ["rope_fp32_d64", "rope_fp32_d128"])
def test_rope_kv_write_fp32_exact(results, name):
    r = _case(results, name)
    assert r["q_err"] <= 1e-6 and r["written_err"] <= 1e-6
    assert r["untouched_equal"] and r["written_changed"]
    assert r["q_dtype"] == "torch.float32"


def test_rope_kv_write_bf16_matches_eager_rounding(results):
    r = _case(results, "rope_bf16_d128")
    assert r["q_shape"] == [5, 8, 128] and r["q_dtype"] == "torch.bfloat16"
    # each op rounded to bf16 as eager torch does: bit-identical to ops.rope + index_copy_
    assert r["q_err"] == 0.0 and r["written_err"] == 0.0
    assert r["untouched_equal"]


@pytest.mark.parametrize("name", ["attn_fp32_multi", "attn_fp32_single", "attn_fp32_bs8", "attn_fp32_bs32"])
def test_paged_decode_attention_fp32(results, name):
    r = _case(results, name)
    assert r["err_vs_fp32"] < 1e-5 and r["err_vs_engine"] < 1e-5
    assert r["out_buffer_used"]
    assert r["dtype"] == "torch.float32"


def test_paged_decode_attention_engine_buffers_with_padding_row(results):
    r = _case(results, "attn_engine_padded")
    for ps in ("64", "None"):                    # two partitions + merge, and one partition
        assert r[ps]["err"] < 1e-5               # the NaN scratch slot never leaks into real rows
        assert r[ps]["pad_row_zero"]             # the padding row (no blocks) is 0, finite


def test_paged_decode_attention_partitions(results):
    assert _case(results, "attn_fp32_multi")["n_parts"] == 3      # nblk 10 * 16 = 160 positions / 64
    assert _case(results, "attn_fp32_single")["n_parts"] == 1     # merge kernel skipped


def test_paged_decode_attention_bf16(results):
    r = _case(results, "attn_bf16_multi")
    assert r["shape"] == [3, 8 * 128] and r["dtype"] == "torch.bfloat16"
    assert r["err_vs_fp32"] < 2e-2
    # no worse than the engine's own bf16 torch path, measured against the same fp32 oracle
    assert r["err_vs_fp32"] <= 2 * r["engine_vs_fp32"] + 4e-3


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter does not run Triton's compiler: build real sm_90 cubins of every variant."""
    from tests.inference.sm90 import compile_json

    built = compile_json(__file__, tmp_path)
    assert len(built) == 2 * 2 * 4
    assert all(k["cubin_bytes"] > 1000 for k in built)
    # programmatic dependent launch: wait + launch_dependents where PDL is on, nothing where off
    assert all(k["griddepcontrol"] == (2 if k["PDL"] == "True" else 0) for k in built)
    assert sum(k["PDL"] == "False" for k in built) == 4


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from services.inference.engine import triton_ops\n"
            "assert triton_ops.available() is False\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


if __name__ == "__main__":
    _main()
