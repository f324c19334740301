// Decode step of a Llama-family model on CPU (one new token per sequence), all layers in one call.
//
// Why: at batch 1 a SmolLM2-135M step is ~120 small tensor ops plus 121 GEMVs, and calling each
// from Python costs ~2 us on top of the op itself (~3 ms of a ~13 ms step on the development
// machine). This runs the very same ATen ops in the same order as the Python path (models/llama.py,
// engine/ops.py, engine/attention.py), so results are bit-identical; only the interpreter is gone.
// Scope: pure decode steps (no prefill chunk), tensor parallelism 1.
//
// With `loops` (the default), batch 1 with a slot-range context goes further: residual add +
// RMSNorm, RoPE + KV-cache write, attention and SiLU-mul are plain loops (decode_loops) instead of
// ~35 ATen calls of 1-10 us on 576-wide rows. Same formulas and per-op roundings to the model dtype;
// the fp32 reductions (norm variance, q.k, p.v, softmax sum) are summed in this file's order, so
// results differ from the ATen path in the last bits (tests/inference/test_cpu_decode.py bounds it
// and checks that greedy tokens agree). Batched steps keep the ATen ops (bit-identical to Python: at
// 16 rows loops measured no faster, the small ops are no longer call-bound there), except attention
// in bf16 on CPUs with AVX512-BF16: attention_blocks_bf16 reads the paged context in place instead of
// gathering it (fp32 scores and probabilities; last-bit differences, bounded by the same tests).
// Built with -fopenmp, so at::parallel_for here runs on ATen's OpenMP pool (without it, serially).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// ---- shared by both paths ---------------------------------------------------------------------

// Attention of B single queries q [B, Hq, D] (model dtype) over the layer's cache [2 Hkv, slots, D]
// (new tokens already written): LlamaAttention.core -> paged_attention -> decode_attention. Context:
// with `blocks` empty, B == 1 and slots [ctx_start, ctx_start + ctx_len); else the block-gather
// layout. Returns [B, Hq * D].
at::Tensor attention_aten(const at::Tensor& q, const at::Tensor& cache, int64_t ctx_start, int64_t ctx_len,
                          const at::Tensor& blocks, const at::Tensor& block_mask, int64_t block_size, int64_t hq,
                          int64_t hkv, int64_t d, double scale) {
  const int64_t b = q.size(0), g = hq / hkv;
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
  return at::matmul(p, vv).transpose(0, 1).reshape({b, hq * d}).to(q.scalar_type());
}

// ---- loops -------------------------------------------------------------------------------------
// Row helpers over contiguous buffers; T is float, c10::BFloat16 or c10::Half, whose arithmetic
// operators compute in float and round to T, like an ATen op on T tensors.

// Sum of a[i] * b[i] in fp32 with 8 independent partial sums (vectorisable; a fixed order).
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<float>(a[i + j]) * static_cast<float>(b[i + j]);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return s;
}

// Per row of [B, n]: residual += x (when x), out = w * T(rms_norm(float(residual))):
// ops.add_rms_norm / rms_norm.
template <typename T>
void add_rms_norm_rows(T* residual, const T* x, const T* w, T* out, int64_t rows, int64_t n, double eps) {
  for (int64_t r = 0; r < rows; ++r, residual += n, out += n) {
    if (x != nullptr) {
      for (int64_t i = 0; i < n; ++i) residual[i] = residual[i] + x[i];
      x += n;
    }
    const float inv = 1.0f / std::sqrt(dot(residual, residual, n) / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * static_cast<T>(static_cast<float>(residual[i]) * inv);
  }
}

// Per row r of qkv [B, (Hq + 2 Hkv) D]: RoPE on q and k (ops.rope: x * cos + roll(x, half) * sin,
// rotate_half's sign in sin; cos/sin [B, D]), q into q_out [B, Hq, D], k and v written at slots[r]
// of the layer's cache [2 Hkv, slots, D].
template <typename T>
void rope_write_rows(const T* qkv, const T* cos, const T* sin, const int64_t* slot, T* cache, int64_t nslots,
                     int64_t rows, int64_t hq, int64_t hkv, int64_t d, int64_t half, T* q_out) {
  const int64_t width = (hq + 2 * hkv) * d;
  for (int64_t r = 0; r < rows; ++r, qkv += width, cos += d, sin += d, q_out += hq * d) {
    auto rope = [&](const T* x, int64_t j) {
      const T p1 = x[j] * cos[j], p2 = x[(j - half + d) % d] * sin[j];
      return static_cast<T>(p1 + p2);
    };
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t j = 0; j < d; ++j) q_out[h * d + j] = rope(qkv + h * d, j);
    for (int64_t h = 0; h < hkv; ++h) {
      T* kdst = cache + (h * nslots + slot[r]) * d;
      T* vdst = cache + ((hkv + h) * nslots + slot[r]) * d;
      for (int64_t j = 0; j < d; ++j) kdst[j] = rope(qkv + (hq + h) * d, j);
      for (int64_t j = 0; j < d; ++j) vdst[j] = qkv[(hq + hkv + h) * d + j];
    }
  }
}

// Batch 1, context slots [a, a + L) of cache [2 Hkv, slots, D]: o [Hq D] = softmax(q.K^T * scale) V
// in fp32 (attention.py at batch 1), q [Hq, D] in the model dtype.
template <typename T>
void attention_row(const T* q, const T* cache, int64_t nslots, int64_t a, int64_t L, int64_t hq, int64_t hkv,
                   int64_t d, float scale, T* o) {
  const int64_t g = hq / hkv;
  at::parallel_for(0, hq, L >= 1024 ? 1 : hq, [&](int64_t h0, int64_t h1) {
    std::vector<float> s(L), acc(d), qf(d);
    for (int64_t h = h0; h < h1; ++h) {
      const T* K = cache + ((h / g) * nslots + a) * d;           // [L, D]
      const T* V = cache + ((hkv + h / g) * nslots + a) * d;
      for (int64_t j = 0; j < d; ++j) qf[j] = static_cast<float>(q[h * d + j]);
      float mx = -INFINITY;
      for (int64_t l = 0; l < L; ++l) {
        s[l] = dot(qf.data(), K + l * d, d) * scale;
        mx = std::max(mx, s[l]);
      }
      float sum = 0.f;
      for (int64_t l = 0; l < L; ++l) sum += (s[l] = std::exp(s[l] - mx));
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < L; ++l) {
        const float p = s[l] / sum;
        const T* vr = V + l * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += p * static_cast<float>(vr[j]);
      }
      for (int64_t j = 0; j < d; ++j) o[h * d + j] = static_cast<T>(acc[j]);
    }
  });
}

// ---- batched attention in place (x86-64 with AVX512-BF16) ------------------------------------
// attention_aten's batched path copies every sequence's context out of the paged cache
// (index_select) and then runs tiny [G, D] x [D, L] products per (sequence, kv head) as one bmm:
// on the development machine ~0.29 ms per layer at 16 sequences of ~160 tokens. This reads K and V
// rows in place (~0.12 ms): q.k as bf16 dot products with fp32 sums (vdpbf16ps), one vectorised ATen
// softmax over all scores, p.V in fp32, the next block prefetched (blocks are scattered 2-4 KB runs;
// without the prefetch it was memory-latency-bound at ~0.2 ms). Scores and probabilities stay fp32
// (the ATen path rounds both to bf16), so results differ from it in the last bits; tests bound that.
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))   // avx512bf16 target
#define PRIVLM_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

bool cpu_has_avx512bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// the next KV block's cache lines (a block is one contiguous [bs, D] run; blocks are scattered)
inline void prefetch_block(const c10::BFloat16* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// s [G, Lmax] = scale * q [G, D] . K rows (row l at cache + (kb[l / bs] * bs + l % bs) * D), D % 32 == 0
PRIVLM_BF16 void scores_bf16(const c10::BFloat16* q, const c10::BFloat16* cache, const int64_t* kb, int64_t L,
                             int64_t bs, int64_t g, int64_t d, float scale, float* s, int64_t lmax) {
  for (int64_t l = 0; l < L; ++l) {
    if (l % bs == 0 && l + bs < L) prefetch_block(cache + kb[l / bs + 1] * bs * d, bs * d);
    const c10::BFloat16* k = cache + (kb[l / bs] * bs + l % bs) * d;
    for (int64_t j = 0; j < g; ++j) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + j * d + i), (__m512bh)_mm512_loadu_si512(k + i));
      s[j * lmax + l] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// o [G, D] (bf16) = p [G, Lmax] . V rows, fp32 accumulation; D % 16 == 0, acc: G * D floats
PRIVLM_BF16 void pv_bf16(const float* p, const c10::BFloat16* cache, const int64_t* vb, int64_t L, int64_t bs,
                         int64_t g, int64_t d, int64_t lmax, float* acc, c10::BFloat16* o) {
  std::fill(acc, acc + g * d, 0.f);
  for (int64_t l = 0; l < L; ++l) {
    if (l % bs == 0 && l + bs < L) prefetch_block(cache + vb[l / bs + 1] * bs * d, bs * d);
    const c10::BFloat16* v = cache + (vb[l / bs] * bs + l % bs) * d;
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 vf = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i)));
      for (int64_t j = 0; j < g; ++j) {
        float* a = acc + j * d + i;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[j * lmax + l]), vf, _mm512_loadu_ps(a)));
      }
    }
  }
  for (int64_t i = 0; i < g * d; ++i) o[i] = static_cast<c10::BFloat16>(acc[i]);
}

// q [B, Hq, D] bf16 contiguous, blocks [2 Hkv * B * nblk] rows of cache.view(-1, bs * D) (K heads,
// then V heads), lens [B] -> o [B, Hq * D]
void attention_blocks_bf16(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& blocks,
                           const at::Tensor& lens, int64_t nblk, int64_t bs, int64_t hq, int64_t hkv, int64_t d,
                           double scale, at::Tensor& o) {
  RECORD_FUNCTION("privlm::attention_blocks_bf16", std::vector<c10::IValue>());
  const int64_t b = q.size(0), g = hq / hkv, lmax = nblk * bs;
  const auto* qp = q.data_ptr<c10::BFloat16>();
  const auto* cp = cache.data_ptr<c10::BFloat16>();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto s = at::full({b, hq, lmax}, -INFINITY, at::TensorOptions().dtype(at::kFloat));   // [B, Hq, Lmax]
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, b * hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / hkv, h = t % hkv;
      scores_bf16(qp + (r * hq + h * g) * d, cp, bp + (h * b + r) * nblk, lp[r], bs, g, d, static_cast<float>(scale),
                  sp + (r * hq + h * g) * lmax, lmax);
    }
  });
  const auto pr = at::softmax(s, -1);                                  // [B, Hq, Lmax] fp32
  const float* pp = pr.data_ptr<float>();
  auto* op = o.data_ptr<c10::BFloat16>();
  at::parallel_for(0, b * hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(g * d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / hkv, h = t % hkv;
      pv_bf16(pp + (r * hq + h * g) * lmax, cp, bp + ((hkv + h) * b + r) * nblk, lp[r], bs, g, d, lmax, acc.data(),
              op + (r * hq + h * g) * d);
    }
  });
}
#else
bool cpu_has_avx512bf16() { return false; }
void attention_blocks_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           int64_t, int64_t, int64_t, int64_t, double, at::Tensor&) {}
#endif

// out = T(silu(gate)) * up over [I] (ops.silu_mul).
template <typename T>
void silu_mul_row(const T* gu, int64_t inter, T* out) {
  for (int64_t i = 0; i < inter; ++i) {
    const float g = static_cast<float>(gu[i]);
    out[i] = static_cast<T>(g / (1.0f + std::exp(-g))) * gu[inter + i];
  }
}

// decode() with `loops`, batch 1, context at slots [ctx_start, ctx_start + ctx_len) (the new token's
// slot included): the GEMVs stay ATen/oneDNN calls, everything between them is the loops above.
template <typename T>
at::Tensor decode_loops(at::Tensor residual, const std::vector<at::Tensor>& weights,
                        const std::vector<at::Tensor>& biases, const at::Tensor& norm_w, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& caches, const at::Tensor& slots, int64_t ctx_start,
                        int64_t ctx_len, int64_t hq, int64_t hkv, int64_t d, int64_t inter, int64_t half, double eps,
                        double scale, bool packed) {
  const int64_t layers = caches.size(0), b = 1, hidden = residual.size(1), nslots = caches.size(2);
  residual = residual.contiguous().clone();                      // [1, H], updated in place below
  auto h = at::empty_like(residual);
  auto q = at::empty({b, hq, d}, residual.options());
  auto o = at::empty({b, hq * d}, residual.options());
  auto m = at::empty({b, inter}, residual.options());
  const auto c = cos.contiguous(), sn = sin.contiguous();       // [1, 1, D]
  const auto sl = slots.to(at::kLong).contiguous();
  T* res = residual.data_ptr<T>();
  at::Tensor x;                                                  // the previous layer's MLP output [1, H]
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = &weights[6 * i];
    const at::Tensor* bias = &biases[4 * i];
    add_rms_norm_rows(res, x.defined() ? x.data_ptr<T>() : nullptr, w[0].data_ptr<T>(), h.data_ptr<T>(), b, hidden,
                      eps);
    auto qkv = linear(h, w[1], opt(bias[0]), packed).contiguous();   // [1, (Hq + 2 Hkv) D]
    auto cache = caches[i];
    rope_write_rows(qkv.data_ptr<T>(), c.data_ptr<T>(), sn.data_ptr<T>(), sl.data_ptr<int64_t>(), cache.data_ptr<T>(),
                    nslots, b, hq, hkv, d, half, q.data_ptr<T>());
    attention_row(q.data_ptr<T>(), cache.data_ptr<T>(), nslots, ctx_start, ctx_len, hq, hkv, d,
                  static_cast<float>(scale), o.data_ptr<T>());
    auto a = linear(o, w[2], std::nullopt, packed);             // [1, H]
    if (bias[1].numel()) a = a + bias[1];
    a = a.contiguous();
    add_rms_norm_rows(res, a.data_ptr<T>(), w[3].data_ptr<T>(), h.data_ptr<T>(), b, hidden, eps);
    auto gu = linear(h, w[4], opt(bias[2]), packed).contiguous();    // [1, 2 I]
    silu_mul_row(gu.data_ptr<T>(), inter, m.data_ptr<T>());
    x = linear(m, w[5], std::nullopt, packed);
    if (bias[3].numel()) x = x + bias[3];
    x = x.contiguous();
  }
  auto out = at::empty_like(residual);
  add_rms_norm_rows(res, x.data_ptr<T>(), norm_w.data_ptr<T>(), out.data_ptr<T>(), b, hidden, eps);
  return out;
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
                  int64_t inter, int64_t half, double eps, double scale, bool packed, bool loops) {
  at::NoGradGuard no_grad;
  if (loops && residual.size(0) == 1 && blocks.numel() == 0 && caches.is_contiguous()) {
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, residual.scalar_type(), "decode_loops", [&] {
      out = decode_loops<scalar_t>(residual, weights, biases, norm_w, cos, sin, caches, slots, ctx_start, ctx_len,
                                   hq, hkv, d, inter, half, eps, scale, packed);
    });
    return out;
  }
  const int64_t layers = caches.size(0), b = residual.size(0);
  // `loops` with the block-gather layout, bf16, AVX512-BF16: attention_blocks_bf16 reads the context
  // in place. Context lengths from the mask (a valid prefix of 0s, then -inf).
  const bool paged = loops && blocks.numel() > 0 && residual.scalar_type() == at::kBFloat16 && d % 32 == 0 &&
                     caches.is_contiguous() && cpu_has_avx512bf16();
  at::Tensor lens, rows;
  if (paged) {
    lens = block_mask.view({b, -1}).eq(0).sum(1).to(at::kLong).contiguous();   // [B]
    rows = blocks.to(at::kLong).contiguous();
  }
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
    at::Tensor o;
    if (paged) {
      o = at::empty({b, hq * d}, q.options());                         // [B, Hq * D]
      attention_blocks_bf16(q.contiguous(), cache, rows, lens, rows.numel() / (2 * hkv * b), block_size, hq, hkv, d,
                            scale, o);
    } else {
      o = attention_aten(q, cache, ctx_start, ctx_len, blocks, block_mask, block_size, hq, hkv, d, scale);
    }
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
  m.def("has_paged_attention", &cpu_has_avx512bf16,
        "batched bf16 steps with loops read the context in place (this CPU has AVX512-BF16)");
}
