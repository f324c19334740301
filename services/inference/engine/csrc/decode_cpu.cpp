// Decode step of a Llama-family model on CPU (one new token per sequence), all layers in one call.
//
// Why: at batch 1 a SmolLM2-135M step is ~120 small tensor ops plus 121 GEMVs, and calling each
// from Python costs ~2 us on top of the op itself (~3 ms of a ~13 ms step on the development
// machine). This runs the very same ATen ops in the same order as the Python path (models/llama.py,
// engine/ops.py, engine/attention.py), so results are bit-identical; only the interpreter is gone.
// Scope: pure decode steps (no prefill chunk), tensor parallelism 1.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        c10::string_view, c10::List<std::optional<c10::Scalar>>,
                        std::optional<c10::string_view>)>();
  return op.call(x, w, b, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool packed) {
  return packed ? packed_linear(x, w, b) : at::linear(x, w, b);
}

// engine/ops.py rms_norm: w * rms_norm(x.float()).to(x.dtype)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return w * at::rms_norm(x.to(at::kFloat), {x.size(-1)}, std::nullopt, eps).to(x.scalar_type());
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.numel() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace

// One decode step of B sequences (one new token each). residual: [B, H] embeddings. Per layer i,
// weights[6 * i + k] for k = ln1, qkv, o, ln2, gate_up, down, and biases[4 * i + k] for k = qkv, o,
// gate_up, down (numel 0 = none). caches: [layers, 2 Hkv, slots, D]; new tokens go to `slots` [B].
// Context: with `blocks` empty, B == 1 and slots [ctx_start, ctx_start + ctx_len); else the
// block-gather layout of attention.py (blocks = decode_block_rows [2 Hkv * B * nblk], block_mask
// [B, 1, 1, nblk * block_size]).
// Returns the final normed hidden state [B, H].
at::Tensor decode(at::Tensor residual, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                  const at::Tensor& norm_w, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& caches,
                  const at::Tensor& slots, int64_t ctx_start, int64_t ctx_len, const at::Tensor& blocks,
                  const at::Tensor& block_mask, int64_t block_size, int64_t hq, int64_t hkv, int64_t d,
                  int64_t inter, int64_t half, double eps, double scale, bool packed) {
  at::NoGradGuard no_grad;
  const int64_t layers = caches.size(0), g = hq / hkv, b = residual.size(0);
  at::Tensor x, h;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = &weights[6 * i];
    const at::Tensor* bias = &biases[4 * i];
    if (x.defined()) residual = residual + x;                          // ops.add_rms_norm
    h = rms_norm(residual, w[0], eps);
    // attention (LlamaAttention.core, paged_attention, decode_attention)
    auto qkv = linear(h, w[1], opt(bias[0]), packed);                   // [B, (Hq + 2 Hkv) D]
    auto qk = qkv.slice(1, 0, (hq + hkv) * d).view({b, hq + hkv, d});
    qk = qk * cos + at::roll(qk, {half}, {-1}) * sin;                   // ops.rope
    auto q = qk.slice(1, 0, hq), k = qk.slice(1, hq);
    auto v = qkv.slice(1, (hq + hkv) * d).view({b, hkv, d});
    auto cache = caches[i];
    cache.index_copy_(1, slots, at::cat({k, v}, 1).transpose(0, 1));
    at::Tensor kv, mask;
    int64_t lctx = ctx_len;
    if (blocks.numel() == 0) {
      kv = cache.slice(1, ctx_start, ctx_start + ctx_len);              // [2 Hkv, L, D] (a view, B == 1)
    } else {
      kv = cache.view({-1, block_size * d}).index_select(0, blocks).view({2 * hkv, -1, block_size * d});
      lctx = kv.size(1) / b * block_size;
      kv = kv.view({2 * hkv, b * lctx, d});
      mask = block_mask.view({1, b, 1, lctx});
    }
    auto qq = q.view({b, hkv, g, d}).transpose(0, 1);                   // [Hkv, B, G, D]
    if (b == 1) {                                                        // fp32 at batch 1 (attention.py)
      kv = kv.to(at::kFloat);
      qq = qq.to(at::kFloat);
    }
    auto kk = kv.slice(0, 0, hkv).view({hkv, b, lctx, d}), vv = kv.slice(0, hkv).view({hkv, b, lctx, d});
    auto s = at::matmul(qq, kk.transpose(-1, -2)).to(at::kFloat) * scale;   // [Hkv, B, G, L]
    if (mask.defined()) s = s + mask;
    auto p = at::softmax(s, -1).to(qq.scalar_type());                   // ops.attn_softmax
    auto o = at::matmul(p, vv).transpose(0, 1).reshape({b, hq * d}).to(q.scalar_type());
    auto a = linear(o, w[2], std::nullopt, packed);                     // RowParallelLinear, tp = 1
    if (bias[1].numel()) a = a + bias[1];
    residual = residual + a;
    h = rms_norm(residual, w[3], eps);
    // MLP
    auto gu = linear(h, w[4], opt(bias[2]), packed);                    // [B, 2 I]
    auto m = at::silu(gu.slice(1, 0, inter)) * gu.slice(1, inter);     // ops.silu_mul
    x = linear(m, w[5], std::nullopt, packed);
    if (bias[3].numel()) x = x + bias[3];
  }
  residual = residual + x;
  return rms_norm(residual, norm_w, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, like every torch op called from Python: the worker's gRPC event loop keeps
  // running during a step (holding it made each RPC wait out the whole step).
  m.def("decode", &decode, py::call_guard<py::gil_scoped_release>(),
        "all layers of a Llama decode step (CPU): one new token per sequence");
}
