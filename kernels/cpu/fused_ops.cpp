// Fused elementwise ops of a LLaMA decoder layer on CPU: one call where the eager forward makes 5-15.
//
// At batch 1 a decode step of a 135M model spends as long dispatching ~40 small torch ops per layer
// as it spends in the linears; these kernels do the same arithmetic in one pass each. Numerics are
// those of the transformers modules, rounding where they round: in bf16, RMSNorm normalizes in
// float32, rounds, then multiplies by the weight and rounds again; the residual add, SiLU, the gate
// product and each rotary term round to bf16 like the separate torch ops do. In float32 nothing
// rounds. Every op takes the last dimension contiguous; rows may be strided (views of a fused
// q/k/v output).
//
//   rms_norm(x [T, D], w [D], eps)              -> y [T, D]
//   add_rms_norm_(h [T, D], delta [T, D], w, eps) -> y [T, D]; h += delta in place first
//   rotary_(q [T, Hq, d], k [T, Hk, d], cos [T, d], sin [T, d])   in place, rotate-half convention
//   rotary_cache_(q, k, v [T, Hk, d], cos, sin, k_cache, v_cache [NB, bs, Hk, d], slots [T])
//       rotary_ on q and k, then k and v copied to the cache rows slots[t] (= block * bs + offset)
//   silu_mul(gu [T, 2I])                         -> y [T, I] = silu(gu[:, :I]) * gu[:, I:]
//   paged_decode(q [B, Hq, d], k_cache, v_cache [NB, bs, Hk, d], tables [B, nb], lens [B], scale)
//       -> out [B, Hq, d]: one query per sequence attending to its first lens[b] cached positions,
//          read in place through the block table (no gather); scores, softmax and the weighted sum
//          in float32, query heads grouped over KV heads (GQA)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>  // torch's own vector exp (libtorch_cpu exports it): the SiLU rounds exactly like F.silu
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Rounds a float to the storage type (identity for float).
template <typename T>
inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }

constexpr int64_t kGrainRows = 16;  // rows per parallel task (decode steps stay on one thread)

void check_rows(const torch::Tensor& t, int64_t dims, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dimension");
}

template <typename T>
void rms_row(const T* x, const T* w, T* y, int64_t d, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < d; ++i) {
    float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  float r = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i)
    y[i] = static_cast<T>(static_cast<float>(w[i]) * rnd<T>(static_cast<float>(x[i]) * r));
}

template <typename T>
void add_rms_rows(T* h, const T* delta, const T* w, T* y, int64_t rows, int64_t d, int64_t h_stride,
                  int64_t delta_stride, float eps) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* hr = h + t * h_stride;
      const T* dr = delta + t * delta_stride;
      for (int64_t i = 0; i < d; ++i) hr[i] = static_cast<T>(static_cast<float>(hr[i]) + static_cast<float>(dr[i]));
      rms_row(hr, w, y + t * d, d, eps);
    }
  });
}

template <typename T>
void rotary_heads(T* base, int64_t rows, int64_t heads, int64_t row_stride, int64_t head_stride, const T* cos,
                  const T* sin, int64_t cs_stride, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t t = 0; t < rows; ++t) {
    const T* c = cos + t * cs_stride;
    const T* s = sin + t * cs_stride;
    for (int64_t hh = 0; hh < heads; ++hh) {
      T* v = base + t * row_stride + hh * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        float a = static_cast<float>(v[i]), b = static_cast<float>(v[i + half]);
        // out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product rounds like torch
        float lo = rnd<T>(a * static_cast<float>(c[i])) + rnd<T>(-b * static_cast<float>(s[i]));
        float hi = rnd<T>(b * static_cast<float>(c[i + half])) + rnd<T>(a * static_cast<float>(s[i + half]));
        v[i] = static_cast<T>(lo);
        v[i + half] = static_cast<T>(hi);
      }
    }
  }
}

// exp in place of v[0, n): torch's vectorized exp (Sleef, 1 ulp; libtorch_cpu exports it) on 16-lane chunks
// of v[0, vec_end) where AVX-512 is compiled in, std::exp on the rest. vec_end = n vectorizes all it can;
// the SiLU passes the split torch's own elementwise loop makes (32-element steps, scalar tail), so it
// rounds exactly like F.silu.
constexpr int64_t kExpLanes = 16;
inline void exp_inplace(float* v, int64_t n, int64_t vec_end) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + kExpLanes <= std::min(n, vec_end); i += kExpLanes)
    _mm512_storeu_ps(v + i, Sleef_expf16_u10(_mm512_loadu_ps(v + i)));
#endif
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

constexpr int64_t kSiluBlock = 256;  // gate values per exp call (a multiple of torch's 32-element step)

template <typename T>
void silu_mul_rows(const T* gu, T* y, int64_t rows, int64_t inter, int64_t gu_stride) {
  const int64_t torch_vec_end = inter / 32 * 32;
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    float x[kSiluBlock], e[kSiluBlock];
    for (int64_t t = begin; t < end; ++t) {
      const T* g = gu + t * gu_stride;
      const T* u = g + inter;
      T* out = y + t * inter;
      for (int64_t i0 = 0; i0 < inter; i0 += kSiluBlock) {
        const int64_t n = std::min(kSiluBlock, inter - i0);
        for (int64_t i = 0; i < n; ++i) e[i] = -(x[i] = static_cast<float>(g[i0 + i]));
        exp_inplace(e, n, torch_vec_end - i0);
        for (int64_t i = 0; i < n; ++i)
          out[i0 + i] = static_cast<T>(rnd<T>(x[i] / (1.f + e[i])) * static_cast<float>(u[i0 + i]));
      }
    }
  });
}

// Widens a stored value to float: bf16 is the upper half of a float32 (a shift, which vectorizes).
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// sum(a[i] * b[i]) in float with kLanes independent partial sums, so the compiler vectorizes it (a
// single running sum is a reduction it may not reorder).
constexpr int64_t kLanes = 16;
template <typename T>
inline float dot_widen(const float* a, const T* b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[i + l] * widen(b[i + l]);
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * widen(b[i]);
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

constexpr int64_t kMaxGroup = 16;  // query heads per KV head handled in one pass over the keys

// fn(j, slot) for the context positions j = 0 .. ctx-1 and their cache slots (block * bs + offset), block
// by block: no division per position (an integer division per key cost more than the key's dot product)
template <typename Fn>
inline void for_each_position(const int64_t* table, int64_t ctx, int64_t bs, Fn&& fn) {
  for (int64_t start = 0, b = 0; start < ctx; start += bs, ++b) {
    const int64_t base = table[b] * bs, n = std::min(bs, ctx - start);
    for (int64_t o = 0; o < n; ++o) fn(start + o, base + o);
  }
}

// Scaled scores q . k_j for the group's heads (scores [group, ctx], running maxima mx) with vdpbf16ps
// straight on the bf16 query and keys: products of bf16 are exact in float32, so only the summation
// order differs from the widening loop, which ended in a 16-term serial reduction per score and made
// this the slowest part of decode attention. False (nothing written) where it does not apply: another
// dtype, d not a multiple of 32, or a build without AVX512-BF16.
template <typename T>
inline bool bf16_scores(const T* q, int64_t q_head_stride, int64_t group, const T* k_cache, const int64_t* table,
                        int64_t ctx, int64_t bs, int64_t kv_heads, int64_t kv_head, int64_t d, float scale,
                        float* scores, float* mx) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (d % 32 != 0) return false;
    for_each_position(table, ctx, bs, [&](int64_t j, int64_t slot) {
      const T* kj = k_cache + (slot * kv_heads + kv_head) * d;
      for (int64_t g = 0; g < group; ++g) {
        const T* qg = q + g * q_head_stride;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 32)
          acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(static_cast<const void*>(qg + i)),
                                 (__m512bh)_mm512_loadu_si512(static_cast<const void*>(kj + i)));
        const float dot = _mm512_reduce_add_ps(acc) * scale;
        scores[g * ctx + j] = dot;
        mx[g] = std::max(mx[g], dot);
      }
    });
    return true;
  }
#endif
  return false;
}

// One (sequence, KV head) pair: the group's query heads attend over ctx cached positions, each key
// and value row read once for the whole group. qf: [group, d] float scratch, scores: [group, ctx],
// acc: [group, d].
template <typename T>
void decode_group(const T* q, int64_t q_head_stride, int64_t group, const T* k_cache, const T* v_cache,
                  const int64_t* table, int64_t ctx, int64_t bs, int64_t kv_heads, int64_t kv_head, int64_t d,
                  float scale, float* qf, float* scores, float* acc, T* out, int64_t out_head_stride) {
  float mx[kMaxGroup], total[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) mx[g] = -INFINITY, total[g] = 0.f;
  if (!bf16_scores(q, q_head_stride, group, k_cache, table, ctx, bs, kv_heads, kv_head, d, scale, scores, mx)) {
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < d; ++i) qf[g * d + i] = widen(q[g * q_head_stride + i]) * scale;
    for_each_position(table, ctx, bs, [&](int64_t j, int64_t slot) {
      const T* kj = k_cache + (slot * kv_heads + kv_head) * d;
      for (int64_t g = 0; g < group; ++g) {
        const float dot = dot_widen(qf + g * d, kj, d);
        scores[g * ctx + j] = dot;
        mx[g] = std::max(mx[g], dot);
      }
    });
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * ctx;
    for (int64_t j = 0; j < ctx; ++j) sg[j] -= mx[g];
    exp_inplace(sg, ctx, ctx);
    for (int64_t j = 0; j < ctx; ++j) total[g] += sg[j];
  }
  std::fill(acc, acc + group * d, 0.f);
  for_each_position(table, ctx, bs, [&](int64_t j, int64_t slot) {
    const T* vj = v_cache + (slot * kv_heads + kv_head) * d;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * ctx + j];
      float* ag = acc + g * d;
      for (int64_t i = 0; i < d; ++i) ag[i] += p * widen(vj[i]);
    }
  });
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < d; ++i) out[g * out_head_stride + i] = static_cast<T>(acc[g * d + i] / total[g]);
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, 2, "x");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(),
              "w must be a contiguous [D] tensor of x's dtype");
  auto y = torch::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t d = x.size(1), stride = x.stride(0);
    at::parallel_for(0, x.size(0), kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rms_row(xp + t * stride, w.data_ptr<scalar_t>(), yp + t * d, d, eps);
    });
  });
  return y;
}

torch::Tensor add_rms_norm_(torch::Tensor& h, const torch::Tensor& delta, const torch::Tensor& w, double eps) {
  check_rows(h, 2, "h");
  check_rows(delta, 2, "delta");
  TORCH_CHECK(h.sizes() == delta.sizes() && h.scalar_type() == delta.scalar_type(),
              "h and delta must have the same shape and dtype");
  TORCH_CHECK(w.is_contiguous() && w.numel() == h.size(1) && w.scalar_type() == h.scalar_type(),
              "w must be a contiguous [D] tensor of h's dtype");
  auto y = torch::empty({h.size(0), h.size(1)}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "add_rms_norm_", [&] {
    add_rms_rows(h.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                 y.data_ptr<scalar_t>(), h.size(0), h.size(1), h.stride(0), delta.stride(0), eps);
  });
  return y;
}

void rotary_(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin) {
  check_rows(q, 3, "q");
  check_rows(k, 3, "k");
  check_rows(cos, 2, "cos");
  check_rows(sin, 2, "sin");
  const int64_t rows = q.size(0), d = q.size(2);
  TORCH_CHECK(k.size(0) == rows && k.size(2) == d && d % 2 == 0, "q and k must be [T, H, d] with the same T, even d");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == rows && cos.size(1) == d && cos.stride(0) == sin.stride(0),
              "cos and sin must be [T, d]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == q.scalar_type() &&
              sin.scalar_type() == q.scalar_type(), "q, k, cos and sin must share one dtype");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "rotary_", [&] {
    const scalar_t* c = cos.data_ptr<scalar_t>();
    const scalar_t* s = sin.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
      int64_t n = end - begin;
      rotary_heads(q.data_ptr<scalar_t>() + begin * q.stride(0), n, q.size(1), q.stride(0), q.stride(1),
                   c + begin * cos.stride(0), s + begin * cos.stride(0), cos.stride(0), d);
      rotary_heads(k.data_ptr<scalar_t>() + begin * k.stride(0), n, k.size(1), k.stride(0), k.stride(1),
                   c + begin * cos.stride(0), s + begin * cos.stride(0), cos.stride(0), d);
    });
  });
}

// rotary_, then this step's keys and values stored in their cache slots (cache [NB, bs, Hk, d], slots [T]
// flat indices block * bs + offset): the attention prologue of a layer in one call.
void rotary_cache_(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                   const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots) {
  // everything is checked before q and k are touched, so a bad call changes nothing
  check_rows(k, 3, "k");
  check_rows(v, 3, "v");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(), "k_cache and v_cache must be contiguous [num_blocks, block_size, Hk, d]");
  const int64_t rows = k.size(0), heads = k.size(1), d = k.size(2);
  TORCH_CHECK(v.size(0) == rows && v.size(1) == heads && v.size(2) == d && k_cache.size(2) == heads &&
                  k_cache.size(3) == d, "k, v must be [T, Hk, d] with the cache's Hk and d");
  TORCH_CHECK(k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k.scalar_type() &&
                  v.scalar_type() == k.scalar_type(), "k, v and the caches must share one dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == rows && slots.scalar_type() == torch::kInt64,
              "slots must be int64 [T]");
  const torch::Tensor slots_c = slots.contiguous();
  const int64_t* slot = slots_c.data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < rows; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot ", slot[t], " is outside the cache (", capacity, " slots)");
  rotary_(q, k, cos, sin);
  const int64_t es = k.element_size(), row_bytes = d * es;
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t dst = (slot[t] * heads + h) * row_bytes;
      std::memcpy(kc + dst, kp + (t * k.stride(0) + h * k.stride(1)) * es, row_bytes);
      std::memcpy(vc + dst, vp + (t * v.stride(0) + h * v.stride(1)) * es, row_bytes);
    }
  }
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, 2, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must be [T, 2I]");
  const int64_t inter = gate_up.size(1) / 2;
  auto y = torch::empty({gate_up.size(0), inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows(gate_up.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gate_up.size(0), inter, gate_up.stride(0));
  });
  return y;
}

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& tables, const torch::Tensor& lens, double scale) {
  check_rows(q, 3, "q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must be contiguous [NB, bs, Hk, d]");
  TORCH_CHECK(tables.is_contiguous() && tables.dim() == 2 && tables.scalar_type() == at::kLong &&
              tables.size(0) == q.size(0), "tables must be a contiguous int64 [B, blocks]");
  TORCH_CHECK(lens.is_contiguous() && lens.dim() == 1 && lens.scalar_type() == at::kLong && lens.size(0) == q.size(0),
              "lens must be a contiguous int64 [B]");
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), hk = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && hq % hk == 0, "q heads must be a multiple of the cache's KV heads, same d");
  TORCH_CHECK(hq / hk <= kMaxGroup, "at most ", kMaxGroup, " query heads per KV head, got ", hq / hk);
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share one dtype");
  const int64_t* lp = lens.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= tables.size(1) * bs, "lens[", b, "] = ", lp[b], " is outside the block table");
    longest = std::max(longest, lp[b]);
  }
  auto out = torch::empty({batch, hq, d}, q.options());
  const int64_t group = hq / hk;
  // keep small decode steps on one thread: a task is one (sequence, KV head) pair
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, longest * d * group));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* tp = tables.data_ptr<int64_t>();
    at::parallel_for(0, batch * hk, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(group * d), scores(group * longest), acc(group * d);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / hk, kv = task % hk;
        decode_group(qp + b * q.stride(0) + kv * group * q.stride(1), q.stride(1), group, kp, vp,
                     tp + b * tables.size(1), lp[b], bs, hk, kv, d, static_cast<float>(scale), qf.data(),
                     scores.data(), acc.data(), op + (b * hq + kv * group) * d, d);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of rows with transformers' rounding");
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta, then RMSNorm of h");
  m.def("rotary_", &rotary_, "rotary position embedding of q and k in place (rotate-half)");
  m.def("rotary_cache_", &rotary_cache_, "rotary_ on q and k, then k and v stored in their cache slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up output");
  m.def("paged_decode", &paged_decode, "single-query attention over a paged KV cache");
}
