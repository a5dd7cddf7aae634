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
//          in float32, query heads grouped over KV heads (GQA). A task is one sequence's span of
//          positions for every head; while there are fewer sequences than threads a long context is
//          split into spans attended in parallel and merged by their softmax state (flash-decoding).
//          For bf16 with head_dim 64 or 128 the query heads of a KV head walk the span together with
//          their queries or value sums in registers (measured on SmolLM2's shapes, weights and cache
//          read from memory as in a decode step: 1.8x faster at 100 positions, 3.6x at 1000, than
//          one task per KV head with value sums in memory).
//   paged_prefill(q [n, Hq, d], k_cache, v_cache, table [nb], past, scale) -> out [n, Hq, d]
//       causal attention of a prefill chunk: row i (position past + i) attends to the cached positions
//       0 .. past + i of the one block table, this chunk's keys already stored. Each row is a paged_decode
//       query of its own length, so a prompt attends exactly as its tokens would one by one (5.3x faster than
//       torch's scaled_dot_product_attention with GQA at 37 rows, 3.1x at 512, on SmolLM2's heads:
//       benchmarks/fused_ops.py).
#include <torch/extension.h>
#include <ATen/EmptyTensor.h>
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

// An output tensor straight from the CPU allocator. torch::empty goes through the dispatcher (and its
// profiler hooks) first, and a decode step makes a dozen outputs a layer: allocating them here made a 70%-sparse
// SmolLM2 decode step 1.05-1.11x faster (three process pairs alternating, TPOT 4.75-5.32 against 5.15-5.70 ms).
inline torch::Tensor empty_cpu(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  return at::detail::empty_cpu(sizes, options.dtype().toScalarType(), false, c10::nullopt);
}

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

// fn(j, slot) for the context positions j = begin .. end-1 (j counted from begin) and their cache slots
// (block * bs + offset), block by block: no division per position (an integer division per key cost more
// than the key's dot product). at_block(slot) is called when a block is entered with the slot of the next
// block's first position (or -1), so the caller can prefetch it while this one is read.
template <typename Fn, typename AtBlock>
inline void for_each_position(const int64_t* table, int64_t begin, int64_t end, int64_t bs, Fn&& fn,
                              AtBlock&& at_block) {
  for (int64_t b = begin / bs, start = b * bs; start < end; start += bs, ++b) {
    at_block(start + bs < end ? table[b + 1] * bs : -1);
    const int64_t base = table[b] * bs, o0 = std::max<int64_t>(begin - start, 0), o1 = std::min(bs, end - start);
    for (int64_t o = o0; o < o1; ++o) fn(start + o - begin, base + o);
  }
}

// Prefetches bytes [offset, offset + bytes) of the bs cache rows of one block (positions slot .. slot + bs - 1,
// rows of row_bytes): the slice of the KV heads a pass reads.
inline void prefetch_block(const void* cache, int64_t slot, int64_t bs, int64_t row_bytes, int64_t offset,
                           int64_t bytes) {
  if (slot < 0) return;
  const char* p = static_cast<const char*>(cache) + slot * row_bytes + offset;
  for (int64_t r = 0; r < bs; ++r, p += row_bytes)
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

// The dot product of a bf16 query head and key head of d elements (d a multiple of 32) by vdpbf16ps:
// products of bf16 are exact in float32, so only the summation order differs from a widening loop, which
// ended in a 16-term serial reduction per score and made this the slowest part of decode attention.
#if defined(__AVX512BF16__)
inline float dot_bf16(const c10::BFloat16* q, const c10::BFloat16* k, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(static_cast<const void*>(q + i)),
                           (__m512bh)_mm512_loadu_si512(static_cast<const void*>(k + i)));
  return _mm512_reduce_add_ps(acc);
}
#endif

// The scaled scores of every query head against one cached key row (all KV heads: kj [Hk, d]) into
// scores[h * stride + j], running maxima mx[h]. bf16 with d a multiple of 32 takes vdpbf16ps; otherwise
// the float query qf (pre-scaled) and a widening dot product.
template <typename T>
inline void score_row(const T* q, int64_t q_head_stride, const float* qf, const T* kj, int64_t hk, int64_t group,
                      int64_t d, float scale, bool bf16_dots, float* scores, int64_t stride, int64_t j, float* mx) {
  for (int64_t kv = 0, h = 0; kv < hk; ++kv) {
    const T* kh = kj + kv * d;
    for (int64_t g = 0; g < group; ++g, ++h) {
      float dot;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        dot = bf16_dots ? dot_bf16(q + h * q_head_stride, kh, d) * scale : dot_widen(qf + h * d, kh, d);
      } else {
        dot = dot_widen(qf + h * d, kh, d);
      }
#else
      dot = dot_widen(qf + h * d, kh, d);
#endif
      scores[h * stride + j] = dot;
      mx[h] = std::max(mx[h], dot);
    }
  }
}

#if defined(__AVX512F__)
inline __m512 widen16(const c10::BFloat16* v) {  // 16 bf16 -> float: a shift
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 widen16(const float* v) { return _mm512_loadu_ps(v); }
#endif

// acc[g, :] += p[g * p_stride] * v for the g < group query heads sharing one value row v [d]: the row is
// widened once for the whole group (16 lanes at a time where AVX-512 is compiled in and d allows).
template <typename T>
inline void accumulate_value(const T* v, const float* p, int64_t p_stride, int64_t group, int64_t d, float* acc) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {  // double: the scalar loop
    for (; i + 16 <= d; i += 16) {
      const __m512 wide = widen16(v + i);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc + g * d + i;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * p_stride]), wide, _mm512_loadu_ps(a)));
      }
    }
  }
#endif
  for (; i < d; ++i)
    for (int64_t g = 0; g < group; ++g) acc[g * d + i] += p[g * p_stride] * widen(v[i]);
}

// scores [hq, span] -> exp(score - mx[h]) in place, total[h] their sum (the span's unnormalized softmax)
inline void softmax_weights(float* scores, int64_t span, int64_t hq, const float* mx, float* total) {
  for (int64_t h = 0; h < hq; ++h) {
    float* sh = scores + h * span;
    for (int64_t j = 0; j < span; ++j) sh[j] -= mx[h];
    exp_inplace(sh, span, span);
    total[h] = 0.f;
    for (int64_t j = 0; j < span; ++j) total[h] += sh[j];
  }
}

#if defined(__AVX512BF16__)
// The register-resident passes for bf16 with d = 16 * DV (64 or 128): CH query heads of one KV head walk the
// span together, their queries (scores) or value sums (values) held in registers, the KV head's slice of
// each row read once per pass. kChunkVectors bounds the registers: CH * DV <= 16.
using bf16_t = c10::BFloat16;
constexpr int kChunkVectors = 16;

// the sums of the 16 lanes of each of four vectors: [sum(a), sum(b), sum(c), sum(d)]
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0 b0 a1 b1 per 128 bits
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);  // moved as pairs, added as floats
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));  // a b c d per 128 bits
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// scores[c * span + j] = scale * q_c . k_j for heads c < CH (q_c at q + c * q_head_stride), maxima into mx[c]
template <int DV, int CH>
void score_pass(const bf16_t* q, int64_t q_head_stride, const bf16_t* k_cache, const int64_t* table, int64_t begin,
                int64_t end, int64_t bs, int64_t hk, int64_t kv, float scale, float* scores, int64_t span, float* mx) {
  static_assert(CH >= 1 && CH <= 4 && CH * DV <= kChunkVectors && DV % 2 == 0, "chunk too large for the registers");
  constexpr int QV = DV / 2;  // 32-lane bf16 registers per head
  constexpr int64_t d = 16 * DV;
  __m512i qr[CH][QV];
  for (int c = 0; c < CH; ++c)
    for (int u = 0; u < QV; ++u) qr[c][u] = _mm512_loadu_si512(static_cast<const void*>(q + c * q_head_stride + 32 * u));
  __m128 top = _mm_set1_ps(-INFINITY);
  const __m128 scale4 = _mm_set1_ps(scale);
  const int64_t row_bytes = hk * d * 2;
  for_each_position(table, begin, end, bs, [&](int64_t j, int64_t slot) {
    const bf16_t* k = k_cache + (slot * hk + kv) * d;
    __m512i kr[QV];
    for (int u = 0; u < QV; ++u) kr[u] = _mm512_loadu_si512(static_cast<const void*>(k + 32 * u));
    __m512 dot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int c = 0; c < CH; ++c)
      for (int u = 0; u < QV; ++u) dot[c] = _mm512_dpbf16_ps(dot[c], (__m512bh)qr[c][u], (__m512bh)kr[u]);
    const __m128 sums = _mm_mul_ps(reduce4(dot[0], dot[1], dot[2], dot[3]), scale4);
    top = _mm_max_ps(top, sums);
    alignas(16) float lane[4];
    _mm_store_ps(lane, sums);
    for (int c = 0; c < CH; ++c) scores[c * span + j] = lane[c];
  }, [&](int64_t next) { prefetch_block(k_cache, next, bs, row_bytes, kv * d * 2, d * 2); });
  alignas(16) float lane[4];
  _mm_store_ps(lane, top);
  for (int c = 0; c < CH; ++c) mx[c] = lane[c];
}

// acc[c, :] = sum_j p[c * span + j] * v_j for heads c < CH of KV head kv
template <int DV, int CH>
void value_pass(const bf16_t* v_cache, const int64_t* table, int64_t begin, int64_t end, int64_t bs, int64_t hk,
                int64_t kv, const float* p, int64_t span, float* acc) {
  static_assert(CH >= 1 && CH * DV <= kChunkVectors, "chunk too large for the registers");
  constexpr int64_t d = 16 * DV;
  __m512 a[CH][DV];
  for (int c = 0; c < CH; ++c)
    for (int u = 0; u < DV; ++u) a[c][u] = _mm512_setzero_ps();
  const int64_t row_bytes = hk * d * 2;
  for_each_position(table, begin, end, bs, [&](int64_t j, int64_t slot) {
    const bf16_t* v = v_cache + (slot * hk + kv) * d;
    __m512 w[DV];
    for (int u = 0; u < DV; ++u) w[u] = widen16(v + 16 * u);
    for (int c = 0; c < CH; ++c) {
      const __m512 pc = _mm512_set1_ps(p[c * span + j]);
      for (int u = 0; u < DV; ++u) a[c][u] = _mm512_fmadd_ps(pc, w[u], a[c][u]);
    }
  }, [&](int64_t next) { prefetch_block(v_cache, next, bs, row_bytes, kv * d * 2, d * 2); });
  for (int c = 0; c < CH; ++c)
    for (int u = 0; u < DV; ++u) _mm512_storeu_ps(acc + c * d + 16 * u, a[c][u]);
}

using ScorePass = void (*)(const bf16_t*, int64_t, const bf16_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, float, float*, int64_t, float*);
using ValuePass = void (*)(const bf16_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                           int64_t, float*);
// [CH - 1] for d = 64 (DV 4, up to 4 heads a pass) and d = 128 (DV 8, up to 2)
constexpr ScorePass kScore64[4] = {score_pass<4, 1>, score_pass<4, 2>, score_pass<4, 3>, score_pass<4, 4>};
constexpr ValuePass kValue64[4] = {value_pass<4, 1>, value_pass<4, 2>, value_pass<4, 3>, value_pass<4, 4>};
constexpr ScorePass kScore128[2] = {score_pass<8, 1>, score_pass<8, 2>};
constexpr ValuePass kValue128[2] = {value_pass<8, 1>, value_pass<8, 2>};

// The whole span by register-resident passes: true, or false (nothing done) where d is neither 64 nor 128.
inline bool decode_span_passes(const bf16_t* q, int64_t q_head_stride, int64_t hq, int64_t hk, const bf16_t* k_cache,
                               const bf16_t* v_cache, const int64_t* table, int64_t begin, int64_t end, int64_t bs,
                               int64_t d, float scale, float* scores, float* acc, float* mx, float* total) {
  if (d != 64 && d != 128) return false;
  const int64_t group = hq / hk, span = end - begin, most = d == 64 ? 4 : 2;
  const ScorePass* score = d == 64 ? kScore64 : kScore128;
  const ValuePass* value = d == 64 ? kValue64 : kValue128;
  for (int64_t kv = 0; kv < hk; ++kv)
    for (int64_t g = 0; g < group; g += most) {
      const int64_t h = kv * group + g, ch = std::min(most, group - g);
      score[ch - 1](q + h * q_head_stride, q_head_stride, k_cache, table, begin, end, bs, hk, kv, scale,
                    scores + h * span, span, mx + h);
    }
  softmax_weights(scores, span, hq, mx, total);
  for (int64_t kv = 0; kv < hk; ++kv)
    for (int64_t g = 0; g < group; g += most) {
      const int64_t h = kv * group + g, ch = std::min(most, group - g);
      value[ch - 1](v_cache, table, begin, end, bs, hk, kv, scores + h * span, span, acc + h * d);
    }
  return true;
}
#endif

// One task of decode attention: every query head of one sequence over its positions [begin, end). Writes
// the span's softmax state per head h: mx[h] (the largest score), total[h] (sum of exp(score - mx)) and
// acc[h, :] (sum of exp(score - mx) * value, not yet divided). Each position's key and value rows (all
// KV heads, contiguous in the cache) are read once, in order, the next block prefetched.
template <typename T>
void decode_span(const T* q, int64_t q_head_stride, int64_t hq, int64_t hk, const T* k_cache, const T* v_cache,
                 const int64_t* table, int64_t begin, int64_t end, int64_t bs, int64_t d, float scale, float* qf,
                 float* scores, float* acc, float* mx, float* total) {
  const int64_t group = hq / hk, span = end - begin, row_bytes = hk * d * static_cast<int64_t>(sizeof(T));
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (decode_span_passes(q, q_head_stride, hq, hk, k_cache, v_cache, table, begin, end, bs, d, scale, scores, acc,
                           mx, total))
      return;
  }
#endif
  bool bf16_dots = false;
#if defined(__AVX512BF16__)
  bf16_dots = std::is_same_v<T, c10::BFloat16> && d % 32 == 0;
#endif
  if (!bf16_dots)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t i = 0; i < d; ++i) qf[h * d + i] = widen(q[h * q_head_stride + i]) * scale;
  for (int64_t h = 0; h < hq; ++h) mx[h] = -INFINITY;
  for_each_position(table, begin, end, bs, [&](int64_t j, int64_t slot) {
    score_row(q, q_head_stride, qf, k_cache + slot * hk * d, hk, group, d, scale, bf16_dots, scores, span, j, mx);
  }, [&](int64_t next) { prefetch_block(k_cache, next, bs, row_bytes, 0, row_bytes); });
  softmax_weights(scores, span, hq, mx, total);
  std::fill(acc, acc + hq * d, 0.f);
  for_each_position(table, begin, end, bs, [&](int64_t j, int64_t slot) {
    const T* vj = v_cache + slot * hk * d;
    for (int64_t kv = 0; kv < hk; ++kv)
      accumulate_value(vj + kv * d, scores + kv * group * span + j, span, group, d, acc + kv * group * d);
  }, [&](int64_t next) { prefetch_block(v_cache, next, bs, row_bytes, 0, row_bytes); });
}

// Positions per task: a long context is split into spans attended in parallel (and merged by their softmax
// state) once each span has at least kMinSpan positions; shorter work stays on the calling thread, where
// waking a worker would cost more than it saves.
constexpr int64_t kMinSpan = 64;
// Below this many multiply-adds per step (positions x query heads x head dim, for scores and for values)
// the whole call runs on the calling thread.
constexpr int64_t kMinParallelWork = 1 << 16;

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, 2, "x");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(),
              "w must be a contiguous [D] tensor of x's dtype");
  auto y = empty_cpu({x.size(0), x.size(1)}, x.options());
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
  auto y = empty_cpu({h.size(0), h.size(1)}, h.options());
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
  auto y = empty_cpu({gate_up.size(0), inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows(gate_up.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gate_up.size(0), inter, gate_up.stride(0));
  });
  return y;
}

namespace {

// Attention of B single queries q [B, Hq, d]: query b over the first lens[b] positions of its block table,
// tables + b * table_stride (stride 0: every query reads one table, as a prefill chunk's rows do). Tasks are
// (query, span of positions); a query is split into spans only while there are fewer queries than threads.
// Thread i runs tasks i, i + threads, ...: rows of a prefill chunk attend to 1, 2, ... n positions, and a
// contiguous split would give the last thread most of the work.
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const int64_t* tables, int64_t table_stride, const int64_t* lp, double scale) {
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), hk = k_cache.size(2);
  int64_t positions = 0;
  for (int64_t b = 0; b < batch; ++b) positions += lp[b];
  const int64_t threads = at::get_num_threads();
  const int64_t want = batch >= threads ? 1 : (threads + batch - 1) / batch;
  std::vector<int64_t> task_seq, task_begin, task_end;
  int64_t longest_span = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t spans = std::max<int64_t>(1, std::min(want, lp[b] / kMinSpan));
    for (int64_t s = 0; s < spans; ++s) {
      task_seq.push_back(b);
      task_begin.push_back(lp[b] * s / spans);
      task_end.push_back(lp[b] * (s + 1) / spans);
      longest_span = std::max(longest_span, task_end.back() - task_begin.back());
    }
  }
  const auto n_tasks = static_cast<int64_t>(task_seq.size());
  // per task: the span's softmax state (mx, total [Hq]) and unnormalized sums acc [Hq, d]
  std::vector<float> mx(n_tasks * hq), total(n_tasks * hq), acc(n_tasks * hq * d);
  auto out = empty_cpu({batch, hq, d}, q.options());
  const int64_t workers = positions * hq * d < kMinParallelWork ? 1 : std::min(threads, n_tasks);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto run = [&](int64_t first, int64_t step) {
      std::vector<float> qf(hq * d), scores(hq * longest_span);
      for (int64_t t = first; t < n_tasks; t += step) {
        const int64_t b = task_seq[t];
        decode_span(qp + b * q.stride(0), q.stride(1), hq, hk, kp, vp, tables + b * table_stride, task_begin[t],
                    task_end[t], bs, d, static_cast<float>(scale), qf.data(), scores.data(), acc.data() + t * hq * d,
                    mx.data() + t * hq, total.data() + t * hq);
      }
    };
    if (workers == 1) {
      run(0, 1);  // on the calling thread: waking a worker would cost more than it saves
    } else {
      at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) run(w, workers);
      });
    }
    // merge each sequence's spans: out = sum_s w_s acc_s / sum_s w_s total_s, w_s = exp(mx_s - max_s mx_s)
    // (one span: w = exp(0) = 1, exactly the single-pass result)
    std::vector<float> merged(d);
    for (int64_t t0 = 0; t0 < n_tasks;) {
      int64_t t1 = t0;
      while (t1 < n_tasks && task_seq[t1] == task_seq[t0]) ++t1;
      scalar_t* ob = op + task_seq[t0] * hq * d;
      for (int64_t h = 0; h < hq; ++h) {
        float top = -INFINITY, sum = 0.f;
        for (int64_t t = t0; t < t1; ++t) top = std::max(top, mx[t * hq + h]);
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int64_t t = t0; t < t1; ++t) {
          const float w = std::exp(mx[t * hq + h] - top);
          sum += w * total[t * hq + h];
          const float* a = acc.data() + (t * hq + h) * d;
          for (int64_t i = 0; i < d; ++i) merged[i] += w * a[i];
        }
        for (int64_t i = 0; i < d; ++i) ob[h * d + i] = static_cast<scalar_t>(merged[i] / sum);
      }
      t0 = t1;
    }
  });
  return out;
}

void check_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  check_rows(q, 3, "q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must be contiguous [NB, bs, Hk, d]");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "q heads must be a multiple of the cache's KV heads, same d");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share one dtype");
}

}  // namespace

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& tables, const torch::Tensor& lens, double scale) {
  check_attention(q, k_cache, v_cache);
  TORCH_CHECK(tables.is_contiguous() && tables.dim() == 2 && tables.scalar_type() == at::kLong &&
              tables.size(0) == q.size(0), "tables must be a contiguous int64 [B, blocks]");
  TORCH_CHECK(lens.is_contiguous() && lens.dim() == 1 && lens.scalar_type() == at::kLong && lens.size(0) == q.size(0),
              "lens must be a contiguous int64 [B]");
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= tables.size(1) * k_cache.size(1), "lens[", b, "] = ", lp[b],
                " is outside the block table");
  return attend(q, k_cache, v_cache, tables.data_ptr<int64_t>(), tables.size(1), lp, scale);
}

torch::Tensor paged_prefill(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& table, int64_t past, double scale) {
  check_attention(q, k_cache, v_cache);
  TORCH_CHECK(table.is_contiguous() && table.dim() == 1 && table.scalar_type() == at::kLong,
              "table must be a contiguous int64 [blocks]");
  const int64_t n = q.size(0);
  TORCH_CHECK(past >= 0 && past + n <= table.size(0) * k_cache.size(1), "positions ", past, " to ", past + n,
              " are outside the block table (", table.size(0) * k_cache.size(1), " positions)");
  std::vector<int64_t> lens(n);
  for (int64_t i = 0; i < n; ++i) lens[i] = past + i + 1;  // row i sees the cache up to its own position
  return attend(q, k_cache, v_cache, table.data_ptr<int64_t>(), 0, lens.data(), scale);
}

#ifndef SPARSE_SERVE_NO_MODULE  // decoder.cpp links this file's functions into its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of rows with transformers' rounding");
  m.def("add_rms_norm_", &add_rms_norm_, "h += delta, then RMSNorm of h");
  m.def("rotary_", &rotary_, "rotary position embedding of q and k in place (rotate-half)");
  m.def("rotary_cache_", &rotary_cache_, "rotary_ on q and k, then k and v stored in their cache slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up output");
  m.def("paged_decode", &paged_decode, "single-query attention over a paged KV cache");
  m.def("paged_prefill", &paged_prefill, "causal attention of a prefill chunk's rows over a paged KV cache");
}
#endif
