// The tile math of paged decode attention on CPU (paged_decode_attention.cpp).
//
// A tile is up to kTile keys of one sequence, given as row pointers, never
// copied: key j of kv head h is k_rows[j] + h * k_head_stride (values alike), dp
// contiguous elements (dp = D rounded up to kLanes). On the in-place path the
// pointers point into the cache pages; on the staged path (half types, D not a
// multiple of kLanes) into a zero-padded fp32 copy. k_rows holds a multiple of
// kBlock entries: the caller pads it with a valid row, whose scores are computed
// and never read.
//
// One step serves the `group` query heads of one kv head (GQA) and keeps the
// online softmax per query head: running max m, sum l, acc [dp] rescaled by
// exp(m_old - m_new) when the max grows.
//
//   scores: a query row q (pre-scaled) against 16 keys at a time. Each key gives
//     one product vector q * k (dp / 16 vector FMAs, q in registers for D <= 64);
//     a transposing shuffle tree folds the 16 product vectors into one vector of
//     16 scores, lane j = key j: about 3 instructions per key instead of a
//     dependent horizontal sum per key (with group size 1 and D = 32 that sum
//     was most of the work);
//   softmax: once per tile and query head, on whole vectors;
//   values: acc += p_j v_j with the accumulators in registers across the tile,
//     each value vector loaded once for up to four query heads, and keys
//     alternating between independent accumulator sets so that at least eight
//     FMA chains are in flight (one chain waits on FMA latency, not throughput).
//
// The float step is compiled for AVX-512, AVX2+FMA and baseline x86-64
// (target_clones) through GCC vector extensions, which every clone lowers to its
// own ISA (one zmm, two ymm or four xmm per f32x16). The double step (tests and
// debugging) is plain loops.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "span_attention_rows.h"

namespace metalm_fast::cpu::paged_decode {

constexpr int64_t kTile = 32;   // keys per online-softmax step
constexpr int64_t kBlock = 16;  // keys per score vector (one lane each)
constexpr int64_t kLanes = 16;  // floats per vector; dp is D rounded up to this

using f32x16 = float __attribute__((vector_size(kLanes * sizeof(float))));
using i32x16 = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

METALM_ALWAYS_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

METALM_ALWAYS_INLINE void store16(float* p, f32x16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

METALM_ALWAYS_INLINE f32x16 splat(float x) { return f32x16{} + x; }

// Lane-wise mask ? a : b, with bitwise operations: GCC turned the vector `?:` into
// one branch per lane in the target_clones build.
METALM_ALWAYS_INLINE f32x16 select(i32x16 mask, f32x16 a, f32x16 b) {
  const i32x16 bits =
      (mask & __builtin_bit_cast(i32x16, a)) | (~mask & __builtin_bit_cast(i32x16, b));
  return __builtin_bit_cast(f32x16, bits);
}

METALM_ALWAYS_INLINE f32x16 max_of(f32x16 a, f32x16 b) { return select(a > b, a, b); }

// Swap blocks of `width` lanes (width 8, 4, 2, 1): one step of a horizontal reduction.
template <int width>
METALM_ALWAYS_INLINE f32x16 swap_blocks(f32x16 v) {
  if constexpr (width == 8) {
    return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  } else if constexpr (width == 4) {
    return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  } else if constexpr (width == 2) {
    return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  } else {
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
}

METALM_ALWAYS_INLINE float max16(f32x16 v) {
  v = max_of(v, swap_blocks<8>(v));
  v = max_of(v, swap_blocks<4>(v));
  v = max_of(v, swap_blocks<2>(v));
  v = max_of(v, swap_blocks<1>(v));
  return v[0];
}

// Lanes summed pairwise (8 + 8, 4 + 4, ...): the same rounding on every ISA.
METALM_ALWAYS_INLINE float sum16(f32x16 v) {
  v += swap_blocks<8>(v);
  v += swap_blocks<4>(v);
  v += swap_blocks<2>(v);
  v += swap_blocks<1>(v);
  return v[0];
}

// ----------------------------------------------------------------------------- scores
// The transposing reduction: four levels of "add the two halves of every block of
// both inputs". Level 1 takes two keys' product vectors (16 partials each) to lanes
// 0-7 (first key) and 8-15 (second); levels 2, 3, 4 halve the blocks again, keys in
// order, until lane j holds key j's score.
METALM_ALWAYS_INLINE f32x16 fold1(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
METALM_ALWAYS_INLINE f32x16 fold2(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                 31);
}
METALM_ALWAYS_INLINE f32x16 fold3(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                 31);
}
METALM_ALWAYS_INLINE f32x16 fold4(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// One query row: with ND > 0 its ND vectors stay in registers (dp = 16 ND);
// ND == 0 reads them from memory (any dp).
template <int ND>
struct QueryRow {
  f32x16 v[ND > 0 ? ND : 1];
  const float* q;
  int64_t dp;
  METALM_ALWAYS_INLINE QueryRow(const float* q_row, int64_t padded) : q(q_row), dp(padded) {
    if constexpr (ND > 0)
      for (int i = 0; i < ND; ++i) v[i] = load16(q_row + i * kLanes);
  }
  // q * k summed over the row's vectors: a horizontal sum away from q . k.
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

// Scores of one query row against rows[0, 16) (each + offset), lane j = key j. The
// tree is built as the products arrive, so few vectors are live at once.
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

// ----------------------------------------------------------------------------- softmax
// Online-softmax update for `group` query heads over one tile of scores
// ([group, kTile]; on exit P = exp(S - m_new), 0 past `rows`); rescales the acc rows.
// float: whole vectors, padding lanes excluded from the max. The exp is
// rows::exp_approx under `omp simd` (a vector-extension version was scalarised).
METALM_ALWAYS_INLINE void softmax_update(float* scores, int64_t group, int64_t rows, float* m,
                                         float* l, float* acc, int64_t dp) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t padded = (rows + kBlock - 1) / kBlock * kBlock;
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * kTile;
    f32x16 tile_max = splat(kNegInf);
    for (int64_t j = 0; j < rows; j += kBlock)
      tile_max = max_of(tile_max, select(lane < static_cast<int32_t>(rows - j), load16(s + j),
                                         splat(kNegInf)));
    const float new_max = std::max(m[g], max16(tile_max));
#pragma omp simd
    for (int64_t j = 0; j < padded; ++j) s[j] = rows::exp_approx(s[j] - new_max);
    for (int64_t j = rows; j < padded; ++j) s[j] = 0.0f;
    f32x16 sums = {};
    for (int64_t j = 0; j < padded; j += kBlock) sums += load16(s + j);
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

// double: plain loops.
METALM_ALWAYS_INLINE void softmax_update(double* scores, int64_t group, int64_t rows, double* m,
                                         double* l, double* acc, int64_t dp) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  for (int64_t g = 0; g < group; ++g) {
    double* s = scores + g * kTile;
    double tile_max = kNegInf;
    for (int64_t j = 0; j < rows; ++j) tile_max = std::max(tile_max, s[j]);
    const double new_max = std::max(m[g], tile_max);
    double sum = 0;
    for (int64_t j = 0; j < rows; ++j) {
      s[j] = std::exp(s[j] - new_max);
      sum += s[j];
    }
    if (new_max != m[g]) {
      const double alpha = m[g] == kNegInf ? 0.0 : std::exp(m[g] - new_max);
      for (int64_t d = 0; d < dp; ++d) acc[g * dp + d] *= alpha;
      l[g] *= alpha;
      m[g] = new_max;
    }
    l[g] += sum;
  }
}

// ----------------------------------------------------------------------------- values
// acc[i, 0 : 16 NC] += sum_j P[i, j] v_j for NQ query rows (row stride dp): each value
// vector is loaded once and feeds NQ accumulators. Keys alternate between U
// accumulator sets, so that NQ * NC * U >= 8 FMA chains run side by side.
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
METALM_ALWAYS_INLINE void accumulate_columns(const float* probs, const float* const* v_rows,
                                             int64_t offset, int64_t rows, int64_t dp,
                                             float* acc) {
  constexpr int kWide = NQ == 1 ? 4 : 2;
  int64_t d = 0;
  for (; d + kWide * kLanes <= dp; d += kWide * kLanes)
    accumulate<NQ, kWide>(probs, v_rows, offset + d, rows, dp, acc + d);
  if (kWide > 2 && d + 2 * kLanes <= dp) {
    accumulate<NQ, 2>(probs, v_rows, offset + d, rows, dp, acc + d);
    d += 2 * kLanes;
  }
  if (d < dp) accumulate<NQ, 1>(probs, v_rows, offset + d, rows, dp, acc + d);
}

// ----------------------------------------------------------------------------- one step
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
    accumulate_columns<4>(scores + g * kTile, v_rows, v_offset, rows, dp, acc + g * dp);
  for (; g < group; ++g)
    accumulate_columns<1>(scores + g * kTile, v_rows, v_offset, rows, dp, acc + g * dp);
}

METALM_CPU_CLONES static void tile_step(const float* q, int64_t group, int64_t dp,
                                        const float* const* k_rows, int64_t k_offset,
                                        const float* const* v_rows, int64_t v_offset,
                                        int64_t rows, float* scores, float* m, float* l,
                                        float* acc) {
  switch (dp / kLanes) {  // q in registers for the common small head dims
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

}  // namespace metalm_fast::cpu::paged_decode
