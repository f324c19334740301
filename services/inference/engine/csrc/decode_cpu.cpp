// Batch-1 decode step of a Llama-family model on CPU, all layers in one call.
//
// Why: at batch 1 a SmolLM2-135M step is ~120 small tensor ops plus 121 GEMVs, and calling each
// from Python costs ~2 us on top of the op itself (~3 ms of a ~13 ms step on the development
// machine). This runs the very same ATen ops in the same order as the Python path (models/llama.py,
// engine/ops.py, engine/attention.py), so results are bit-identical; only the interpreter is gone.
// Scope: one sequence, its context in contiguous cache slots, tensor parallelism 1.
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

// residual: [1, H] embeddings. Per layer i, weights[7 * i + k] for k = ln1, qkv, o, ln2, gate_up,
// down, and biases[4 * i + k] for k = qkv, o, gate_up, down (numel 0 = none). caches: [layers, 2 Hkv,
// slots, D]. The new token goes to `slot`; it attends to slots [ctx_start, ctx_start + ctx_len).
// Returns the final normed hidden state [1, H].
at::Tensor decode_b1(at::Tensor residual, const std::vector<at::Tensor>& weights,
                     const std::vector<at::Tensor>& biases, const at::Tensor& norm_w, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& caches, int64_t slot, int64_t ctx_start,
                     int64_t ctx_len, int64_t hq, int64_t hkv, int64_t d, int64_t inter, int64_t half,
                     double eps, double scale, bool packed) {
  at::NoGradGuard no_grad;
  const int64_t layers = caches.size(0), g = hq / hkv;
  const auto slot_t = at::full({1}, slot, at::TensorOptions().dtype(at::kLong));
  at::Tensor x, h;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = &weights[7 * i];
    const at::Tensor* b = &biases[4 * i];
    if (!x.defined()) {
      h = rms_norm(residual, w[0], eps);
    } else {
      residual = residual + x;                                          // ops.add_rms_norm
      h = rms_norm(residual, w[0], eps);
    }
    // attention (LlamaAttention.forward, paged_attention, decode_attention at B == 1)
    auto qkv = linear(h, w[1], opt(b[0]), packed);                      // [1, (Hq + 2 Hkv) D]
    auto qk = qkv.slice(1, 0, (hq + hkv) * d).view({1, hq + hkv, d});
    qk = qk * cos + at::roll(qk, {half}, {-1}) * sin;                   // ops.rope
    auto q = qk.slice(1, 0, hq), k = qk.slice(1, hq);
    auto v = qkv.slice(1, (hq + hkv) * d).view({1, hkv, d});
    auto cache = caches[i];
    cache.index_copy_(1, slot_t, at::cat({k, v}, 1).transpose(0, 1));
    auto kv = cache.slice(1, ctx_start, ctx_start + ctx_len).to(at::kFloat);   // [2 Hkv, L, D]
    auto qq = q.view({1, hkv, g, d}).transpose(0, 1).to(at::kFloat);   // [Hkv, 1, G, D]
    auto kk = kv.slice(0, 0, hkv).unsqueeze(1), vv = kv.slice(0, hkv).unsqueeze(1);
    auto s = at::matmul(qq, kk.transpose(-1, -2));                      // [Hkv, 1, G, L]
    auto p = at::softmax(s * scale, -1);                                // ops.attn_softmax (fp32)
    auto o = at::matmul(p, vv).transpose(0, 1).reshape({1, hq * d}).to(q.scalar_type());
    auto a = linear(o, w[2], std::nullopt, packed);                     // RowParallelLinear, tp = 1
    if (b[1].numel()) a = a + b[1];
    residual = residual + a;
    h = rms_norm(residual, w[3], eps);
    // MLP
    auto gu = linear(h, w[4], opt(b[2]), packed);                       // [1, 2 I]
    auto m = at::silu(gu.slice(1, 0, inter)) * gu.slice(1, inter);     // ops.silu_mul
    x = linear(m, w[5], std::nullopt, packed);
    if (b[3].numel()) x = x + b[3];
  }
  residual = residual + x;
  return rms_norm(residual, norm_w, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_b1", &decode_b1, "all layers of a batch-1 Llama decode step (CPU)");
}
