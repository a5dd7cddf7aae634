// AVX-512 kernels for y = x W^T + b with W in the packed bitmask layout (see kernels/cpu/__init__.py).
//
// Layout (built once by pack() in Python):
//   masks        uint32 [N, KC]    bit j of word c of row n is set iff W[n, 32c + j] != 0 (KC = ceil(K/32))
//   values       bf16   [nnz + 32] the nonzeros in row-major order, padded so a 64-byte load at any
//                                  nonzero stays inside the buffer
//   row_offsets  int64  [N]        index in values where row n starts
//
// Decode (few activation rows): each 32-column chunk of a weight row is one 64-byte load of packed
// values, expanded in a register by the chunk's mask (vpexpandw, AVX512-VBMI2), then multiplied with
// every activation row by vdpbf16ps (AVX512-BF16, float32 accumulation). Three loops do this, and the
// caller names one per pass size (Loop; measured per machine): several weight rows in flight sharing
// each activation load (gemv_rows); one weight row at a time, so the compressed weight is one sequential
// stream, while the activations fit in L1 (stream_rows); and, for weights sparse enough that a 64-column
// window rarely holds more than 32 nonzeros, the windowed loop: the window's mask compressed to column
// indices, the activations permuted to the packed values (window_rows; one vpcompressb per 64 columns
// instead of two vpexpandw). Sums are rounded to bf16 (bias added) in the same parallel task, so a call
// is one pass.
// A few dozen activation rows: panels (bitmask_gemm_panels), a register-blocked GEMM on chunks expanded
// into a small buffer (see panel_rows); for very sparse weights the pair gather (bitmask_gemm_pairs), which
// multiplies only the column pairs holding a nonzero, 16 activation rows per vdpbf16ps (see pair_rows).
// Decompress: the same expand, stored to a dense [rows, K] bf16 tile (the prefill path runs a dense
// GEMM on such tiles).
#include <torch/extension.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// An output tensor straight from the CPU allocator. torch::empty goes through the dispatcher (and its
// profiler hooks) first, and a decode step makes a dozen outputs a layer: allocating them here made a 70%-sparse
// SmolLM2 decode step 1.05-1.11x faster (three process pairs alternating, TPOT 4.75-5.32 against 5.15-5.70 ms).
inline torch::Tensor empty_cpu(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  return at::detail::empty_cpu(sizes, options.dtype().toScalarType(), false, c10::nullopt);
}

using bf16 = uint16_t;
constexpr int64_t kChunk = 32;  // bf16 lanes of one 512-bit register
constexpr int64_t kPrefetchBytes = 512;  // how far ahead each row's value stream is prefetched
// How far ahead the single-stream decode loops (streaming, windowed) prefetch: one sequential stream from
// memory (weights in 2 MiB pages, see kernels/hugepages.py) gains from a farther target. Measured on
// SmolLM2's decoder linears at batch 1, two threads: 4 KiB ahead ran 1.06-1.09x (windowed loop) and
// 1.11x (streaming) over 1 KiB and 512 bytes, 8-16 KiB no better.
constexpr int64_t kStreamPrefetchBytes = 4096;

// A register of zeros the compiler cannot see through. Zen 4 gives the zero-masking forms of vpexpandw,
// vpcompressb and vpcompressd a dependency on the old value of their destination register, so a loop
// whose expands all land in one register runs them one after another: a lone weight row decoded at 4.7
// TSC ticks per 32-column chunk, two rows interleaved at 2.6 (kernel alone, in cache). Merging into a
// register zeroed by a dependency-breaking idiom instead takes the chain away: the lone row at 2.9, and
// SmolLM2's 120 decoder linears (70% sparse, batch 1, two threads, from memory) 1.22x faster in the
// streaming loop and 1.36x in the windowed one. (A plain zero would be folded back into the {z} form.)
inline __m512i fresh_zero() {
  __m512i z;
  asm("vpxord %0, %0, %0" : "=v"(z));
  return z;
}

// Loops that keep several weight rows in flight (rows in flight, the panels) read each row's mask words as a
// stream of its own, too many streams for the hardware prefetchers: once per 64-byte line of masks (16 chunks)
// the next line is prefetched.
inline void prefetch_next_masks(const uint32_t* mrow, int64_t c) {
  if (c % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(mrow + c) + 64, _MM_HINT_T0);
}

inline __m512i expand_chunk(const bf16* ptr, uint32_t mask) {
  return _mm512_mask_expand_epi16(fresh_zero(), mask, _mm512_loadu_si512(static_cast<const void*>(ptr)));
}

// The first min(count, 16) of 16 lanes (count >= 0).
inline __mmask16 lanes16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

// Lane j of the result: the sum of the 16 lanes of v[j]. Sixteen weight rows reduced at once take 45 vector ops,
// under 3 a row, where one _mm512_reduce_add_ps takes 9 on its own latency chain. The windowed loop takes its row
// sums this way (RowSums): at one activation row and 576 columns (9 windows a row) the reduction was a tenth of a
// call, and SmolLM2's 70%-sparse linears ran 1.02-1.09x faster at 1-4 rows with their weights in cache (same
// process, two builds alternating; 1.00-1.03x for a whole decode step, within noise). The streaming and dense
// GEMV loops measured 0.93-1.03x with it and keep _mm512_reduce_add_ps.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: rows 2i and 2i + 1, two partial sums each
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: rows 4i .. 4i + 3, one partial sum each
    const __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
    s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: rows 8i .. 8i + 3 twice, then 8i + 4 .. 8i + 7 twice
    s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88), _mm512_shuffle_f32x4(s3[0], s3[1], 0xdd));
}

// The sums of consecutive weight rows for MB activation rows: each finished row leaves its accumulators here
// (one register per activation row), and every 16 rows (and at flush) sum_lanes16 writes out[m * n_out + n] for
// all of them with one store per activation row.
template <int MB>
class RowSums {
 public:
  RowSums(float* out, int64_t n_out) : out_(out), n_out_(n_out) {}
  ~RowSums() { flush(); }

  void add(int64_t n, const __m512* acc) {
    if (count_ == 0) first_ = n;
    for (int m = 0; m < MB; ++m) pending_[m][count_] = acc[m];
    if (++count_ == 16) flush();
  }

  void flush() {
    if (count_ == 0) return;
    for (int m = 0; m < MB; ++m) {
      for (int j = count_; j < 16; ++j) pending_[m][j] = _mm512_setzero_ps();
      _mm512_mask_storeu_ps(out_ + m * n_out_ + first_, lanes16(count_), sum_lanes16(pending_[m]));
    }
    count_ = 0;
  }

 private:
  __m512 pending_[MB][16];
  float* out_;
  int64_t n_out_;
  int64_t first_ = 0;
  int count_ = 0;
};

// The next block of weight rows (their masks and values), prefetched into L2 a few lines per chunk of the
// current block: consecutive rows are consecutive in both arrays, so the next block is two contiguous ranges.
// Loops that keep several rows in flight start all of a block's streams at once, and a per-row prefetch a
// fixed distance ahead leaves each stream's first lines to wait on memory. The panels use it (see
// kPanelAheadMaxGroups) and so do rows in flight: same-process A/B of two builds, weights from memory, two
// threads, 50% and 70%: 1.13-1.34x at 4-8 activation rows on 4096x4096 and 11008x4096 (4 rows, 70%: 756 ->
// 598 us, oneDNN 1047), 0.96-1.14x on 4096x11008, 0.96-1.08x on SmolLM2's shapes and 2048x2048 (noise there).
class NextRowsAhead {
 public:
  // rows [begin, end) of the packed weight (empty: nothing to fetch)
  NextRowsAhead(const uint32_t* masks, const bf16* values, const int64_t* row_offsets, int64_t kc, int64_t begin,
                int64_t end) {
    if (begin >= end) return;
    masks_ = reinterpret_cast<const char*>(masks + begin * kc);
    masks_end_ = reinterpret_cast<const char*>(masks + end * kc);
    values_ = reinterpret_cast<const char*>(values + row_offsets[begin]);
    // the last row's length is not known here; its bound is K values (a prefetch past the buffer does not fault)
    values_end_ = reinterpret_cast<const char*>(values + row_offsets[end - 1] + kc * kChunk);
    per_chunk_ = ((masks_end_ - masks_) + (values_end_ - values_)) / (64 * kc) + 1;
  }

  void step() {  // once per chunk of the current rows
    for (int64_t i = 0; i < per_chunk_; ++i) {
      if (masks_ < masks_end_) {
        _mm_prefetch(masks_, _MM_HINT_T1);
        masks_ += 64;
      } else if (values_ < values_end_) {
        _mm_prefetch(values_, _MM_HINT_T1);
        values_ += 64;
      } else {
        return;
      }
    }
  }

 private:
  const char* masks_ = nullptr;
  const char* masks_end_ = nullptr;
  const char* values_ = nullptr;
  const char* values_end_ = nullptr;
  int64_t per_chunk_ = 0;
};

// Adds to out[m * n_out + n] the products over chunks [c0, c1) for weight rows n0 .. n0+R-1 and
// activation rows 0 .. MB-1; cursor[r] is where row n0+r's next chunk starts in values (advanced).
template <int R, int MB>
inline void rows_block(const uint32_t* masks, const bf16* values, int64_t* cursor, const bf16* x,
                       int64_t x_stride, int64_t kc, int64_t c0, int64_t c1, int64_t n0, float* out,
                       int64_t n_out, NextRowsAhead* ahead = nullptr) {
  __m512 acc[R][MB];
  const bf16* ptr[R];
  const uint32_t* mrow[R];
  for (int r = 0; r < R; ++r) {
    ptr[r] = values + cursor[r];
    mrow[r] = masks + (n0 + r) * kc;
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t c = c0; c < c1; ++c) {
    if (ahead != nullptr) ahead->step();
    __m512i w[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint32_t mask = mrow[r][c];
      // at 4-12 rows, two threads, 50% and 70%, 4096-11008 columns: 1.00-1.09x (same-process A/B)
      prefetch_next_masks(mrow[r], c);
      _mm_prefetch(reinterpret_cast<const char*>(ptr[r]) + kPrefetchBytes, _MM_HINT_T0);
      w[r] = expand_chunk(ptr[r], mask);
      ptr[r] += _mm_popcnt_u32(mask);
    }
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(static_cast<const void*>(x + m * x_stride + c * kChunk));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w[r], (__m512bh)xv);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    cursor[r] = ptr[r] - values;
    for (int m = 0; m < MB; ++m) out[m * n_out + n0 + r] += _mm512_reduce_add_ps(acc[r][m]);
  }
}

// Weight rows in flight per activation-block size: R * MB accumulators stay in registers (<= 16 of 32),
// and more independent popcount -> pointer chains hide the load latency at small MB.
// In cache the loop is bound by Zen 4's two FMA pipes, which vpexpandw (1.5 cycles), kmovd (0.5) and
// vdpbf16ps (1) all use: 4 activation rows take 6.5 cycles a weight-row chunk against 6.0 for those
// instructions alone (one thread, 256x4096 at 70%). A windowed variant (vpcompressb of the column numbers,
// activations permuted, one vdpbf16ps per 64 columns at 70%) measured no better: its kmovq, vpcompressb and
// vpermt2w take the FMA pipes too (4 rows: 6.7-7.6 cycles a chunk).
template <int MB>
constexpr int rows_in_flight() {
  return MB <= 4 ? 4 : 2;
}

// Several weight rows in flight, each activation chunk loaded once for all of them: for activations too
// large to stay in L1 (see kStreamMaxActBytes).
template <int MB>
void gemv_rows(const uint32_t* masks, const bf16* values, const int64_t* row_offsets, const bf16* x,
               int64_t x_stride, int64_t kc, int64_t begin, int64_t end, float* out, int64_t n_out) {
  // Measured on Zen 4: blocking K so the activations stay in L1 costs more (a horizontal reduction
  // and a scattered store per block) than it saves, and more than 4 rows in flight is slower too.
  constexpr int R = rows_in_flight<MB>();
  std::vector<int64_t> cursor(row_offsets + begin, row_offsets + end);
  for (int64_t m = 0; m < MB; ++m) std::fill(out + m * n_out + begin, out + m * n_out + end, 0.0f);
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    NextRowsAhead ahead(masks, values, row_offsets, kc, n + R, std::min(end, n + 2 * R));
    rows_block<R, MB>(masks, values, cursor.data() + (n - begin), x, x_stride, kc, 0, kc, n, out, n_out, &ahead);
  }
  for (; n < end; ++n) {
    rows_block<1, MB>(masks, values, cursor.data() + (n - begin), x, x_stride, kc, 0, kc, n, out, n_out);
  }
}

// One weight row at a time, so the packed values and masks are read as one sequential stream that the
// hardware prefetcher follows (several rows in flight are several short streams, which it does not:
// this loop is 1.2-1.8x faster while the activations stay in L1). U accumulators per activation row
// rotate over the chunks so the vdpbf16ps latency chain does not bound a lone row.
template <int MB>
void stream_rows(const uint32_t* masks, const bf16* values, const int64_t* row_offsets, const bf16* x,
                 int64_t x_stride, int64_t kc, int64_t begin, int64_t end, float* out, int64_t n_out) {
  constexpr int U = MB == 1 ? 2 : 1;
  for (int64_t n = begin; n < end; ++n) {
    const bf16* ptr = values + row_offsets[n];
    const uint32_t* mrow = masks + n * kc;
    __m512 acc[U][MB];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MB; ++m) acc[u][m] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + U <= kc; c += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const uint32_t mask = mrow[c + u];
        _mm_prefetch(reinterpret_cast<const char*>(ptr) + kStreamPrefetchBytes, _MM_HINT_T0);
        const __m512i w = expand_chunk(ptr, mask);
        ptr += _mm_popcnt_u32(mask);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          const __m512i xv = _mm512_loadu_si512(static_cast<const void*>(x + m * x_stride + (c + u) * kChunk));
          acc[u][m] = _mm512_dpbf16_ps(acc[u][m], (__m512bh)w, (__m512bh)xv);
        }
      }
    }
    for (; c < kc; ++c) {  // at most U - 1 chunks
      const __m512i w = expand_chunk(ptr, mrow[c]);
      ptr += _mm_popcnt_u32(mrow[c]);
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(static_cast<const void*>(x + m * x_stride + c * kChunk));
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], (__m512bh)w, (__m512bh)xv);
      }
    }
    for (int m = 0; m < MB; ++m) {
      for (int u = 1; u < U; ++u) acc[0][m] = _mm512_add_ps(acc[0][m], acc[u][m]);
      out[m * n_out + n] = _mm512_reduce_add_ps(acc[0][m]);
    }
  }
}

// The dense GEMV's loop: one weight row at a time, chunk(n, c, mask) giving chunk c of weight row n (the lanes
// outside mask zero: the last chunk when K is not a multiple of 32), U chains of accumulators at one row.
template <int MB, typename Chunk>
void chunk_rows(const Chunk& chunk, int64_t k, const bf16* x, int64_t x_stride, int64_t begin, int64_t end,
                float* out, int64_t n_out) {
  constexpr int U = MB == 1 ? 2 : 1;
  const int64_t full = k / kChunk;
  const int64_t tail = k - full * kChunk;
  const __mmask32 tail_mask = tail == 0 ? 0u : ((1u << tail) - 1u);
  for (int64_t n = begin; n < end; ++n) {
    __m512 acc[U][MB];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MB; ++m) acc[u][m] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + U <= full; c += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m512i wv = chunk(n, c + u, 0xffffffffu);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          const __m512i xv = _mm512_loadu_si512(static_cast<const void*>(x + m * x_stride + (c + u) * kChunk));
          acc[u][m] = _mm512_dpbf16_ps(acc[u][m], (__m512bh)wv, (__m512bh)xv);
        }
      }
    }
    for (; c <= full; ++c) {  // the chunks U did not cover, then the partial one
      const __mmask32 mask = c < full ? 0xffffffffu : tail_mask;
      if (mask == 0) break;
      const __m512i wv = chunk(n, c, mask);
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * x_stride + c * kChunk);
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], (__m512bh)wv, (__m512bh)xv);
      }
    }
    for (int m = 0; m < MB; ++m) {
      for (int u = 1; u < U; ++u) acc[0][m] = _mm512_add_ps(acc[0][m], acc[u][m]);
      out[m * n_out + n] = _mm512_reduce_add_ps(acc[0][m]);
    }
  }
}

// Dense rows, the same streaming loop without the expand: plain loads. The dense baseline's decode path:
// oneDNN's linear is 2-5x slower than this at one activation row on Zen 4 (benchmarks/kernels.py).
inline auto dense_chunks(const bf16* w, int64_t k) {  // chunk(n, c, mask) of a row-major [N, K] weight
  return [w, k](int64_t n, int64_t c, __mmask32 mask) {
    const bf16* p = w + n * k + c * kChunk;
    return mask == 0xffffffffu ? _mm512_loadu_si512(static_cast<const void*>(p)) : _mm512_maskz_loadu_epi16(mask, p);
  };
}

template <int MB>
void dense_rows(const bf16* w, int64_t k, const bf16* x, int64_t x_stride, int64_t begin, int64_t end, float* out,
                int64_t n_out) {
  chunk_rows<MB>(dense_chunks(w, k), k, x, x_stride, begin, end, out, n_out);
}

// Exponent-coded rows: a lossless layout for bf16 weights whose high bytes (sign and the top 7 exponent bits)
// take at most 16 values (an LM head dequantized from a GGUF file takes 14): per weight its low byte and a
// 4-bit code of its high byte, 12 bits against bf16's 16; a 16-entry table gives the high bytes back (see
// kernels/exponent_coding.py). Chunk c of a row (32 weights) keeps its codes in 16 bytes: byte j holds weight
// 32c + j (low nibble) and 32c + 16 + j (high nibble). A chunk decodes in registers to the exact bf16 weights:
// the codes looked up by vpermb in the table repeated every 16 bytes (so the bits above a nibble need no
// masking), then low and high bytes interleaved by one vpermt2b. coded_rows reads 0.75x dense_rows' bytes
// and, K a multiple of 32, adds in the same order: the sums are bit for bit dense_rows'.
struct CodedTables {
  __m256i high;        // the 16 high bytes, twice
  __m512i interleave;  // vpermt2b indices: byte 2i <- low byte i, byte 2i + 1 <- high byte i
};

inline __m512i decode_coded(const uint8_t* low, const uint8_t* codes, const CodedTables& t) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m256i nibbles = _mm256_inserti128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1);
  const __m256i high = _mm256_permutexvar_epi8(nibbles, t.high);  // [32] high bytes
  const __m512i lows = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low)));
  return _mm512_permutex2var_epi8(lows, t.interleave, _mm512_castsi256_si512(high));
}

// The registers decode_coded takes, from the 16-entry table of high bytes.
CodedTables coded_tables(const torch::Tensor& table) {
  alignas(64) uint8_t high[32], interleave[64];
  std::memcpy(high, table.data_ptr<uint8_t>(), 16);
  std::memcpy(high + 16, high, 16);
  for (int i = 0; i < 32; ++i) {
    interleave[2 * i] = static_cast<uint8_t>(i);           // from the first source: the low bytes
    interleave[2 * i + 1] = static_cast<uint8_t>(64 + i);  // from the second: the high bytes
  }
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(high)),
          _mm512_load_si512(static_cast<const void*>(interleave))};
}

// chunk(n, c, mask) of an exponent-coded [N, K] weight (K is whole chunks, so mask is always full)
inline auto coded_chunks(const uint8_t* low, const uint8_t* codes, const CodedTables& table, int64_t k) {
  return [low, codes, &table, k](int64_t n, int64_t c, __mmask32) {
    return decode_coded(low + n * k + c * kChunk, codes + n * (k / 2) + c * (kChunk / 2), table);
  };
}

template <int MB>
void coded_rows(const uint8_t* low, const uint8_t* codes, const CodedTables& table, int64_t k, const bf16* x,
                int64_t x_stride, int64_t begin, int64_t end, float* out, int64_t n_out) {
  chunk_rows<MB>(coded_chunks(low, codes, table, k), k, x, x_stride, begin, end, out, n_out);
}

// Windowed decode, for sparse weights: a 64-column window (two mask words) costs one vpcompressb of
// the column numbers by the window's mask (the indices of its nonzeros, byte-sized), and each
// activation row is then gathered to the packed values with one vpermt2w over the window's two
// activation registers. Up to 32 nonzeros take one vdpbf16ps; a fuller window takes a second. At 70%
// sparsity a window holds ~19 nonzeros, so this replaces two vpexpandw and two vdpbf16ps by one of each
// (vpexpandw / vpcompressb cost ~3x a permute on Zen 4); where many windows hold more than 32 (50%
// sparsity) the extra branch and permute lose, so pack() decides per weight (PackedBitmask.windowed).
inline __mmask32 low_lanes(int count) {  // the first count of 32 lanes (count <= 32)
  return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
}

template <int MB>
inline void window_products(__m512* acc, const bf16* ptr, __m512i idx, int count, const bf16* x, int64_t x_stride) {
  const __m512i w = _mm512_maskz_loadu_epi16(low_lanes(count), static_cast<const void*>(ptr));
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    const __m512i x0 = _mm512_loadu_si512(static_cast<const void*>(x + m * x_stride));
    const __m512i x1 = _mm512_loadu_si512(static_cast<const void*>(x + m * x_stride + kChunk));
    const __m512i xs = _mm512_permutex2var_epi16(x0, idx, x1);  // the activations of the nonzeros, packed
    acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w, (__m512bh)xs);
  }
}

template <int MB>
inline const bf16* window_step(__m512* acc, __m512* spill, const bf16* ptr, uint64_t mask, __m512i iota,
                               const bf16* x, int64_t x_stride) {
  const int count = static_cast<int>(_mm_popcnt_u64(mask));
  _mm_prefetch(reinterpret_cast<const char*>(ptr) + kStreamPrefetchBytes, _MM_HINT_T0);
  const __m512i idx = _mm512_mask_compress_epi8(fresh_zero(), mask, iota);  // byte j: column of the j-th nonzero
  window_products<MB>(acc, ptr, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(idx)), std::min(count, 32), x,
                      x_stride);
  if (count > 32) {
    window_products<MB>(spill, ptr + 32, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(idx, 1)), count - 32, x,
                        x_stride);
  }
  return ptr + count;
}

template <int MB>
void window_rows(const uint32_t* masks, const bf16* values, const int64_t* row_offsets, const bf16* x,
                 int64_t x_stride, int64_t kc, int64_t begin, int64_t end, float* out, int64_t n_out) {
  constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);  // accumulators per activation row, rotated
  alignas(64) uint8_t columns[64];
  for (int j = 0; j < 64; ++j) columns[j] = static_cast<uint8_t>(j);
  const __m512i iota = _mm512_load_si512(static_cast<const void*>(columns));
  const int64_t windows = kc / 2;
  RowSums<MB> sums(out, n_out);
  for (int64_t n = begin; n < end; ++n) {
    const bf16* ptr = values + row_offsets[n];
    const uint32_t* mrow = masks + n * kc;
    __m512 acc[U + 1][MB];  // the last one takes the second half of windows with more than 32 nonzeros
    for (int u = 0; u <= U; ++u)
      for (int m = 0; m < MB; ++m) acc[u][m] = _mm512_setzero_ps();
    int64_t w = 0;
    for (; w + U <= windows; w += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        uint64_t mask;
        std::memcpy(&mask, mrow + 2 * (w + u), sizeof(mask));
        ptr = window_step<MB>(acc[u], acc[U], ptr, mask, iota, x + 2 * (w + u) * kChunk, x_stride);
      }
    }
    for (; w < windows; ++w) {
      uint64_t mask;
      std::memcpy(&mask, mrow + 2 * w, sizeof(mask));
      ptr = window_step<MB>(acc[0], acc[U], ptr, mask, iota, x + 2 * w * kChunk, x_stride);
    }
    if (kc % 2 != 0) {  // an odd last chunk: expanded as in stream_rows
      const __m512i wv = expand_chunk(ptr, mrow[kc - 1]);
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(static_cast<const void*>(x + m * x_stride + (kc - 1) * kChunk));
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], (__m512bh)wv, (__m512bh)xv);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int u = 1; u <= U; ++u) acc[0][m] = _mm512_add_ps(acc[0][m], acc[u][m]);
    sums.add(n, acc[0]);
  }
}

using DenseFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, int64_t, int64_t, float*, int64_t);

using RowsFn = void (*)(const uint32_t*, const bf16*, const int64_t*, const bf16*, int64_t, int64_t, int64_t,
                        int64_t, float*, int64_t);

// Activation rows per pass: at 16 the accumulators no longer leave room for the weights (measured 4x
// slower than two passes of 8), so larger batches run in passes of 8 rows, re-reading the weight.
constexpr int64_t kMaxBlock = 8;
constexpr RowsFn kRows[kMaxBlock] = {
    gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>, gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>,
};
constexpr RowsFn kStream[kMaxBlock] = {
    stream_rows<1>, stream_rows<2>, stream_rows<3>, stream_rows<4>,
    stream_rows<5>, stream_rows<6>, stream_rows<7>, stream_rows<8>,
};
// A pass streams one weight row at a time while its activation rows fit this budget (they are re-read
// for every weight row; measured on Zen 4's 32 KiB L1: 1.25x faster at 4 x 1536 columns and 1.4x at
// 1 x 4096, 0.7-0.9x at 2-8 x 4096).
constexpr int64_t kStreamMaxActBytes = 12 * 1024;

// 9 or 10 rows go in one pass of rows in flight (two weight rows, 20 accumulators), reading the weight once
// instead of twice: against a pass of 8 and one of 1-2 (same process, two threads, weights from memory, 50%
// and 70%, 576-11008 columns) 0.94-1.45x, 17 of 20 points at 1.0x or more; at 11-12 rows the accumulators
// crowd the registers and one pass lost on 4096 columns (0.71-0.91x of the panels there), so more rows
// take passes of 8.
constexpr int64_t kMaxSinglePass = 10;
constexpr RowsFn kRowsSinglePass[kMaxSinglePass - kMaxBlock] = {gemv_rows<9>, gemv_rows<10>};

// Batches past kMaxSinglePass rows take several passes over the weight, and each pass runs over spans of
// weight rows of about kPassSpanBytes, so the passes after the first read a span from L2 rather than memory.
// Same-process A/B of two builds against passes over all rows (two threads, weights from memory, 50% and
// 70%): 1.02-1.14x at 11, 12 and 16 rows on 4096x4096, 11008x4096 and 4096x11008; 0.94-1.07x on 2048x2048
// and 0.98-1.03x on SmolLM2's shapes (noise); 9-10 rows (one pass) unchanged.
constexpr int64_t kPassSpanBytes = 256 * 1024;

// Weight rows per span for the rows [begin, end) of a packed weight: kPassSpanBytes of masks and values, at
// least 16 rows.
int64_t pass_span_rows(const int64_t* row_offsets, int64_t kc, int64_t begin, int64_t end) {
  const int64_t rows = std::max<int64_t>(1, end - 1 - begin);
  const int64_t row_bytes = ((row_offsets[end - 1] - row_offsets[begin]) * 2 + rows * kc * 4) / rows;
  return std::max<int64_t>(16, kPassSpanBytes / std::max<int64_t>(1, row_bytes));
}

constexpr DenseFn kDense[kMaxBlock] = {
    dense_rows<1>, dense_rows<2>, dense_rows<3>, dense_rows<4>, dense_rows<5>, dense_rows<6>, dense_rows<7>, dense_rows<8>,
};

using CodedFn = void (*)(const uint8_t*, const uint8_t*, const CodedTables&, int64_t, const bf16*, int64_t, int64_t,
                         int64_t, float*, int64_t);
constexpr CodedFn kCoded[kMaxBlock] = {
    coded_rows<1>, coded_rows<2>, coded_rows<3>, coded_rows<4>,
    coded_rows<5>, coded_rows<6>, coded_rows<7>, coded_rows<8>,
};

constexpr RowsFn kWindow[kMaxBlock] = {
    window_rows<1>, window_rows<2>, window_rows<3>, window_rows<4>,
    window_rows<5>, window_rows<6>, window_rows<7>, window_rows<8>,
};

// The windowed loop re-reads each activation row's window per weight row too, and its permutes grow with
// the activation rows while the expands it saves do not; beyond 16 KiB of activations it loses.
constexpr int64_t kWindowMaxActBytes = 16 * 1024;

// Which of the three decode loops serves a pass of mb rows is chosen per machine (kernels/cpu/__init__.py
// measures them once per process): the same Zen 4 model has been seen to favour the streaming loop on
// one VM and rows in flight on another, by 1.5x either way. A loop whose activation budget the pass
// exceeds falls back to rows in flight, which has none.
enum Loop : int64_t { kRowsLoop = 0, kStreamLoop = 1, kWindowLoop = 2 };

RowsFn rows_fn(int64_t mb, int64_t k, int64_t loop) {
  const int64_t act_bytes = mb * k * static_cast<int64_t>(sizeof(bf16));
  if (loop == kWindowLoop && act_bytes <= kWindowMaxActBytes) return kWindow[mb - 1];
  if (loop == kStreamLoop && act_bytes <= kStreamMaxActBytes) return kStream[mb - 1];
  return kRows[mb - 1];
}

void check_packed(const torch::Tensor& masks, const torch::Tensor& values, const torch::Tensor& row_offsets,
                  int64_t k) {
  TORCH_CHECK(masks.dim() == 2 && masks.scalar_type() == torch::kInt32 && masks.is_contiguous(),
              "masks must be contiguous int32 [N, ceil(K/32)]");
  TORCH_CHECK(masks.size(1) == (k + kChunk - 1) / kChunk, "masks has ", masks.size(1), " words per row; K=", k,
              " needs ", (k + kChunk - 1) / kChunk);
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == torch::kBFloat16 && values.is_contiguous(),
              "values must be contiguous bfloat16 [nnz + 32]");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == torch::kInt64 &&
                  row_offsets.size(0) == masks.size(0) && row_offsets.is_contiguous(),
              "row_offsets must be contiguous int64 [N]");
}

// bias widened to a contiguous float32 [N] (undefined without one)
torch::Tensor bias_as_float(const c10::optional<torch::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return {};
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias must be [N]");
  return bias->to(torch::kFloat32).contiguous();
}

// y[:, begin:end] = bf16(sums + bias): one rounding, as the reference's float32 matmul + add
void store_rows(const float* sums, const float* bias, at::BFloat16* y, int64_t m_rows, int64_t n, int64_t begin,
                int64_t end) {
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t j = begin; j < end; ++j)
      y[m * n + j] = static_cast<at::BFloat16>(sums[m * n + j] + (bias != nullptr ? bias[j] : 0.f));
}

// Pair gather, for many activation rows: the activations are transposed to xt [K/2, Mp] dwords (a dword
// = the bf16 pair x[m, 2p], x[m, 2p+1]; Mp = M padded to 16), so one register holds one column pair
// for 16 activation rows. Each weight row's nonzero column pairs (a pair with at least one nonzero)
// are listed per K-block: the chunk expanded (vpexpandw), its nonzero pairs and their pair numbers
// compressed (vpcompressd) into two small buffers. Then every listed pair costs one broadcast and one
// vdpbf16ps per 16 activation rows, against the dense GEMM's one per pair: the arithmetic shrinks
// with density (51% of the pairs are nonzero at 70% sparsity, 75% at 50%). K is blocked so the
// transposed activations of a block stay in L1 while every weight row of the block reads them (measured
// on Zen 4 at 64 rows: 16 KiB blocks 1.3x faster than 256 KiB ones, which L2 bandwidth bounds, and than
// 8 KiB ones, which the per-block listing overhead bounds). Each weight row and K-block pays one listing
// (an expand and two compresses per chunk) per 64 activation rows, so beyond 64 rows the listing repeats.
constexpr int64_t kPairLanes = 16;         // activation rows per register (float32 accumulators)
constexpr int64_t kPairMaxGroups = 4;      // up to 64 activation rows per pass over the weight
constexpr int64_t kPairBlockBytes = 16 * 1024;   // transposed activations of one K-block

// Accumulator sets rotated over the listed pairs, so S * G independent vdpbf16ps chains hide its latency.
template <int G>
constexpr int pair_sets() {
  return G >= 4 ? 2 : (G == 3 ? 3 : (G == 2 ? 4 : 8));
}

// Lists chunks [c0, c1) of one weight row: pairs[i] the i-th nonzero pair (two bf16), index[i] its pair
// number counted from the block start. Returns the count, padded with zero pairs to a multiple of pad.
inline int64_t list_pairs(const uint32_t* mrow, const bf16*& ptr, int64_t c0, int64_t c1, uint32_t* pairs,
                          int32_t* index, int pad) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0;
  _mm_prefetch(reinterpret_cast<const char*>(mrow + c1) + 64, _MM_HINT_T0);  // later blocks of this row
  for (int64_t c = c0; c < c1; ++c) {
    const uint32_t mask = mrow[c];
    _mm_prefetch(reinterpret_cast<const char*>(ptr) + kPrefetchBytes, _MM_HINT_T0);
    const __m512i w = expand_chunk(ptr, mask);
    ptr += _mm_popcnt_u32(mask);
    const auto live = static_cast<__mmask16>(_pext_u32(mask | (mask >> 1), 0x55555555u));  // pairs with a nonzero
    const __m512i number = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(16 * (c - c0))));
    _mm512_storeu_si512(static_cast<void*>(pairs + count), _mm512_mask_compress_epi32(fresh_zero(), live, w));
    _mm512_storeu_si512(static_cast<void*>(index + count), _mm512_mask_compress_epi32(fresh_zero(), live, number));
    count += _mm_popcnt_u32(live);
  }
  for (; count % pad != 0; ++count) {
    pairs[count] = 0;
    index[count] = 0;
  }
  return count;
}

// sums[g] += the products of the listed pairs with activation groups 0 .. G-1 (16 rows each) of xt.
template <int G>
inline void pair_products(const uint32_t* pairs, const int32_t* index, int64_t count, const bf16* xt,
                          int64_t pair_stride, __m512* sums) {
  constexpr int S = pair_sets<G>();
  __m512 acc[S][G];
  for (int s = 0; s < S; ++s)
    for (int g = 0; g < G; ++g) acc[s][g] = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; i += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const __m512i w = _mm512_set1_epi32(static_cast<int>(pairs[i + s]));
      const bf16* col = xt + index[i + s] * pair_stride;
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m512i xv = _mm512_loadu_si512(static_cast<const void*>(col + g * 2 * kPairLanes));
        acc[s][g] = _mm512_dpbf16_ps(acc[s][g], (__m512bh)w, (__m512bh)xv);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int s = 1; s < S; ++s) acc[0][g] = _mm512_add_ps(acc[0][g], acc[s][g]);
    sums[g] = _mm512_add_ps(sums[g], acc[0][g]);
  }
}

// Weight rows [begin, end) against G groups of 16 activation rows: out[n, 16 g] += products. The rows go
// in tiles of kPairTileRows, each tile through every K-block of `block` chunks before the next: a
// block's transposed activations are read from L1 by the whole tile, and the tile's rows are short
// sequential streams that the prefetches keep ahead of (a K-block over all rows would read every row's
// values in scattered ~100-byte pieces: 2-3x slower with weights coming from memory).
constexpr int64_t kPairTileRows = 16;

template <int G>
void pair_rows(const uint32_t* masks, const bf16* values, const int64_t* row_offsets, const bf16* xt,
               int64_t pair_stride, int64_t kc, int64_t block, int64_t begin, int64_t end, float* out,
               int64_t out_stride) {
  constexpr int S = pair_sets<G>();
  std::vector<uint32_t> pairs(block * 16 + 16 + S);
  std::vector<int32_t> index(pairs.size());
  int64_t cursor[kPairTileRows];
  for (int64_t t0 = begin; t0 < end; t0 += kPairTileRows) {
    const int64_t t1 = std::min(end, t0 + kPairTileRows);
    std::copy(row_offsets + t0, row_offsets + t1, cursor);
    for (int64_t c0 = 0; c0 < kc; c0 += block) {
      const int64_t c1 = std::min(kc, c0 + block);
      const bf16* xblock = xt + c0 * 16 * pair_stride;
      for (int64_t n = t0; n < t1; ++n) {
        const bf16* ptr = values + cursor[n - t0];
        const int64_t count = list_pairs(masks + n * kc, ptr, c0, c1, pairs.data(), index.data(), S);
        cursor[n - t0] = ptr - values;
        float* row = out + n * out_stride;
        __m512 sums[G];
        for (int g = 0; g < G; ++g) sums[g] = _mm512_loadu_ps(row + g * kPairLanes);
        pair_products<G>(pairs.data(), index.data(), count, xblock, pair_stride, sums);
        for (int g = 0; g < G; ++g) _mm512_storeu_ps(row + g * kPairLanes, sums[g]);
      }
    }
  }
}

using PairFn = void (*)(const uint32_t*, const bf16*, const int64_t*, const bf16*, int64_t, int64_t, int64_t, int64_t,
                        int64_t, float*, int64_t);
constexpr PairFn kPairs[kPairMaxGroups] = {pair_rows<1>, pair_rows<2>, pair_rows<3>, pair_rows<4>};

// Panels, for a few dozen activation rows of a weight too dense for the pair gather: a register-blocked
// GEMM on weight rows decompressed a chunk at a time. A panel of NR weight rows goes together; each chunk of the NR
// rows is expanded into a small buffer (double-buffered: chunk c + 1 is expanded while chunk c is
// multiplied, so no load waits on the store before it), then every one of its 16 column pairs is
// broadcast from the buffer and multiplied with G registers of transposed activations (16 rows each, as
// in the pair gather), G x NR float32 accumulators held in registers over all of K. Per chunk that is
// 16 G NR vdpbf16ps against NR expands: the decompression costs 2-6% of the products at G = 4 and the
// arithmetic is a dense GEMM's, so on Zen 4 it runs at 0.84-1.21x of oneDNN's prepacked GEMM at 32-64
// rows where the pair gather ran 0.6-0.9x below ~80% sparsity (its products cost a load each).
// G = 4 takes NR = 6 (24 accumulators + 4 activation registers of the 32), fewer groups 8 rows: more rows
// per panel, though the registers would hold them, measured slower (16 rows at G = 1 and 12 at G = 2 ran
// 0.80-1.01x and 0.92-1.07x of oneDNN at 16 and 32 activation rows, 8 rows 0.85-1.08x and 0.96-1.08x;
// same-process A/B, weights from memory): fewer weight streams at once for the prefetchers.
//
// A panel reads 2 NR streams per thread (each row's values and masks): the hardware prefetchers lose track
// of that many, so both are prefetched in software, the values kPanelPrefetchBytes ahead and the masks a
// line ahead once per line. Measured against prefetching the values 512 bytes ahead and the masks not at
// all (same-process A/B, weights from memory, two threads, 50% and 70%, 16-64 rows): 1.03-1.10x on
// 4096x4096, 11008x4096 and 4096x11008 (18 of 18 points faster), 0.98-1.17x on SmolLM2's shapes.
constexpr int64_t kPanelPrefetchBytes = 1024;

// The next panel's masks and values, prefetched into L2 a few lines per chunk of this panel (NextRowsAhead). The
// per-row prefetch above reaches kPanelPrefetchBytes ahead, which on short rows (SmolLM2's: 576 values, 50%
// sparse: 576 bytes) is the next row or two, so each panel began by waiting on memory for its rows. Same-process
// A/B of two builds, weights from memory, two threads, 50% and 70%, two runs: 1.05-1.42x at 16-32 rows on
// 1536x576 and 576x1536, 1.00-1.15x on 4096x4096 and 11008x4096, 0.99-1.01x on 4096x11008; at 48 rows
// 1.03-1.18x; at 64 rows (G = 4) 0.94-0.98x, so not there.
constexpr int kPanelAheadMaxGroups = 3;

template <int NR>
inline void expand_rows(const uint32_t* const* mrow, const bf16** ptr, int64_t c, int32_t (*buf)[16]) {
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const uint32_t mask = mrow[r][c];
    prefetch_next_masks(mrow[r], c);
    _mm_prefetch(reinterpret_cast<const char*>(ptr[r]) + kPanelPrefetchBytes, _MM_HINT_T0);
    _mm512_store_si512(static_cast<void*>(buf[r]), expand_chunk(ptr[r], mask));
    ptr[r] += _mm_popcnt_u32(mask);
  }
}

// out[n, m] = the float32 sums for weight rows [begin, end) and activation rows 0 .. 16 G - 1 of xt (dword
// stride mp; out's row stride mp too). Rows past `end` in the last panel repeat row `begin`'s stream and are
// dropped.
template <int G, int NR>
void panel_rows(const uint32_t* masks, const bf16* values, const int64_t* row_offsets, const int32_t* xt,
               int64_t mp, int64_t kc, int64_t begin, int64_t end, float* out) {
  alignas(64) int32_t wbuf[2][NR][16];  // two chunks of NR rows, as bf16 pairs
  for (int64_t n0 = begin; n0 < end; n0 += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, end - n0));
    __m512 acc[G][NR];
    const bf16* ptr[NR];
    const uint32_t* mrow[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t row = n0 + (r < nr ? r : 0);
      ptr[r] = values + row_offsets[row];
      mrow[r] = masks + row * kc;
      for (int g = 0; g < G; ++g) acc[g][r] = _mm512_setzero_ps();
    }
    NextRowsAhead ahead(masks, values, row_offsets, kc, std::min(end, n0 + NR), std::min(end, n0 + 2 * NR));
    expand_rows<NR>(mrow, ptr, 0, wbuf[0]);
    for (int64_t c = 0; c < kc; ++c) {
      if (G <= kPanelAheadMaxGroups) ahead.step();
      if (c + 1 < kc) expand_rows<NR>(mrow, ptr, c + 1, wbuf[(c + 1) & 1]);
      const int32_t (*w)[16] = wbuf[c & 1];
      const int32_t* xc = xt + c * 16 * mp;
#pragma GCC unroll 2
      for (int p = 0; p < 16; ++p) {
        __m512i xv[G];
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) xv[g] = _mm512_loadu_si512(static_cast<const void*>(xc + p * mp + 16 * g));
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          const __m512i wv = _mm512_set1_epi32(w[r][p]);
#pragma GCC unroll 4
          for (int g = 0; g < G; ++g) acc[g][r] = _mm512_dpbf16_ps(acc[g][r], (__m512bh)xv[g], (__m512bh)wv);
        }
      }
    }
    for (int r = 0; r < nr; ++r)
      for (int g = 0; g < G; ++g) _mm512_storeu_ps(out + (n0 + r) * mp + 16 * g, acc[g][r]);
  }
}

using PanelFn = void (*)(const uint32_t*, const bf16*, const int64_t*, const int32_t*, int64_t, int64_t, int64_t,
                        int64_t, float*);
constexpr PanelFn kPanels[kPairMaxGroups] = {panel_rows<1, 8>, panel_rows<2, 8>, panel_rows<3, 8>, panel_rows<4, 6>};
constexpr int64_t kPanelRows[kPairMaxGroups] = {8, 8, 8, 6};

// r[j] <- column j of the 16 x 16 dword matrix whose rows are r[0 .. 15].
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// x [M, K] bf16 -> xt [KC * 16, Mp] int32: the bf16 pair x[m, 2p], x[m, 2p+1] at xt[p, m], zero-padded in K
// and in M to Mp (a multiple of 16). A chunk of 16 rows is one 16 x 16 dword transpose in registers
// (torch's zeros + copy + transpose took 63 us for 64 x 1536, a fifth of the GEMM it feeds).
torch::Tensor transposed_pairs(const torch::Tensor& x, int64_t kc, int64_t mp) {
  const torch::Tensor xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1);
  auto xt = torch::empty({kc * 16, mp}, xc.options().dtype(torch::kInt32));
  const auto* xb = reinterpret_cast<const bf16*>(xc.data_ptr<at::BFloat16>());
  int32_t* out = xt.data_ptr<int32_t>();
  at::parallel_for(0, kc, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const __mmask32 cols = low_lanes(static_cast<int>(std::min<int64_t>(kChunk, k - c * kChunk)));
      for (int64_t m0 = 0; m0 < mp; m0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = m0 + i < m_rows ? _mm512_maskz_loadu_epi16(cols, static_cast<const void*>(xb + (m0 + i) * k + c * kChunk))
                                 : _mm512_setzero_si512();
        transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(static_cast<void*>(out + (c * 16 + j) * mp + m0), r[j]);
      }
    }
  });
  return xt;
}

// 16 floats -> 16 bf16 rounded to nearest even, as c10::BFloat16 rounds (a NaN becomes 0x7fc0).
inline __m256i round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// y [M, N] = bf16(out^T + bias) from out [N, mp] float32 (y^T), 16 x 16 blocks transposed in registers.
void store_transposed(const float* out, int64_t mp, const float* bias, at::BFloat16* y, int64_t m_rows, int64_t n) {
  at::parallel_for(0, (n + 15) / 16, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t n0 = 16 * b0; n0 < std::min(n, 16 * b1); n0 += 16) {
      const int live = static_cast<int>(std::min<int64_t>(16, n - n0));
      const auto cols = static_cast<__mmask16>((1u << live) - 1u);
      const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(cols, bias + n0) : _mm512_setzero_ps();
      for (int64_t m0 = 0; m0 < m_rows; m0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = i < live ? _mm512_loadu_si512(static_cast<const void*>(out + (n0 + i) * mp + m0)) : _mm512_setzero_si512();
        transpose16(r);
        for (int j = 0; j < 16 && m0 + j < m_rows; ++j)
          _mm256_mask_storeu_epi16(static_cast<void*>(y + (m0 + j) * n + n0), cols,
                                   round_bf16(_mm512_add_ps(_mm512_castsi512_ps(r[j]), b)));
      }
    }
  });
}

}  // namespace

// x [M, K] bf16, packed weight [N, K], bias [N] bf16 or None -> y [M, N] bf16 (float32 accumulation);
// loops[mb - 1] is the loop (Loop) for a pass of mb activation rows (passes of up to 8 rows, span by span; 9-10
// rows are one pass of rows in flight).
torch::Tensor bitmask_gemm_decode(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& values,
                                  const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias,
                                  const std::vector<int64_t>& loops) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  const int64_t m_rows = x.size(0), k = x.size(1), n = masks.size(0), kc = masks.size(1);
  check_packed(masks, values, row_offsets, k);
  TORCH_CHECK(static_cast<int64_t>(loops.size()) == kMaxBlock, "loops must name a loop for each of 1..", kMaxBlock,
              " rows, got ", loops.size());
  // activations padded to whole chunks with zeros (the padding bits of the masks are zero too)
  torch::Tensor xp = x;
  if (k % kChunk != 0 || !x.is_contiguous()) {
    xp = torch::zeros({m_rows, kc * kChunk}, x.options());
    xp.narrow(1, 0, k).copy_(x);
  }
  torch::Tensor bias_f32 = bias_as_float(bias, n);
  const float* bias_p = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  auto acc = empty_cpu({m_rows, n}, x.options().dtype(torch::kFloat32));  // float32 sums
  auto y = empty_cpu({m_rows, n}, x.options());
  const auto* mp = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  const auto* vp = reinterpret_cast<const bf16*>(values.data_ptr<at::BFloat16>());
  const auto* op = row_offsets.data_ptr<int64_t>();
  const auto* xbase = reinterpret_cast<const bf16*>(xp.data_ptr<at::BFloat16>());
  float* out = acc.data_ptr<float>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const int64_t x_stride = xp.size(1);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    if (m_rows > kMaxBlock && m_rows <= kMaxSinglePass) {
      kRowsSinglePass[m_rows - kMaxBlock - 1](mp, vp, op, xbase, x_stride, kc, begin, end, out, n);
    } else {
      // one pass runs over all its rows; several go span by span
      const int64_t span = m_rows <= kMaxBlock ? end - begin : pass_span_rows(op, kc, begin, end);
      for (int64_t s0 = begin; s0 < end; s0 += span) {
        const int64_t s1 = std::min(end, s0 + span);
        for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxBlock) {
          const int64_t mb = std::min<int64_t>(kMaxBlock, m_rows - m0);
          rows_fn(mb, x_stride, loops[mb - 1])(mp, vp, op, xbase + m0 * x_stride, x_stride, kc, s0, s1,
                                               out + m0 * n, n);
        }
      }
    }
    store_rows(out, bias_p, yp, m_rows, n, begin, end);
  });
  return y;
}

namespace {

// The frame the pair gather and the panels share: x transposed to pairs, float32 sums of y^T [N, Mp] (zeroed
// first when `zero`: the pair gather adds to them per K-block), passes of up to 64 activation rows
// (pass(m0, groups, masks, values, row_offsets, xt, mp, kc, n, sums) fills sums[:, m0 : m0 + 16 groups]),
// then y = bf16(sums^T + bias).
template <typename Pass>
torch::Tensor many_rows(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& values,
                        const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias, bool zero,
                        Pass pass) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  const int64_t m_rows = x.size(0), k = x.size(1), n = masks.size(0), kc = masks.size(1);
  check_packed(masks, values, row_offsets, k);
  const int64_t mp = (m_rows + kPairLanes - 1) / kPairLanes * kPairLanes;
  auto xt = transposed_pairs(x, kc, mp);  // [kc * 16, mp] int32
  auto opts = x.options().dtype(torch::kFloat32);
  auto sums = zero ? torch::zeros({n, mp}, opts) : torch::empty({n, mp}, opts);  // y^T
  const auto* mptr = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  const auto* vp = reinterpret_cast<const bf16*>(values.data_ptr<at::BFloat16>());
  float* sp = sums.data_ptr<float>();
  for (int64_t m0 = 0; m0 < mp; m0 += kPairMaxGroups * kPairLanes) {
    const int64_t groups = std::min<int64_t>(kPairMaxGroups, (mp - m0) / kPairLanes);
    pass(m0, groups, mptr, vp, row_offsets.data_ptr<int64_t>(), xt.data_ptr<int32_t>(), mp, kc, n, sp);
  }
  torch::Tensor bias_f32 = bias_as_float(bias, n);
  auto y = empty_cpu({m_rows, n}, x.options());
  store_transposed(sp, mp, bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr, y.data_ptr<at::BFloat16>(),
                   m_rows, n);
  return y;
}

}  // namespace

// x [M, K] bf16, packed weight [N, K], bias [N] or None -> y [M, N] bf16 by the pair gather (for many rows).
torch::Tensor bitmask_gemm_pairs(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& values,
                                 const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias) {
  return many_rows(x, masks, values, row_offsets, bias, true,
                   [](int64_t m0, int64_t groups, const uint32_t* mptr, const bf16* vp, const int64_t* offsets,
                      const int32_t* xt, int64_t mp, int64_t kc, int64_t n, float* sums) {
    const auto* xtp = reinterpret_cast<const bf16*>(xt);
    const int64_t block = std::max<int64_t>(1, kPairBlockBytes / (groups * kPairLanes * 4 * 16));  // chunks per K-block
    at::parallel_for(0, n, kPairTileRows, [&](int64_t begin, int64_t end) {
      kPairs[groups - 1](mptr, vp, offsets, xtp + 2 * m0, 2 * mp, kc, block, begin, end, sums + m0, mp);
    });
  });
}

// x [M, K] bf16, packed weight [N, K], bias [N] or None -> y [M, N] bf16 by panels (passes of 64 rows).
torch::Tensor bitmask_gemm_panels(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& values,
                                  const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias) {
  return many_rows(x, masks, values, row_offsets, bias, false,
                   [](int64_t m0, int64_t groups, const uint32_t* mptr, const bf16* vp, const int64_t* offsets,
                      const int32_t* xt, int64_t mp, int64_t kc, int64_t n, float* sums) {
    const int64_t nr = kPanelRows[groups - 1];
    at::parallel_for(0, (n + nr - 1) / nr, 1, [&](int64_t b, int64_t e) {
      kPanels[groups - 1](mptr, vp, offsets, xt + m0, mp, kc, b * nr, std::min(n, e * nr), sums + m0);
    });
  });
}

namespace {

// The frame of the dense GEMVs: y [M, N] = bf16(sums + bias), rows of the weight split between the threads,
// passes of up to 8 activation rows; pass(mb, x + m0 K, begin, end, sums + m0 N) fills one pass's sums.
template <typename Pass>
torch::Tensor gemv_passes(const torch::Tensor& x, int64_t n, const c10::optional<torch::Tensor>& bias, Pass pass) {
  const int64_t m_rows = x.size(0), k = x.size(1);
  torch::Tensor bias_f32 = bias_as_float(bias, n);
  const float* bias_p = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  auto acc = empty_cpu({m_rows, n}, x.options().dtype(torch::kFloat32));
  auto y = empty_cpu({m_rows, n}, x.options());
  const auto* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  float* out = acc.data_ptr<float>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxBlock)
      pass(std::min<int64_t>(kMaxBlock, m_rows - m0), xp + m0 * k, begin, end, out + m0 * n);
    store_rows(out, bias_p, yp, m_rows, n, begin, end);
  });
  return y;
}

}  // namespace

// x [M, K] bf16, dense weight [N, K] bf16 (contiguous), bias [N] or None -> y [M, N] bf16.
torch::Tensor dense_gemm_decode(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
              "x must be contiguous bfloat16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be contiguous bfloat16 [N, K] with x's K");
  const int64_t k = x.size(1);
  const auto* wp = reinterpret_cast<const bf16*>(w.data_ptr<at::BFloat16>());
  return gemv_passes(x, w.size(0), bias, [&](int64_t mb, const bf16* xm, int64_t begin, int64_t end, float* out) {
    kDense[mb - 1](wp, k, xm, k, begin, end, out, w.size(0));
  });
}

static void check_coded(const torch::Tensor& low, const torch::Tensor& codes, const torch::Tensor& table, int64_t k) {
  TORCH_CHECK(low.dim() == 2 && low.scalar_type() == torch::kUInt8 && low.is_contiguous() && low.size(1) == k &&
                  k % kChunk == 0,
              "low must be contiguous uint8 [N, K] with x's K, a multiple of 32");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() &&
                  codes.size(0) == low.size(0) && codes.size(1) == k / 2,
              "codes must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(table.dim() == 1 && table.scalar_type() == torch::kUInt8 && table.is_contiguous() && table.size(0) == 16,
              "table must be contiguous uint8 [16]");
}

// x [M, K] bf16, exponent-coded weight [N, K] (low uint8 [N, K], codes uint8 [N, K/2], table uint8 [16]; see
// coded_rows; K a multiple of 32), bias [N] or None -> y [M, N] bf16, bit for bit dense_gemm_decode's.
torch::Tensor coded_gemm_decode(const torch::Tensor& x, const torch::Tensor& low, const torch::Tensor& codes,
                                const torch::Tensor& table, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
              "x must be contiguous bfloat16 [M, K]");
  const int64_t k = x.size(1), n = low.size(0);
  check_coded(low, codes, table, k);
  const CodedTables tab = coded_tables(table);
  const auto* lp = low.data_ptr<uint8_t>();
  const auto* cp = codes.data_ptr<uint8_t>();
  return gemv_passes(x, n, bias, [&](int64_t mb, const bf16* xm, int64_t begin, int64_t end, float* out) {
    kCoded[mb - 1](lp, cp, tab, k, xm, k, begin, end, out, n);
  });
}

// Rows [begin, end) of the packed weight written densely into out, bf16 [end - begin, K] (contiguous).
void bitmask_decompress_into(const torch::Tensor& masks, const torch::Tensor& values,
                             const torch::Tensor& row_offsets, int64_t begin, int64_t end, torch::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == torch::kBFloat16 && out.is_contiguous(),
              "out must be contiguous bfloat16 [rows, K]");
  const int64_t k = out.size(1);
  check_packed(masks, values, row_offsets, k);
  TORCH_CHECK(0 <= begin && begin <= end && end <= masks.size(0) && out.size(0) == end - begin,
              "row range out of bounds or out has the wrong number of rows");
  const int64_t kc = masks.size(1);
  const auto* mp = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  const auto* vp = reinterpret_cast<const bf16*>(values.data_ptr<at::BFloat16>());
  const auto* op = row_offsets.data_ptr<int64_t>();
  auto* dst = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  const int64_t tail = k - (kc - 1) * kChunk;  // 1..32 columns in the last chunk
  const __mmask32 tail_mask = tail == kChunk ? 0xffffffffu : ((1u << tail) - 1u);
  at::parallel_for(begin, end, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const bf16* ptr = vp + op[r];
      const uint32_t* mrow = mp + r * kc;
      bf16* row = dst + (r - begin) * k;
      for (int64_t c = 0; c < kc; ++c) {
        const __m512i w = expand_chunk(ptr, mrow[c]);
        ptr += _mm_popcnt_u32(mrow[c]);
        if (c + 1 < kc) {
          _mm512_storeu_si512(static_cast<void*>(row + c * kChunk), w);
        } else {
          _mm512_mask_storeu_epi16(static_cast<void*>(row + c * kChunk), tail_mask, w);
        }
      }
    }
  });
}

// oneDNN's prepacked bf16 linear weight, in the blocked form torch.ops.mkldnn._reorder_linear_weight gives it on
// AVX512-BF16 CPUs without AMX (kernels/cpu/__init__.py checks the form for each shape before using it): rows in
// blocks of 64, the last padded with zeros; within a block, for each column pair p, the 64 rows' pairs
// (W[n, 2p], W[n, 2p + 1]) side by side. So dword (b P + p) 64 + i holds row 64 b + i's pair p, for P pairs a
// row (K padded with zeros). Prefill decompresses a sparse weight into this form in a scratch buffer and runs
// oneDNN's own GEMM on it, which the plain row-major form of bitmask_decompress_into cannot reach (oneDNN then
// reorders the weight inside every call).
namespace at::native {  // exported by libtorch_cpu for AOTInductor
TORCH_API void* data_ptr_from_mkldnn(const at::Tensor& mkldnn_tensor);
TORCH_API at::Tensor mkldnn_tensor_from_data_ptr(void* data_ptr, at::IntArrayRef dims, at::ScalarType dtype,
                                                 at::Device device, const uint8_t* opaque_metadata,
                                                 int64_t opaque_metadata_size);
}  // namespace at::native

constexpr int64_t kBlockRows = 64;  // rows of one block of the prepacked form

// The whole packed weight [N, K] into buffer (uint8, at least ceil(N / 64) 64 pairs 4 bytes, 64-byte aligned)
// in the blocked form with `pairs` column pairs a row. Every byte of that span is written, padding included, so
// the buffer may hold anything before. Sixteen rows' chunks at a time are expanded, transposed 16 x 16 in
// dwords (one register per column pair, 16 rows) and stored as whole cache lines, non-temporal: the scratch is
// larger than the caches, and streaming stores halved the decompression's time on 4096 x 4096 (20% -> 10% of
// the GEMM at 256 rows, throwaway script).
void bitmask_decompress_blocked(const torch::Tensor& masks, const torch::Tensor& values,
                                const torch::Tensor& row_offsets, torch::Tensor& buffer, int64_t pairs) {
  const int64_t n = masks.size(0), kc = masks.size(1);
  check_packed(masks, values, row_offsets, std::max<int64_t>(1, kc * kChunk));
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(pairs >= kc * 16, "the blocked form needs at least ", kc * 16, " column pairs a row, got ", pairs);
  TORCH_CHECK(buffer.scalar_type() == torch::kUInt8 && buffer.is_contiguous() &&
                  buffer.numel() >= blocks * kBlockRows * pairs * 4,
              "buffer must be contiguous uint8 of at least ", blocks * kBlockRows * pairs * 4, " bytes");
  auto* dst = reinterpret_cast<int32_t*>(buffer.data_ptr<uint8_t>());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(dst) % 64 == 0, "buffer must be 64-byte aligned");
  const auto* mp = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  const auto* vp = reinterpret_cast<const bf16*>(values.data_ptr<at::BFloat16>());
  const auto* op = row_offsets.data_ptr<int64_t>();
  at::parallel_for(0, blocks * (kBlockRows / 16), 1, [&](int64_t lo, int64_t hi) {
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t r0 = 16 * g, rows = std::clamp<int64_t>(n - r0, 0, 16);
      int32_t* base = dst + (r0 / kBlockRows) * pairs * kBlockRows + r0 % kBlockRows;  // pair 0 of row r0
      const bf16* ptr[16];
      const uint32_t* mrow[16];
      for (int64_t r = 0; r < rows; ++r) {
        ptr[r] = vp + op[r0 + r];
        mrow[r] = mp + (r0 + r) * kc;
      }
      for (int64_t c = 0; c < (rows > 0 ? kc : 0); ++c) {
        __m512i w[16];
        for (int64_t r = 0; r < 16; ++r) {
          if (r < rows) {
            w[r] = expand_chunk(ptr[r], mrow[r][c]);
            ptr[r] += _mm_popcnt_u32(mrow[r][c]);
          } else {
            w[r] = zero;
          }
        }
        transpose16(w);  // w[j]: pair 16 c + j of the 16 rows
        for (int j = 0; j < 16; ++j)
          _mm512_stream_si512(reinterpret_cast<__m512i*>(base + (16 * c + j) * kBlockRows), w[j]);
      }
      for (int64_t p = rows > 0 ? kc * 16 : 0; p < pairs; ++p)  // padding: columns past K, rows past N
        _mm512_stream_si512(reinterpret_cast<__m512i*>(base + p * kBlockRows), zero);
    }
    _mm_sfence();  // the streaming stores are visible before the GEMM reads them
  });
}

// An oneDNN weight [n, k] bf16 over buffer's memory, laid out as the serialized descriptor `metadata` says
// (torch.ops.mkldnn._get_mkldnn_serialized_md of a prepacked weight of that shape). It does not own the memory:
// the caller keeps buffer alive while the view is used.
torch::Tensor blocked_weight_view(const torch::Tensor& buffer, const torch::Tensor& metadata, int64_t n, int64_t k) {
  TORCH_CHECK(buffer.is_contiguous() && metadata.scalar_type() == torch::kUInt8 && metadata.is_contiguous(),
              "buffer must be contiguous and metadata contiguous uint8");
  return at::native::mkldnn_tensor_from_data_ptr(buffer.data_ptr(), {n, k}, at::kBFloat16, at::Device(at::kCPU),
                                                 metadata.data_ptr<uint8_t>(), metadata.numel());
}

// A copy of the first nbytes of an oneDNN tensor's memory, as uint8 (to check its layout).
torch::Tensor mkldnn_bytes(const torch::Tensor& mkldnn_tensor, int64_t nbytes) {
  const auto* src = static_cast<const uint8_t*>(at::native::data_ptr_from_mkldnn(mkldnn_tensor));
  auto out = torch::empty({nbytes}, torch::TensorOptions().dtype(torch::kUInt8));
  std::memcpy(out.data_ptr<uint8_t>(), src, static_cast<size_t>(nbytes));
  return out;
}

// Dense GEMM for a few dozen activation rows on oneDNN's own prepacked weight (the blocked form above), read in
// place. oneDNN's GEMM is slow at few rows (at 4-16 rows on SmolLM2's linears it reaches 60-200 GFLOPS of the
// two cores' ~400, and reads its weight at 8-15 GB/s). Here a 64-row block is one tile: per column pair the
// block's four registers of weight pairs (16 rows each) are loaded once and multiplied by each activation row's
// pair, broadcast, into 4 x MB float32 accumulators (MB <= 6 activation rows: 24 accumulators, 4 weights and a
// broadcast fill the 32 registers). More rows take several row groups over the block, which stays in L2 after
// the first. Blocks are split between the threads. The sums are the same products as oneDNN's in another
// order, so equal to its output within bf16 rounding, not bit for bit.
namespace {

constexpr int kBlockedMaxGroup = 6;  // activation rows per pass over a block

template <int MB>
void blocked_tile(const int32_t* w, int64_t pairs, const int32_t* x, int64_t x_pairs, const float* bias,
                  at::BFloat16* y, int64_t n_out, int64_t live) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t* wp = w + p * kBlockRows;
    __m512i wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_load_si512(static_cast<const void*>(wp + 16 * j));
#pragma GCC unroll 6
    for (int m = 0; m < MB; ++m) {
      const __m512i xb = _mm512_set1_epi32(x[m * x_pairs + p]);  // activation row m's pair p, 16 times
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)wv[j], (__m512bh)xb);
    }
  }
  for (int j = 0; j < 4 && 16 * j < live; ++j) {
    const __mmask16 cols = lanes16(live - 16 * j);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(cols, bias + 16 * j) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m)
      _mm256_mask_storeu_epi16(static_cast<void*>(y + m * n_out + 16 * j), cols,
                               round_bf16(_mm512_add_ps(acc[m][j], b)));
  }
}

using BlockedTile = void (*)(const int32_t*, int64_t, const int32_t*, int64_t, const float*, at::BFloat16*, int64_t,
                             int64_t);
constexpr BlockedTile kBlockedTiles[kBlockedMaxGroup] = {blocked_tile<1>, blocked_tile<2>, blocked_tile<3>,
                                                          blocked_tile<4>, blocked_tile<5>, blocked_tile<6>};

}  // namespace

// x [M, K] bf16, weight: an oneDNN prepacked bf16 linear weight [N, K] in the blocked form with `pairs` column
// pairs a row (kernels/cpu/__init__.py blocked_form checks the form per shape), bias [N] or None -> y [M, N] bf16.
torch::Tensor dense_gemm_blocked(const torch::Tensor& x, const torch::Tensor& weight, int64_t pairs,
                                 const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be bfloat16 [M, K]");
  TORCH_CHECK(weight.is_mkldnn() && weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight must be an oneDNN prepacked [N, K] weight with x's K");
  const int64_t m_rows = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(2 * pairs >= k, "the blocked form has ", pairs, " column pairs a row, too few for K = ", k);
  // activations as dwords (column pairs), padded with zeros to the form's pairs (its padding columns are zero)
  torch::Tensor xpad = x;
  if (k != 2 * pairs || !x.is_contiguous()) {
    xpad = at::zeros({m_rows, 2 * pairs}, x.options());
    xpad.narrow(1, 0, k).copy_(x);
  }
  torch::Tensor bias_f32 = bias_as_float(bias, n);
  const float* bias_p = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  auto y = empty_cpu({m_rows, n}, x.options());
  const auto* wp = static_cast<const int32_t*>(at::native::data_ptr_from_mkldnn(weight));
  const auto* xp = reinterpret_cast<const int32_t*>(xpad.data_ptr<at::BFloat16>());
  auto* yp = y.data_ptr<at::BFloat16>();
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  const int64_t groups = (m_rows + kBlockedMaxGroup - 1) / kBlockedMaxGroup;
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t n0 = b * kBlockRows, live = std::min(kBlockRows, n - n0);
      for (int64_t g = 0, m0 = 0; g < groups; ++g) {  // row groups as even as they can be
        const int64_t mb = (m_rows - m0 + groups - g - 1) / (groups - g);
        const float* block_bias = bias_p == nullptr ? nullptr : bias_p + n0;
        kBlockedTiles[mb - 1](wp + n0 * pairs, pairs, xp + m0 * pairs, pairs, block_bias, yp + m0 * n + n0, n, live);
        m0 += mb;
      }
    }
  });
  return y;
}

// Screened argmax: the greedy token of an LM head without reading all of it (kernels/argmax_screen.py has the
// whole argument). A greedy decode step needs only the index of the largest logit, and a vocabulary-sized head
// is the largest weight a small model streams (SmolLM2: 49152 x 576, a fifth of a 70%-sparse decode step). The
// screen keeps the head once more as int8, W[n] = s[n] q[n] + R[n]; a step quantizes x the same way away from its
// largest entries (x = sx xq + e there, exact at the outliers), reads only the int8 rows (0.67x the coded head's
// bytes) and bounds every logit, |W[n] . x - a[n]| <= b[n]. Every row whose upper bound a + b falls below the
// best lower bound max(a - b) cannot be the argmax. The rows left (a median of 5 on SmolLM2) go through the
// exact decode GEMV with the pass size the full head's call would take, so their logits are bit for bit the
// full head's; rounded to bf16 as it rounds them, the first largest wins, as in argmax. The margin keeps any row
// whose logit could round to the same bf16 as the winner's. Where the screen cannot decide (a non-finite
// activation, too many rows left) it says so and the caller computes the full head. On SmolLM2: 1.39-1.90x the
// coded GEMV plus argmax at 1-4 rows (benchmarks/argmax_screen.py).
namespace {

// The rows of ArgmaxScreen.stats (kernels/argmax_screen.py, STATS), each float32 [Vp]
enum ScreenStat : int64_t { kScale = 0, kResidual2, kResidual1, kQuant2, kQuant1, kAbs1, kScreenStats };
constexpr int64_t kScreenCols = 64;  // int8 columns the screen pads K to
constexpr float kBoundSlack = 1e-5f;  // float32 bound arithmetic: b grows by this much of b and of |a|

// One activation row, quantized to unsigned bytes (xq + 128) but for its kOutliers largest entries, which
// the screen multiplies exactly (a final norm's output can hold one entry 5x the next: quantized with the
// rest it would coarsen every other entry's step, and the bounds, 5x). Norms rounded up.
constexpr int kOutliers = 8;

struct ScreenedRow {
  float sx = 1.f;                 // the quantization step of the rest
  float x2 = 0.f, xinf = 0.f;     // |rest|_2, |rest|_inf
  float o1 = 0.f, all_inf = 0.f;  // |outliers|_1, |x|_inf
  float e2 = 0.f, einf = 0.f;     // |e|_2, |e|_inf: the rest's rounding, e = rest - sx xq
  int outliers = 0;
  int32_t column[kOutliers] = {};
  float value[kOutliers] = {};
  bool finite = true;
};

float round_up(double v) { return static_cast<float>(v * (1.0 + 1e-6)); }

ScreenedRow quantize_row(const bf16* x, int64_t k, int64_t dp, uint8_t* xu) {
  std::vector<double> v(dp, 0.0);
  bool finite = true;
  for (int64_t j = 0; j < k; ++j) {
    v[j] = static_cast<float>(c10::bit_cast<at::BFloat16>(x[j]));
    finite = finite && std::isfinite(v[j]);
  }
  ScreenedRow r;
  r.finite = finite;
  if (!finite) return r;
  std::vector<int32_t> order(k);
  for (int64_t j = 0; j < k; ++j) order[j] = static_cast<int32_t>(j);
  r.outliers = static_cast<int>(std::min<int64_t>(kOutliers, k));
  std::partial_sort(order.begin(), order.begin() + r.outliers, order.end(),
                    [&](int32_t i, int32_t j) { return std::abs(v[i]) > std::abs(v[j]); });
  double o1 = 0.0, all_inf = 0.0;
  for (int i = 0; i < r.outliers; ++i) {
    r.column[i] = order[i];
    r.value[i] = static_cast<float>(v[order[i]]);  // a bf16: exact
    o1 += std::abs(v[order[i]]);
    all_inf = std::max(all_inf, std::abs(v[order[i]]));
    v[order[i]] = 0.0;
  }
  double xinf = 0.0, x2 = 0.0, e2 = 0.0, einf = 0.0;
  for (double t : v) {
    xinf = std::max(xinf, std::abs(t));
    x2 += t * t;
  }
  r.sx = xinf > 0 ? static_cast<float>(xinf / 127.0) : 1.f;  // the float32 the kernel multiplies by
  for (int64_t j = 0; j < dp; ++j) {
    const double xq = std::clamp(std::nearbyint(v[j] / r.sx), -127.0, 127.0);
    xu[j] = static_cast<uint8_t>(xq + 128.0);
    const double e = v[j] - static_cast<double>(r.sx) * xq;
    e2 += e * e;
    einf = std::max(einf, std::abs(e));
  }
  r.x2 = round_up(std::sqrt(x2));
  r.xinf = round_up(xinf);
  r.o1 = round_up(o1);
  r.all_inf = round_up(std::max(all_inf, xinf));
  r.e2 = round_up(std::sqrt(e2));
  r.einf = round_up(einf);
  return r;
}

// q in tiles of 16 rows, four columns at a time ([Vp/16, Kp/4, 16, 4] int8): one vpdpbusd multiplies four
// columns of 16 rows with the same four activation bytes (broadcast), and the 16 sums stay in the lanes of
// one register, so no row pays a horizontal reduction, and the bounds are 16 rows of vector arithmetic. For
// tiles [t0, t1): upper[m][n] = a + b, and best[m] the largest a - b of rows below v, where
//   a = s (sx (q . xq) + q[outliers] . x[outliers])
//   b = min(|R|_2 |rest|_2, |R|_1 |rest|_inf) + s/2 |x[outliers]|_1      (|R| <= s/2 entrywise)
//       + min(s|q|_2 |e|_2, s|q|_1 |e|_inf) + |W|_1 |x|_inf acc_error, grown by kBoundSlack
template <int MB>
void screen_tiles(const int8_t* q, const int32_t* qsum, const float* stats, const uint8_t* xu,
                  const ScreenedRow* xs, float acc_error, int64_t dp, int64_t v, int64_t vp, int64_t t0, int64_t t1,
                  float* upper, float* best) {
  __m512 top[MB];
  for (int m = 0; m < MB; ++m) top[m] = _mm512_set1_ps(-INFINITY);
  const auto stat = [stats, vp](ScreenStat i, int64_t n) { return _mm512_loadu_ps(stats + i * vp + n); };
  for (int64_t t = t0; t < t1; ++t) {
    const int8_t* tile = q + t * 16 * dp;
    __m512i acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t c = 0; c < dp; c += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(tile + c * 16) + kStreamPrefetchBytes, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(static_cast<const void*>(tile + c * 16));
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        int32_t four;
        std::memcpy(&four, xu + m * dp + c, sizeof(four));
        acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(four), w);
      }
    }
    const int64_t n = 16 * t;
    const __m512i qs = _mm512_slli_epi32(_mm512_loadu_si512(static_cast<const void*>(qsum + n)), 7);
    const __m512 scale = stat(kScale, n), r2 = stat(kResidual2, n), r1 = stat(kResidual1, n);
    const __m512 q2 = stat(kQuant2, n), q1 = stat(kQuant1, n), w1 = stat(kAbs1, n);
    const __mmask16 live = lanes16(v - n);
    for (int m = 0; m < MB; ++m) {
      const ScreenedRow& r = xs[m];
      const __m512i d = _mm512_sub_epi32(acc[m], qs);  // q . xq (xu = xq + 128): exact, |d| < 2^24
      const __m512 dx = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(r.sx));
      __m512 corr = _mm512_setzero_ps(), mag = _mm512_abs_ps(dx);
      for (int i = 0; i < r.outliers; ++i) {  // q[n, column] . x[column], 16 rows: byte column % 4 of each dword
        const int32_t col = r.column[i];
        const __m512i four = _mm512_loadu_si512(static_cast<const void*>(tile + (col & ~3) * 16));
        const __m512i qc = _mm512_sra_epi32(_mm512_sll_epi32(four, _mm_cvtsi32_si128(24 - 8 * (col & 3))),
                                            _mm_cvtsi32_si128(24));
        const __m512 term = _mm512_mul_ps(_mm512_cvtepi32_ps(qc), _mm512_set1_ps(r.value[i]));  // exact
        corr = _mm512_add_ps(corr, term);
        mag = _mm512_add_ps(mag, _mm512_abs_ps(term));
      }
      const __m512 a = _mm512_mul_ps(_mm512_add_ps(dx, corr), scale);
      __m512 b = _mm512_min_ps(_mm512_mul_ps(r2, _mm512_set1_ps(r.x2)), _mm512_mul_ps(r1, _mm512_set1_ps(r.xinf)));
      b = _mm512_fmadd_ps(scale, _mm512_set1_ps(0.5f * r.o1), b);
      b = _mm512_add_ps(b, _mm512_min_ps(_mm512_mul_ps(q2, _mm512_set1_ps(r.e2)),
                                         _mm512_mul_ps(q1, _mm512_set1_ps(r.einf))));
      b = _mm512_fmadd_ps(w1, _mm512_set1_ps(r.all_inf * acc_error), b);
      // float32 arithmetic of a and b: grow b by kBoundSlack of b and of the magnitudes summed into a
      b = _mm512_fmadd_ps(_mm512_fmadd_ps(mag, scale, b), _mm512_set1_ps(kBoundSlack),
                          _mm512_add_ps(b, _mm512_set1_ps(1e-30f)));
      _mm512_storeu_ps(upper + m * vp + n, _mm512_add_ps(a, b));
      top[m] = _mm512_mask_max_ps(top[m], live, top[m], _mm512_sub_ps(a, b));
    }
  }
  for (int m = 0; m < MB; ++m) best[m] = std::max(best[m], _mm512_reduce_max_ps(top[m]));
}

using ScreenFn = void (*)(const int8_t*, const int32_t*, const float*, const uint8_t*, const ScreenedRow*, float,
                          int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*);
constexpr ScreenFn kScreen[kMaxBlock] = {
    screen_tiles<1>, screen_tiles<2>, screen_tiles<3>, screen_tiles<4>,
    screen_tiles<5>, screen_tiles<6>, screen_tiles<7>, screen_tiles<8>,
};

// The exact GEMV's rows, gathered: chunk(i, c, mask) of candidate i is chunk(rows[i], c, mask) of the weight.
template <int MB, typename Chunk>
void exact_rows(const Chunk& chunk, const std::vector<int64_t>& rows, int64_t k, const bf16* x, float* out) {
  const auto gathered = [&](int64_t i, int64_t c, __mmask32 mask) { return chunk(rows[i], c, mask); };
  const auto count = static_cast<int64_t>(rows.size());
  chunk_rows<MB>(gathered, k, x, k, 0, count, out, count);
}

template <typename Chunk>
void exact_rows_for(int64_t mb, const Chunk& chunk, const std::vector<int64_t>& rows, int64_t k, const bf16* x,
                    float* out) {
  switch (mb) {  // the pass size of the full head's call: its sums, bit for bit
    case 1: return exact_rows<1>(chunk, rows, k, x, out);
    case 2: return exact_rows<2>(chunk, rows, k, x, out);
    case 3: return exact_rows<3>(chunk, rows, k, x, out);
    case 4: return exact_rows<4>(chunk, rows, k, x, out);
    case 5: return exact_rows<5>(chunk, rows, k, x, out);
    case 6: return exact_rows<6>(chunk, rows, k, x, out);
    case 7: return exact_rows<7>(chunk, rows, k, x, out);
    default: return exact_rows<8>(chunk, rows, k, x, out);
  }
}

// The rows whose upper bound reaches, for some activation row m, the best lower bound less the margin within
// which a logit could round to the winner's bf16 (bf16 spacing is at most 2^-7 |t|).
std::vector<int64_t> screen_candidates(const float* upper, const std::vector<float>& best_lower, int64_t v,
                                       int64_t vp) {
  const auto m_rows = static_cast<int64_t>(best_lower.size());
  std::vector<__m512> floor(m_rows);
  for (int64_t m = 0; m < m_rows; ++m) {
    const float t = best_lower[m];
    floor[m] = _mm512_set1_ps(t - std::ldexp(std::abs(t), -6) * (1.f + kBoundSlack) - 1e-30f);
  }
  std::vector<int64_t> rows;
  for (int64_t n = 0; n < v; n += 16) {
    const __mmask16 hit = lanes16(v - n);
    __mmask16 any = 0;
    for (int64_t m = 0; m < m_rows; ++m)
      any |= _mm512_mask_cmp_ps_mask(hit, _mm512_loadu_ps(upper + m * vp + n), floor[m], _CMP_GE_OQ);
    for (uint32_t bits = any; bits != 0; bits &= bits - 1) rows.push_back(n + __builtin_ctz(bits));
  }
  return rows;
}

}  // namespace

// x [M, K] bf16 (M <= 8), the screen (q int8 [Vp/16, Kp/4, 16, 4], qsum int32 [Vp], stats float32 [6, Vp]) and
// the head's exact decode weight ({w} row-major bf16 [V, K], or {low, codes, table} exponent-coded) -> int64
// [M]: the index of each row's largest bf16 logit (the first of equals), or -1 in every row where the screen
// cannot decide (the caller then computes the head).
torch::Tensor screened_argmax(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& qsum,
                              const torch::Tensor& stats, const std::vector<torch::Tensor>& exact, int64_t vocab,
                              int64_t max_candidates) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.size(0) >= 1 &&
                  x.size(0) <= kMaxBlock,
              "x must be contiguous bfloat16 [M, K] with 1 <= M <= ", kMaxBlock);
  const int64_t m_rows = x.size(0), k = x.size(1), v = vocab;
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(2) == 16 &&
                  q.size(3) == 4 && q.size(0) == (v + 15) / 16 && q.size(1) * 4 % kScreenCols == 0 &&
                  q.size(1) * 4 >= k && q.size(1) * 4 < k + kScreenCols,
              "q must be contiguous int8 [ceil(V/16), Kp/4, 16, 4] (Kp: K padded to a multiple of 64)");
  const int64_t dp = q.size(1) * 4, vp = q.size(0) * 16;
  TORCH_CHECK(qsum.dim() == 1 && qsum.scalar_type() == torch::kInt32 && qsum.size(0) == vp && qsum.is_contiguous(),
              "qsum must be contiguous int32 [V padded to a multiple of 16]");
  TORCH_CHECK(stats.dim() == 2 && stats.scalar_type() == torch::kFloat32 && stats.size(0) == kScreenStats &&
                  stats.size(1) == vp && stats.is_contiguous(),
              "stats must be contiguous float32 [", kScreenStats, ", V padded to a multiple of 16]");
  TORCH_CHECK(exact.size() == 1 || exact.size() == 3, "exact must be {w} or {low, codes, table}");
  auto ids = torch::full({m_rows}, -1, x.options().dtype(torch::kInt64));
  const auto* xb = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  std::vector<uint8_t> xu(m_rows * dp);
  std::vector<ScreenedRow> xs(m_rows);
  for (int64_t m = 0; m < m_rows; ++m) {
    xs[m] = quantize_row(xb + m * k, k, dp, xu.data() + m * dp);
    if (!xs[m].finite) return ids;
  }
  const auto acc_error = static_cast<float>(2.0 * static_cast<double>(k + 64) * std::ldexp(1.0, -24));
  auto upper = empty_cpu({m_rows, vp}, x.options().dtype(torch::kFloat32));
  float* up = upper.data_ptr<float>();
  std::vector<float> lower(at::get_num_threads() * m_rows, -INFINITY);  // per thread, per activation row
  at::parallel_for(0, vp / 16, 16, [&](int64_t t0, int64_t t1) {
    kScreen[m_rows - 1](q.data_ptr<int8_t>(), qsum.data_ptr<int32_t>(), stats.data_ptr<float>(), xu.data(), xs.data(),
                        acc_error, dp, v, vp, t0, t1, up, lower.data() + at::get_thread_num() * m_rows);
  });
  std::vector<float> best_lower(m_rows, -INFINITY);
  for (size_t i = 0; i < lower.size(); ++i) best_lower[i % m_rows] = std::max(best_lower[i % m_rows], lower[i]);
  for (float t : best_lower)
    if (!std::isfinite(t)) return ids;
  const std::vector<int64_t> rows = screen_candidates(up, best_lower, v, vp);
  if (rows.empty() || static_cast<int64_t>(rows.size()) > max_candidates) return ids;
  std::vector<float> sums(m_rows * rows.size());
  if (exact.size() == 1) {
    const torch::Tensor& w = exact[0];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(0) == v &&
                    w.size(1) == k,
                "w must be contiguous bfloat16 [V, K]");
    exact_rows_for(m_rows, dense_chunks(reinterpret_cast<const bf16*>(w.data_ptr<at::BFloat16>()), k), rows, k, xb,
                   sums.data());
  } else {
    const torch::Tensor &low = exact[0], &codes = exact[1], &table = exact[2];
    check_coded(low, codes, table, k);
    TORCH_CHECK(low.size(0) == v, "low must have the head's V = ", v, " rows");
    const CodedTables tab = coded_tables(table);
    exact_rows_for(m_rows, coded_chunks(low.data_ptr<uint8_t>(), codes.data_ptr<uint8_t>(), tab, k), rows, k, xb,
                   sums.data());
  }
  auto* out = ids.data_ptr<int64_t>();
  const auto count = static_cast<int64_t>(rows.size());
  for (int64_t m = 0; m < m_rows; ++m) {  // bf16 logits as the head stores them; the first largest wins
    int64_t best = -1;
    float best_value = 0.f;
    for (int64_t i = 0; i < count; ++i) {
      const float value = static_cast<float>(static_cast<at::BFloat16>(sums[m * count + i] + 0.f));
      if (best < 0 || value > best_value) {
        best = i;
        best_value = value;
      }
    }
    out[m] = rows[best];
  }
  return ids;
}

#ifndef SPARSE_SERVE_NO_MODULE  // decoder.cpp links this file's functions into its own module
// The many-row calls (prompt chunks: milliseconds to seconds) release the GIL, so the server's HTTP thread
// answers meanwhile; the decode-step calls (and decoder.cpp's run) keep it: released there, the HTTP thread
// took a core from the kernel's two threads mid-step, and a 70%-sparse SmolLM2 decoded 3.5% slower at
// concurrency 1 through the server (TPOT 5.24 against 5.06 ms, A/B of two builds, two runs each).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitmask_gemm_decode", &bitmask_gemm_decode, "y = x W^T + b, W packed bitmask (AVX-512 BF16)",
        py::arg("x"), py::arg("masks"), py::arg("values"), py::arg("row_offsets"), py::arg("bias"),
        py::arg("loops"));
  m.def("bitmask_gemm_pairs", &bitmask_gemm_pairs, py::call_guard<py::gil_scoped_release>(),
        "y = x W^T + b, W packed bitmask, many rows of x (pair gather)",
        py::arg("x"), py::arg("masks"), py::arg("values"), py::arg("row_offsets"), py::arg("bias"));
  m.def("bitmask_gemm_panels", &bitmask_gemm_panels, py::call_guard<py::gil_scoped_release>(),
        "y = x W^T + b, W packed bitmask, a few dozen rows of x (panels)",
        py::arg("x"), py::arg("masks"), py::arg("values"), py::arg("row_offsets"), py::arg("bias"));
  m.def("dense_gemm_decode", &dense_gemm_decode, "y = x W^T + b for a few rows of x, W dense bf16 (AVX-512 BF16)");
  m.def("coded_gemm_decode", &coded_gemm_decode,
        "y = x W^T + b for a few rows of x, W bf16 in the exponent-coded layout (bit for bit dense_gemm_decode)");
  m.def("bitmask_decompress_into", &bitmask_decompress_into, py::call_guard<py::gil_scoped_release>(),
        "dense bf16 rows of a packed bitmask weight");
  m.def("bitmask_decompress_blocked", &bitmask_decompress_blocked, py::call_guard<py::gil_scoped_release>(),
        "a packed bitmask weight written into a buffer in oneDNN's blocked form");
  m.def("blocked_weight_view", &blocked_weight_view, "an oneDNN weight over a buffer's memory");
  m.def("mkldnn_bytes", &mkldnn_bytes, "the first bytes of an oneDNN tensor's memory");
  m.def("dense_gemm_blocked", &dense_gemm_blocked,
        "y = x W^T + b for a few dozen rows of x, W oneDNN's prepacked bf16 weight in the blocked form",
        py::arg("x"), py::arg("weight"), py::arg("pairs"), py::arg("bias"));
  m.def("screened_argmax", &screened_argmax,
        "the index of the largest bf16 logit of x W^T per row, W screened in int8 (-1 where undecided)",
        py::arg("x"), py::arg("q"), py::arg("qsum"), py::arg("stats"), py::arg("exact"), py::arg("vocab"),
        py::arg("max_candidates"));
}
#endif
