// Paged decode attention on CPU: the `cpu` backend of metalm_fast.paged_decode_attention.
//
//   _paged_decode_attention_cpu(q, k_cache, v_cache, block_table, seq_lens, scale) -> out
//
// One query token per sequence: q [B, Hq, D]; caches [num_blocks, block_size,
// Hkv, D]; key p of sequence b lives in page block_table[b, p / block_size] at
// row p % block_size, for p < seq_lens[b]. out [B, Hq, D] in q's dtype:
//
//   out[b, h] = sum_p softmax_p(scale * q[b, h] . k_p) v_p     (0 when seq_lens[b] == 0)
//
// Work items are (sequence, split of its keys). An item walks its keys in tiles
// of kTile and serves every head, so each key and value row is read from
// memory once, for all Hq / Hkv query heads that share it (GQA):
//
//   1. copy the tile's rows through the block table into head-major scratch
//      tiles [Hkv, kTile, dp] (dp = D rounded up to 16, zero-padded; half types
//      widened to fp32). A page is read front to back, all heads of a key at
//      once, and the next tile's rows are prefetched (pages are in arbitrary
//      order, which defeats the hardware prefetcher). Any block size works; a
//      page id outside [0, num_blocks) is skipped, never dereferenced;
//   2. per kv head: scores S[g, j] = q_g . k_j (q pre-scaled), four query heads
//      per pass over a key row, their lanes reduced together by a shuffle tree;
//   3. online softmax per query head (running max m, sum l; acc rescaled by
//      exp(m_old - m_new)); exp is the vectorisable polynomial of
//      span_attention_rows.h;
//   4. acc[g] += sum_j P[g, j] v_j, each value vector loaded once for four heads.
//
// Threads: one per kMinElementsPerThread cached elements (a small step runs on
// the calling thread: a parallel region costs more than it saves there, and
// stalls when another process holds a core). Flash-decoding on CPU: when B
// items cannot keep the workers busy (one long sequence during generation),
// each sequence is also split into chunks of >= kMinSplitKeys keys; items write
// (m, l, acc) partials and a second pass merges them:
//   M = max_s m_s,  out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s.
// With one split an item writes out directly. Workers pull items longest first
// from an atomic counter.
//
// Accumulation is fp32 for fp32/fp16/bf16 and fp64 for fp64. The float tile
// step is compiled for AVX-512, AVX2+FMA and baseline x86-64 (target_clones)
// and the loader picks one. Lengths are clamped to [0, max_blocks *
// block_size], so no index is ever read past the block table, whatever
// seq_lens holds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "span_attention_rows.h"

namespace metalm_fast::cpu {
namespace {

constexpr int64_t kTile = 64;           // keys per online-softmax step
constexpr int64_t kBlock = 16;          // keys per score vector (one lane each)
constexpr int64_t kLanes = 16;          // floats per vector (AVX-512); tiles pad D to this
constexpr int64_t kMinSplitKeys = 256;  // a split shorter than this is not worth a merge
constexpr int64_t kItemsPerThread = 4;  // splits are added until items >= this * workers
constexpr int64_t kMinElementsPerThread = 1 << 18;  // K + V elements (1 MiB of fp32) per thread

template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ----------------------------------------------------------------------------- tile math
// A tile is up to kTile keys of one sequence, given as row pointers: key j of kv
// head h is k_rows[j] + h * k_head_stride (likewise for values), D = dp
// contiguous elements (dp = D rounded up to kLanes). On the in-place path the
// pointers point into the cache pages; on the staged path into a zero-padded
// copy. k_rows is padded to a multiple of kBlock entries with a valid row: the
// scores of those lanes are computed and never read.

// Online-softmax update for `group` query heads over one tile of scores
// ([group, kTile]; on exit P = exp(S - m_new)); rescales acc rows ([group, dp]).
template <typename T>
METALM_ALWAYS_INLINE void softmax_update(T* scores, int64_t group, int64_t rows, T* m, T* l,
                                         T* acc, int64_t dp) {
  for (int64_t g = 0; g < group; ++g) {
    T* s = scores + g * kTile;
    T tile_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < rows; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
    const T new_max = std::max(m[g], tile_max);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < rows; ++j) {
      const T p = rows::exp_of(s[j] - new_max);
      s[j] = p;
      sum += p;
    }
    if (new_max != m[g]) {
      // m == -inf before the first tile: acc and l are 0, so the factor is 0 (no inf - inf).
      const T alpha = m[g] == -std::numeric_limits<T>::infinity() ? T(0)
                                                                  : std::exp(m[g] - new_max);
      T* a = acc + g * dp;
#pragma omp simd
      for (int64_t d = 0; d < dp; ++d) a[d] *= alpha;
      l[g] *= alpha;
      m[g] = new_max;
    }
    l[g] += sum;
  }
}

// float: GCC vector extensions, which every target_clones clone lowers to its
// own ISA (one zmm, two ymm or four xmm per f32x16).
using f32x16 = float __attribute__((vector_size(kLanes * sizeof(float))));

METALM_ALWAYS_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

METALM_ALWAYS_INLINE void store16(float* p, f32x16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

using i32x16 = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

// rows::exp_approx on 16 lanes (the same polynomial and the same results).
METALM_ALWAYS_INLINE f32x16 exp16(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.3f, hi = f32x16{} + 88.3f;
  const f32x16 clamped = x < lo ? lo : (x > hi ? hi : x);
  const f32x16 n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  f32x16 r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;  // 2^n
  const f32x16 result = p * reinterpret_cast<const f32x16&>(bits);
  return x < lo ? f32x16{} : result;
}

METALM_ALWAYS_INLINE float max16(f32x16 v) {
  v = v > __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
          ? v : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v > __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
          ? v : __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v > __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
          ? v : __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = v > __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
          ? v : __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// Lanes summed pairwise (8 + 8, 4 + 4, ...): the same rounding on every ISA.
METALM_ALWAYS_INLINE float sum16(f32x16 v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// softmax_update for float on whole vectors: lanes at or past `rows` (scores of
// padding rows) are excluded from the max and get probability 0.
METALM_ALWAYS_INLINE void softmax_update(float* scores, int64_t group, int64_t rows, float* m,
                                         float* l, float* acc, int64_t dp) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * kTile;
    f32x16 block_max = f32x16{} + kNegInf;
    for (int64_t j = 0; j < rows; j += kBlock) {
      const f32x16 v = load16(s + j);
      const f32x16 live = lane < static_cast<int32_t>(rows - j) ? v : f32x16{} + kNegInf;
      block_max = block_max > live ? block_max : live;
    }
    const float new_max = std::max(m[g], max16(block_max));
    f32x16 sums = {};
    for (int64_t j = 0; j < rows; j += kBlock) {
      const f32x16 e = exp16(load16(s + j) - new_max);
      const f32x16 p = lane < static_cast<int32_t>(rows - j) ? e : f32x16{};
      store16(s + j, p);
      sums += p;
    }
    if (new_max != m[g]) {
      // m == -inf before the first tile: acc and l are 0, so the factor is 0 (no inf - inf).
      const float alpha = m[g] == kNegInf ? 0.0f : std::exp(m[g] - new_max);
      float* a = acc + g * dp;
      for (int64_t d = 0; d < dp; d += kLanes) store16(a + d, load16(a + d) * alpha);
      l[g] *= alpha;
      m[g] = new_max;
    }
    l[g] += sum16(sums);
  }
}

// The transposing reduction of 16 per-key product vectors into one vector of 16
// scores (lane j = key j), four levels of "add the two halves of every block of
// both inputs": 15 two-source shuffle pairs for 16 keys, about 3 instructions
// per key, against 8 dependent ones for a horizontal sum per key.
// Level 1: x, y hold one key each (16 partials) -> lanes 0-7 key x, 8-15 key y.
METALM_ALWAYS_INLINE f32x16 fold1(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
// Level 2: blocks of 8 (two keys each) -> blocks of 4, keys in order.
METALM_ALWAYS_INLINE f32x16 fold2(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                 31);
}
// Level 3: blocks of 4 -> blocks of 2.
METALM_ALWAYS_INLINE f32x16 fold3(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                 31);
}
// Level 4: blocks of 2 -> one lane per key.
METALM_ALWAYS_INLINE f32x16 fold4(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// One query row: with ND > 0 its ND vectors stay in registers across a tile
// (D = 16 * ND); ND == 0 reads them from memory (any dp).
template <int ND>
struct QueryRow {
  f32x16 v[ND > 0 ? ND : 1];
  const float* q;
  int64_t dp;
  METALM_ALWAYS_INLINE QueryRow(const float* q_row, int64_t padded) : q(q_row), dp(padded) {
    if constexpr (ND > 0)
      for (int i = 0; i < ND; ++i) v[i] = load16(q_row + i * kLanes);
  }
  // Elementwise products q * k summed over the row's vectors (a horizontal sum away
  // from q . k).
  METALM_ALWAYS_INLINE f32x16 products(const float* k) const {
    if constexpr (ND > 0) {
      f32x16 a = v[0] * load16(k);
      for (int i = 1; i < ND; ++i) a += v[i] * load16(k + i * kLanes);
      return a;
    } else {
      f32x16 a = load16(q) * load16(k);
      for (int64_t d = kLanes; d < dp; d += kLanes) a += load16(q + d) * load16(k + d);
      return a;
    }
  }
};

// Scores of one query row against keys rows[0, 16) (each + offset), lane j = key j.
// The tree is built as the products arrive, so few vectors are live at once.
template <int ND>
METALM_ALWAYS_INLINE f32x16 scores16(const QueryRow<ND>& q, const float* const* rows,
                                     int64_t offset) {
  f32x16 quarter[4];
  for (int i = 0; i < 4; ++i) {
    const float* const* r = rows + 4 * i;
    const f32x16 a = fold1(q.products(r[0] + offset), q.products(r[1] + offset));
    const f32x16 b = fold1(q.products(r[2] + offset), q.products(r[3] + offset));
    quarter[i] = fold2(a, b);
  }
  return fold4(fold3(quarter[0], quarter[1]), fold3(quarter[2], quarter[3]));
}

// acc[i, 0 : 16 NC] += sum_j P[i, j] v_j for NQ query rows: each value vector is
// loaded once and feeds NQ accumulators that stay in registers across the tile.
// Keys alternate between U sets of accumulators, so that NQ * NC * U >= 8 FMA
// chains run side by side (one chain waits 4 cycles per key: latency, not work).
template <int NQ, int NC>
METALM_ALWAYS_INLINE void accumulate(const float* probs, const float* const* v_rows,
                                     int64_t offset, int64_t rows, int64_t dp, float* acc) {
  constexpr int U = NQ * NC >= 8 ? 1 : 8 / (NQ * NC);
  f32x16 a[U][NQ][NC] = {};
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < NC; ++c) a[0][i][c] = load16(acc + i * dp + c * kLanes);
  int64_t j = 0;
  for (; j + U <= rows; j += U) {
    for (int u = 0; u < U; ++u) {
      const float* v_row = v_rows[j + u] + offset;
      f32x16 v[NC];
      for (int c = 0; c < NC; ++c) v[c] = load16(v_row + c * kLanes);
      for (int i = 0; i < NQ; ++i) {
        const float p = probs[i * kTile + j + u];
        for (int c = 0; c < NC; ++c) a[u][i][c] += p * v[c];
      }
    }
  }
  for (; j < rows; ++j) {
    const float* v_row = v_rows[j] + offset;
    for (int i = 0; i < NQ; ++i) {
      const float p = probs[i * kTile + j];
      for (int c = 0; c < NC; ++c) a[0][i][c] += p * load16(v_row + c * kLanes);
    }
  }
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < NQ; ++i)
      for (int c = 0; c < NC; ++c) a[0][i][c] += a[u][i][c];
  for (int i = 0; i < NQ; ++i)
    for (int c = 0; c < NC; ++c) store16(acc + i * dp + c * kLanes, a[0][i][c]);
}

// The value pass over columns [0, dp) for NQ query rows, widest register blocks first.
template <int NQ>
METALM_ALWAYS_INLINE void accumulate_row_block(const float* probs, const float* const* v_rows,
                                               int64_t offset, int64_t rows, int64_t dp,
                                               float* acc) {
  constexpr int kWide = NQ == 1 ? 4 : 2;
  int64_t d = 0;
  for (; d + kWide * kLanes <= dp; d += kWide * kLanes)
    accumulate<NQ, kWide>(probs, v_rows, offset + d, rows, dp, acc + d);
  if (d + 2 * kLanes <= dp) {
    accumulate<NQ, 2>(probs, v_rows, offset + d, rows, dp, acc + d);
    d += 2 * kLanes;
  }
  if (d < dp) accumulate<NQ, 1>(probs, v_rows, offset + d, rows, dp, acc + d);
}

// One tile for the `group` query heads of one kv head: q [group, dp], key and value
// rows (+ offsets), scores [group, kTile] scratch, m and l [group], acc [group, dp].
template <int ND>
METALM_ALWAYS_INLINE void tile_step_impl(const float* q, int64_t group, int64_t dp,
                                         const float* const* k_rows, int64_t k_offset,
                                         const float* const* v_rows, int64_t v_offset,
                                         int64_t rows, float* scores, float* m, float* l,
                                         float* acc) {
  for (int64_t g = 0; g < group; ++g) {
    const QueryRow<ND> q_row(q + g * dp, dp);
    for (int64_t j = 0; j < rows; j += kBlock)
      store16(scores + g * kTile + j, scores16(q_row, k_rows + j, k_offset));
  }
  softmax_update(scores, group, rows, m, l, acc, dp);
  int64_t g = 0;
  for (; g + 4 <= group; g += 4)
    accumulate_row_block<4>(scores + g * kTile, v_rows, v_offset, rows, dp, acc + g * dp);
  for (; g < group; ++g)
    accumulate_row_block<1>(scores + g * kTile, v_rows, v_offset, rows, dp, acc + g * dp);
}

METALM_CPU_CLONES static void tile_step(const float* q, int64_t group, int64_t dp,
                                        const float* const* k_rows, int64_t k_offset,
                                        const float* const* v_rows, int64_t v_offset,
                                        int64_t rows, float* scores, float* m, float* l,
                                        float* acc) {
  // Small head dims keep q in registers; the common ones get their own copy.
  switch (dp / kLanes) {
    case 1:
      return tile_step_impl<1>(q, group, dp, k_rows, k_offset, v_rows, v_offset, rows, scores,
                               m, l, acc);
    case 2:
      return tile_step_impl<2>(q, group, dp, k_rows, k_offset, v_rows, v_offset, rows, scores,
                               m, l, acc);
    case 4:
      return tile_step_impl<4>(q, group, dp, k_rows, k_offset, v_rows, v_offset, rows, scores,
                               m, l, acc);
    default:
      return tile_step_impl<0>(q, group, dp, k_rows, k_offset, v_rows, v_offset, rows, scores,
                               m, l, acc);
  }
}

// double (tests and debugging): the same steps as plain loops.
static void tile_step(const double* q, int64_t group, int64_t dp, const double* const* k_rows,
                      int64_t k_offset, const double* const* v_rows, int64_t v_offset,
                      int64_t rows, double* scores, double* m, double* l, double* acc) {
  for (int64_t g = 0; g < group; ++g)
    for (int64_t j = 0; j < rows; ++j) {
      const double* k = k_rows[j] + k_offset;
      double s = 0;
      for (int64_t d = 0; d < dp; ++d) s += q[g * dp + d] * k[d];
      scores[g * kTile + j] = s;
    }
  softmax_update(scores, group, rows, m, l, acc, dp);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t j = 0; j < rows; ++j) {
      const double p = scores[g * kTile + j];
      const double* v = v_rows[j] + v_offset;
      for (int64_t d = 0; d < dp; ++d) acc[g * dp + d] += p * v[d];
    }
}

// ----------------------------------------------------------------------------- problem
struct CacheView {
  const void* data;
  int64_t block_stride, row_stride, head_stride;  // elements
};

struct Problem {
  int64_t batch, q_heads, kv_heads, group, head_dim, padded_dim;
  int64_t num_blocks, block_size, max_blocks;
  CacheView k, v;
  const int32_t* block_table;  // [batch, max_blocks], contiguous
  std::vector<int64_t> lengths;  // clamped to [0, max_blocks * block_size]
  int64_t split_keys;  // keys per split
  int64_t splits;      // splits of the longest sequence
};

struct Item {
  int64_t batch, split, first_key, last_key;
};

// This tile's key and value rows, for every kv head (see tile math).
template <typename T>
struct TileRows {
  std::vector<const T*> k, v;  // [kTile + kBlock]
  int64_t count = 0;
  TileRows() : k(kTile + kBlock), v(kTile + kBlock) {}
};

// Per-thread scratch, allocated once per call. staged_k / staged_v ([kTile, Hkv, dp],
// padding columns zero) exist only on the staged path.
template <typename T>
struct Scratch {
  std::vector<T> q, staged_k, staged_v, scores, m, l, acc;
  TileRows<T> tiles[2];  // the tile being computed and the next one (in place)
  Scratch(const Problem& p, bool staged)
      : q(p.q_heads * p.padded_dim),
        staged_k(staged ? kTile * p.kv_heads * p.padded_dim : 0),
        staged_v(staged ? kTile * p.kv_heads * p.padded_dim : 0), scores(p.group * kTile),
        m(p.q_heads), l(p.q_heads), acc(p.q_heads * p.padded_dim) {}
};

// Reading keys and values straight from the pages needs the compute type and
// whole vectors (D a multiple of kLanes); anything else is staged.
template <typename scalar_t>
bool reads_in_place(const Problem& p) {
  return std::is_same_v<scalar_t, compute_t<scalar_t>> && p.head_dim == p.padded_dim;
}

// dst[0, n) = src[0, n) in the compute type: a memcpy when the types match.
template <typename T, typename scalar_t>
inline void widen_row(T* dst, const scalar_t* src, int64_t n) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d]);
  }
}

static int prefetch_mode() {
  static const int mode = [] {
    const char* env = std::getenv("PDA_PREFETCH");
    return env ? std::atoi(env) : 3;
  }();
  return mode;
}

// Prefetch `bytes` from each row start (+ offset elements) of a tile's rows.
template <typename T>
METALM_ALWAYS_INLINE void prefetch_tile(const TileRows<T>& tile, int64_t k_offset,
                                        int64_t v_offset, int64_t bytes, int level) {
  for (int64_t j = 0; j < tile.count; ++j) {
    const char* k = reinterpret_cast<const char*>(tile.k[j] + k_offset);
    const char* v = reinterpret_cast<const char*>(tile.v[j] + v_offset);
    for (int64_t byte = 0; byte < bytes; byte += 64) {
      if (level == 3) {
        __builtin_prefetch(k + byte, 0, 3);
        __builtin_prefetch(v + byte, 0, 3);
      } else {
        __builtin_prefetch(k + byte, 0, 2);
        __builtin_prefetch(v + byte, 0, 2);
      }
    }
  }
}

// Fills `tile` with the rows of keys [first, last) of one sequence (keys on an
// invalid page are left out). In place, a row pointer is the key's row in its page
// (all heads; head h at h * head_stride). Staged, the row is widened into
// [kTile, Hkv, dp] scratch, read front to back. k is padded to a multiple of
// kBlock with the first row (see tile math).
template <typename scalar_t, typename T>
void collect_rows(const Problem& p, const Item& item, int64_t first, int64_t last,
                  bool in_place, Scratch<T>& scratch, TileRows<T>& tile) {
  const int32_t* pages = p.block_table + item.batch * p.max_blocks;
  const auto* k_base = static_cast<const scalar_t*>(p.k.data);
  const auto* v_base = static_cast<const scalar_t*>(p.v.data);
  const int64_t staged_row = p.kv_heads * p.padded_dim;
  int64_t rows = 0;
  for (int64_t key = first; key < last; ++key) {
    const int64_t page = pages[key / p.block_size];
    if (page < 0 || page >= p.num_blocks) continue;
    const int64_t offset = key % p.block_size;
    const scalar_t* k_row = k_base + page * p.k.block_stride + offset * p.k.row_stride;
    const scalar_t* v_row = v_base + page * p.v.block_stride + offset * p.v.row_stride;
    if constexpr (std::is_same_v<scalar_t, T>) {
      if (in_place) {
        tile.k[rows] = k_row;
        tile.v[rows] = v_row;
        ++rows;
        continue;
      }
    }
    T* k_dst = scratch.staged_k.data() + rows * staged_row;
    T* v_dst = scratch.staged_v.data() + rows * staged_row;
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      widen_row(k_dst + h * p.padded_dim, k_row + h * p.k.head_stride, p.head_dim);
      widen_row(v_dst + h * p.padded_dim, v_row + h * p.v.head_stride, p.head_dim);
    }
    tile.k[rows] = k_dst;
    tile.v[rows] = v_dst;
    ++rows;
  }
  for (int64_t j = rows; j % kBlock != 0; ++j) tile.k[j] = tile.k[0];
  tile.count = rows;
}

// Runs one item (a sequence's keys [first_key, last_key), every head); leaves
// (m, l, acc) of all Hq query heads in the scratch.
template <typename scalar_t, typename T>
void run_item(const Problem& p, const Item& item, const at::Tensor& q, double scale,
              bool in_place, Scratch<T>& scratch) {
  const int64_t dp = p.padded_dim;
  for (int64_t h = 0; h < p.q_heads; ++h) {
    const scalar_t* q_row =
        q.const_data_ptr<scalar_t>() + item.batch * q.stride(0) + h * q.stride(1);
    for (int64_t d = 0; d < p.head_dim; ++d)
      scratch.q[h * dp + d] = static_cast<T>(static_cast<T>(q_row[d]) * scale);
  }
  std::fill(scratch.m.begin(), scratch.m.end(), -std::numeric_limits<T>::infinity());
  std::fill(scratch.l.begin(), scratch.l.end(), T(0));
  std::fill(scratch.acc.begin(), scratch.acc.end(), T(0));
  const int64_t k_head_stride = in_place ? p.k.head_stride : dp;
  const int64_t v_head_stride = in_place ? p.v.head_stride : dp;
  const int mode = prefetch_mode();
  const int64_t head_bytes = p.head_dim * static_cast<int64_t>(sizeof(T));
  int current = 0;
  if (in_place)
    collect_rows<scalar_t>(p, item, item.first_key,
                           std::min(item.first_key + kTile, item.last_key), in_place, scratch,
                           scratch.tiles[0]);
  for (int64_t first = item.first_key; first < item.last_key; first += kTile) {
    const int64_t last = std::min(first + kTile, item.last_key);
    TileRows<T>& tile = scratch.tiles[current];
    TileRows<T>& next = scratch.tiles[1 - current];
    if (in_place) {
      next.count = 0;
      if (last < item.last_key)
        collect_rows<scalar_t>(p, item, last, std::min(last + kTile, item.last_key), in_place,
                               scratch, next);
      if (mode == 1 || mode == 4)
        prefetch_tile(next, 0, 0, p.kv_heads * head_bytes, mode == 1 ? 3 : 2);
    } else {
      collect_rows<scalar_t>(p, item, first, last, in_place, scratch, tile);
    }
    if (tile.count == 0) { current = 1 - current; continue; }
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      const int64_t g0 = h * p.group;
      if (in_place && (mode == 2 || mode == 3))
        prefetch_tile(next, h * k_head_stride, h * v_head_stride, head_bytes, mode == 2 ? 3 : 2);
      tile_step(scratch.q.data() + g0 * dp, p.group, dp, tile.k.data(), h * k_head_stride,
                tile.v.data(), h * v_head_stride, tile.count, scratch.scores.data(),
                scratch.m.data() + g0, scratch.l.data() + g0, scratch.acc.data() + g0 * dp);
    }
    if (in_place) current = 1 - current;
  }
}

// out[b, h] = acc / l for every query head of one item (zeros when it saw no key).
template <typename scalar_t, typename T>
void write_final(const Problem& p, const Item& item, const Scratch<T>& scratch, at::Tensor& out) {
  scalar_t* dst = out.data_ptr<scalar_t>() + item.batch * p.q_heads * p.head_dim;
  for (int64_t h = 0; h < p.q_heads; ++h) {
    const T l = scratch.l[h];
    const T inv = l > 0 ? T(1) / l : T(0);
    for (int64_t d = 0; d < p.head_dim; ++d)
      dst[h * p.head_dim + d] = static_cast<scalar_t>(scratch.acc[h * p.padded_dim + d] * inv);
  }
}

// Partials of every split: ml [B, Hq, splits, 2] and acc [B, Hq, splits, D].
template <typename T>
struct Partials {
  std::vector<T> ml, acc;
  int64_t q_heads, splits;
  explicit Partials(const Problem& p)
      : ml(p.splits > 1 ? p.batch * p.q_heads * p.splits * 2 : 0),
        acc(p.splits > 1 ? p.batch * p.q_heads * p.splits * p.head_dim : 0),
        q_heads(p.q_heads), splits(p.splits) {}
  int64_t index(int64_t b, int64_t h, int64_t s) const { return (b * q_heads + h) * splits + s; }
};

template <typename T>
void store_partial(const Problem& p, const Item& item, const Scratch<T>& scratch,
                   Partials<T>& partials) {
  for (int64_t h = 0; h < p.q_heads; ++h) {
    const int64_t i = partials.index(item.batch, h, item.split);
    partials.ml[2 * i] = scratch.m[h];
    partials.ml[2 * i + 1] = scratch.l[h];
    std::copy_n(scratch.acc.data() + h * p.padded_dim, p.head_dim,
                partials.acc.data() + i * p.head_dim);
  }
}

// Second pass of flash-decoding: merge the splits of every (sequence, query head).
template <typename scalar_t, typename T>
void merge_partials(const Problem& p, const Partials<T>& partials, at::Tensor& out) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, p.batch * p.q_heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(p.head_dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
      const int64_t used = (p.lengths[b] + p.split_keys - 1) / p.split_keys;
      T max_m = kNegInf;
      for (int64_t s = 0; s < used; ++s) {
        const int64_t i = partials.index(b, h, s);
        if (partials.ml[2 * i + 1] > 0) max_m = std::max(max_m, partials.ml[2 * i]);
      }
      std::fill(sum.begin(), sum.end(), T(0));
      T total = 0;
      for (int64_t s = 0; s < used && max_m > kNegInf; ++s) {
        const int64_t i = partials.index(b, h, s);
        if (!(partials.ml[2 * i + 1] > 0)) continue;  // a split whose pages were all invalid
        const T weight = std::exp(partials.ml[2 * i] - max_m);
        total += weight * partials.ml[2 * i + 1];
        const T* acc = partials.acc.data() + i * p.head_dim;
        for (int64_t d = 0; d < p.head_dim; ++d) sum[d] += weight * acc[d];
      }
      const T inv = total > 0 ? T(1) / total : T(0);
      scalar_t* dst = out.data_ptr<scalar_t>() + bh * p.head_dim;
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = static_cast<scalar_t>(sum[d] * inv);
    }
  });
}

// Items (sequence, split) with at least one key, longest first.
std::vector<Item> plan_items(const Problem& p) {
  std::vector<Item> items;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t first = 0, s = 0; first < p.lengths[b]; first += p.split_keys, ++s)
      items.push_back({b, s, first, std::min(first + p.split_keys, p.lengths[b])});
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.last_key - a.first_key > b.last_key - b.first_key;
  });
  return items;
}

// Threads worth waking: one per kMinElementsPerThread cached elements read. A
// decode step of a small model reads a few hundred KiB; a parallel region
// costs more than that when a core is busy elsewhere (the barrier then waits
// for a descheduled thread), so small steps run on the calling thread.
int64_t choose_workers(const Problem& p) {
  int64_t keys = 0;
  for (const int64_t length : p.lengths) keys += length;
  const int64_t elements = 2 * keys * p.kv_heads * p.head_dim;
  const int64_t wanted = (elements + kMinElementsPerThread - 1) / kMinElementsPerThread;
  return std::clamp<int64_t>(wanted, 1, at::get_num_threads());
}

// Split only when B items leave workers idle, and never below kMinSplitKeys keys.
void choose_splits(Problem& p, int64_t workers) {
  const int64_t longest = *std::max_element(p.lengths.begin(), p.lengths.end());
  const int64_t wanted = workers == 1 ? 1 : (kItemsPerThread * workers + p.batch - 1) / p.batch;
  const int64_t most = std::max<int64_t>(1, longest / kMinSplitKeys);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, most);
  const int64_t per_split = (longest + splits - 1) / splits;
  p.split_keys = std::max<int64_t>(1, (per_split + kTile - 1) / kTile) * kTile;
  p.splits = std::max<int64_t>(1, (longest + p.split_keys - 1) / p.split_keys);
}

// Each worker pulls items (longest first) until none is left; with one split
// an item writes its rows of out, otherwise its partials, merged afterwards.
template <typename scalar_t, typename T>
void run_items(const Problem& p, const std::vector<Item>& items, const at::Tensor& q,
               double scale, Partials<T>& partials, std::atomic<int64_t>& next, at::Tensor& out) {
  const bool in_place = reads_in_place<scalar_t>(p);
  Scratch<T> scratch(p, !in_place);
  const auto num_items = static_cast<int64_t>(items.size());
  for (int64_t i = next++; i < num_items; i = next++) {
    run_item<scalar_t>(p, items[i], q, scale, in_place, scratch);
    if (p.splits == 1) {
      write_final<scalar_t>(p, items[i], scratch, out);
    } else {
      store_partial(p, items[i], scratch, partials);
    }
  }
}

template <typename scalar_t>
void decode(Problem& p, const at::Tensor& q, double scale, at::Tensor& out) {
  using T = compute_t<scalar_t>;
  const int64_t workers = choose_workers(p);
  choose_splits(p, workers);
  const std::vector<Item> items = plan_items(p);
  Partials<T> partials(p);
  std::atomic<int64_t> next{0};
  if (workers == 1) {
    run_items<scalar_t>(p, items, q, scale, partials, next, out);
  } else {
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      run_items<scalar_t>(p, items, q, scale, partials, next, out);
    });
  }
  if (p.splits > 1) merge_partials<scalar_t>(p, partials, out);
}

CacheView view_of(const at::Tensor& cache) {
  return {cache.const_data_ptr(), cache.stride(0), cache.stride(1), cache.stride(2)};
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_table,
                                      const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention (cpu): q must be [B, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_decode_attention (cpu): caches must be [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  q.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention (cpu): q and the caches must share a dtype");
  for (const at::Tensor* t : {&q, &k_cache, &v_cache})
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) == 1,
                "paged_decode_attention (cpu): q and the caches need a contiguous last dim");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && k_cache.size(2) > 0 &&
                  q.size(1) % k_cache.size(2) == 0,
              "paged_decode_attention (cpu): head dims differ or Hq is not a multiple of Hkv");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0) &&
                  seq_lens.dim() == 1 && seq_lens.size(0) == q.size(0),
              "paged_decode_attention (cpu): block_table must be [B, max_blocks], seq_lens [B]");
  Problem p;
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.kv_heads = k_cache.size(2);
  p.group = p.q_heads / p.kv_heads;
  p.head_dim = q.size(2);
  p.padded_dim = (p.head_dim + kLanes - 1) / kLanes * kLanes;
  p.num_blocks = k_cache.size(0);
  p.block_size = k_cache.size(1);
  p.max_blocks = block_table.size(1);
  p.k = view_of(k_cache);
  p.v = view_of(v_cache);
  const at::Tensor table = block_table.to(at::kInt).contiguous();
  p.block_table = table.const_data_ptr<int32_t>();
  const at::Tensor lengths = seq_lens.to(at::kLong).contiguous();
  const int64_t capacity = p.max_blocks * p.block_size;
  p.lengths.resize(p.batch);
  for (int64_t b = 0; b < p.batch; ++b)
    p.lengths[b] = std::clamp<int64_t>(lengths.const_data_ptr<int64_t>()[b], 0, capacity);

  at::Tensor out = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (p.batch == 0 || p.q_heads == 0 || p.head_dim == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "paged_decode_attention_cpu",
                                  [&] { decode<scalar_t>(p, q, scale, out); });
  return out;
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def(
      "_paged_decode_attention_cpu(Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_table, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_paged_decode_attention_cpu", &metalm_fast::cpu::paged_decode_attention_cpu);
}
