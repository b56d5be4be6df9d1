// The tile math of paged decode attention on CPU (paged_decode_attention.cpp).
//
// A tile is up to kTile keys of one sequence, given as row pointers, never
// copied: the row of key j holds every kv head (head h at k_rows[j] + h *
// k_head_stride, values alike, dp contiguous elements each; dp = D rounded up to
// kLanes). On the in-place path the pointers point into the cache pages; on the
// staged path (half types, D not a multiple of kLanes) into a zero-padded fp32
// copy. k_rows holds a multiple of kBlock entries: the caller pads it with a
// valid row, whose scores are computed and never read.
//
// float: a tile step serves every query head at once and walks each key's row
// front to back, so the cache is read in memory order, and the next tile's rows
// are prefetched to L2 while this one computes (one row per key, spread over the
// tile). The previous design walked one kv head at a time, reading a D-wide slice
// of every row at a stride of Hkv * D, and read the pages from DRAM clearly
// slower than this walk, which still stays below a plain torch.sum of the same
// pages.
//
//   scores: query heads in blocks of HB (the largest power of two <= 16 that
//     divides Hq). One score vector holds 16 / HB keys x HB heads, lane
//     (j - j0) * HB + i; each (key, head) pair gives one product vector
//     q_i * k_j (dp / 16 vector FMAs) and a transposing shuffle tree folds 16
//     of them into one vector of 16 scores: about 3 instructions per score
//     instead of a dependent horizontal sum each. Layout: scores[(b * kTile + j)
//     * HB + i] for head block b;
//   softmax: per head block, on whole vectors: the lanes of one head recur
//     every HB lanes, so a running max (sum) over the vectors followed by
//     swaps of 8, 4, ... HB lanes gives each head's max (sum) in its lanes;
//   values: acc[i] += p[j, i] v_j[kv head of i] with up to 16 accumulator
//     vectors in registers (16 / (dp / 16) query heads per pass), each value
//     row read in order.
//
// The float step is compiled for AVX-512, AVX2+FMA and baseline x86-64
// (target_clones) through GCC vector extensions, which every clone lowers to its
// own ISA (one zmm, two ymm or four xmm per f32x16). The double step (tests and
// debugging) is plain loops, one kv head at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "span_attention_rows.h"
#include "vec16.h"

namespace metalm_fast::cpu::paged_decode {

using vec16::f32x16;
using vec16::fold16;
using vec16::kLanes;  // floats per vector; dp is D rounded up to this
using vec16::load16;
using vec16::max_of;
using vec16::opaque;
using vec16::CacheLevel;
using vec16::prefetch_bytes;
using vec16::store16;
using vec16::swap_blocks;

constexpr int64_t kTile = 32;   // keys per online-softmax step
constexpr int64_t kBlock = 16;  // k_rows is padded to a multiple of this

// ----------------------------------------------------------------------------- float tiles
// One tile as the caller hands it over: `rows` keys (k_rows padded to kBlock).
struct RowTile {
  const float* const* k_rows;
  int64_t k_head_stride;
  const float* const* v_rows;
  int64_t v_head_stride;
  int64_t rows;
  // The next tile's rows, prefetched while this one computes (next_rows 0: none).
  const float* const* next_k_rows;
  const float* const* next_v_rows;
  int64_t next_rows, row_bytes;
  // Elements from one key's row to the next key's in the same page.
  int64_t k_row_stride, v_row_stride;
};

// Prefetch row j of the next tile (if it has one): spread over this tile's keys,
// the requests never pile up beyond the miss buffers.
METALM_ALWAYS_INLINE void prefetch_next_row(const float* const* next, int64_t next_rows,
                                            int64_t row_bytes, int64_t j) {
  if (j < next_rows) prefetch_bytes<CacheLevel::kL2>(next[j], row_bytes);
}

// The query heads: q [q_heads, dp] pre-scaled; query head i reads kv head i / group.
struct QueryHeads {
  const float* q;
  int64_t q_heads, group, dp;
};

// The largest power of two <= 16 that divides q_heads: the heads of one score vector.
inline int head_block(int64_t q_heads) {
  int hb = 16;
  while (q_heads % hb != 0) hb /= 2;
  return hb;
}

// q . k as a product vector (a horizontal sum away): ND vectors, or dp at run time (ND 0).
template <int ND>
METALM_ALWAYS_INLINE f32x16 products(const float* q, const float* k, int64_t dp) {
  f32x16 a = load16(q) * load16(k);
  if constexpr (ND > 0) {
    for (int c = 1; c < ND; ++c) a += load16(q + c * kLanes) * load16(k + c * kLanes);
  } else {
    for (int64_t d = kLanes; d < dp; d += kLanes) a += load16(q + d) * load16(k + d);
  }
  return a;
}

// Scores of every (key, query head) pair of the tile, in the head-block layout.
// kAdjacent (group 1, head strides dp): head i of a row sits i * dp further on,
// a constant displacement for ND > 0, so no per-head offsets occupy registers.
template <int ND, int HB, bool kAdjacent>
METALM_ALWAYS_INLINE void row_scores(const QueryHeads& h, const RowTile& t, float* scores) {
  constexpr int KB = kLanes / HB;  // keys per score vector
  const int64_t dp = ND > 0 ? ND * kLanes : h.dp;
  const int64_t padded = (t.rows + KB - 1) / KB * KB;
  for (int64_t h0 = 0; h0 < h.q_heads; h0 += HB) {
    const float* q = h.q + h0 * dp;
    int64_t k_offset[HB];
    for (int i = 0; i < HB; ++i)
      k_offset[i] = kAdjacent ? (h0 + i) * dp : (h0 + i) / h.group * t.k_head_stride;
    float* s = scores + h0 * kTile;
    for (int64_t j0 = 0; j0 < padded; j0 += KB) {
      if (h0 == 0)
        for (int64_t j = j0; j < j0 + KB; ++j)
          prefetch_next_row(t.next_k_rows, t.next_rows, t.row_bytes, j);
      const float* const* k = t.k_rows + j0;
      store16(s + j0 * HB, fold16([&](int p) {
                const int i = p % HB;
                const float* key = kAdjacent ? opaque(k[p / HB] + h0 * dp) + i * dp
                                             : k[p / HB] + k_offset[i];
                return products<ND>(q + i * dp, key, dp);
              }));
    }
  }
}

// Lanes l and l ^ w combined for w = 8, 4, ..., HB: each lane then holds the
// max (sum) over all lanes of its head (lane l belongs to head l % HB).
template <int HB, bool kMax>
METALM_ALWAYS_INLINE f32x16 combine_head_lanes(f32x16 v) {
  if constexpr (HB <= 8) v = kMax ? max_of(v, swap_blocks<8>(v)) : v + swap_blocks<8>(v);
  if constexpr (HB <= 4) v = kMax ? max_of(v, swap_blocks<4>(v)) : v + swap_blocks<4>(v);
  if constexpr (HB <= 2) v = kMax ? max_of(v, swap_blocks<2>(v)) : v + swap_blocks<2>(v);
  if constexpr (HB <= 1) v = kMax ? max_of(v, swap_blocks<1>(v)) : v + swap_blocks<1>(v);
  return v;
}

// Online-softmax update of every query head over the tile: on exit the scores
// hold P = exp(S - m_new) (0 for keys past `rows`), m and l are updated and the
// acc rows rescaled by exp(m_old - m_new) where the max grew. Non-finite scores
// follow the float math of the whole row: a NaN score makes its head's l and acc
// NaN, a +inf one gives exp(inf - inf) = NaN, a -inf one weighs 0 (a head that saw
// only -inf scores keeps l = 0, and the caller turns 0 / 0 into its NaN).
template <int HB>
METALM_ALWAYS_INLINE void row_softmax(const QueryHeads& h, int64_t rows, float* scores,
                                      float* m, float* l, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int KB = kLanes / HB;
  const int64_t used = (rows + KB - 1) / KB * KB * HB;  // score entries of the tile
  for (int64_t h0 = 0; h0 < h.q_heads; h0 += HB) {
    float* s = scores + h0 * kTile;
    for (int64_t x = rows * HB; x < used; ++x) s[x] = kNegInf;  // keys past the tile
    f32x16 tile_max = load16(s);
    for (int64_t x = kLanes; x < used; x += kLanes) tile_max = max_of(tile_max, load16(s + x));
    f32x16 old_max;
    for (int lane = 0; lane < kLanes; ++lane) old_max[lane] = m[h0 + lane % HB];
    float new_max[kLanes], base[kLanes];
    store16(new_max, max_of(old_max, combine_head_lanes<HB, true>(tile_max)));
    // A head whose scores so far are all -inf subtracts 0: exp(-inf - 0) = 0, where
    // exp(-inf - -inf) would be NaN and poison the keys of the later tiles.
    for (int lane = 0; lane < kLanes; ++lane)
      base[lane] = new_max[lane] == kNegInf ? 0.0f : new_max[lane];
    for (int64_t x = 0; x < used; x += kLanes) {
#pragma omp simd
      for (int lane = 0; lane < kLanes; ++lane)
        s[x + lane] = rows::exp_approx(s[x + lane] - base[lane]);
    }
    f32x16 sums = load16(s);
    for (int64_t x = kLanes; x < used; x += kLanes) sums += load16(s + x);
    sums = combine_head_lanes<HB, false>(sums);
    for (int i = 0; i < HB; ++i) {
      const int64_t head = h0 + i;
      if (new_max[i] != m[head]) {
        // m == -inf before the first tile: acc and l are 0, so the factor is 0 (no inf - inf).
        const float alpha = m[head] == kNegInf ? 0.0f : std::exp(m[head] - new_max[i]);
        float* a = acc + head * h.dp;
        for (int64_t d = 0; d < h.dp; d += kLanes) store16(a + d, load16(a + d) * alpha);
        l[head] *= alpha;
        m[head] = new_max[i];
      }
      l[head] += sums[i];
    }
  }
}

// acc[h0 + i, c0 : c0 + 16 NC] += sum_j P[j, h0 + i] v_j for CH query heads of one
// head block (CH divides HB), the CH * NC accumulators in registers across the tile.
template <int ND, int HB, int NC, int CH, bool kAdjacent>
METALM_ALWAYS_INLINE void row_values(const QueryHeads& h, const RowTile& t,
                                     const float* scores, int64_t h0, int64_t c0, float* acc) {
  const int64_t dp = ND > 0 ? ND * kLanes : h.dp;
  const float* probs = scores + (h0 - h0 % HB) * kTile + h0 % HB;  // P[j, h0 + i]: + j * HB + i
  int64_t v_offset[CH];
  for (int i = 0; i < CH; ++i)
    v_offset[i] = kAdjacent ? (h0 + i) * h.dp + c0 : (h0 + i) / h.group * t.v_head_stride + c0;
  f32x16 a[CH][NC];
  for (int i = 0; i < CH; ++i)
    for (int c = 0; c < NC; ++c) a[i][c] = load16(acc + (h0 + i) * h.dp + c0 + c * kLanes);
  for (int64_t j = 0; j < t.rows; ++j) {
    if (h0 == 0 && c0 == 0) prefetch_next_row(t.next_v_rows, t.next_rows, t.row_bytes, j);
    const float* v = opaque(t.v_rows[j] + (kAdjacent ? v_offset[0] : 0));
    const float* p = probs + j * HB;
    for (int i = 0; i < CH; ++i) {
      const float* v_head = kAdjacent ? v + i * dp : v + v_offset[i];
      for (int c = 0; c < NC; ++c) a[i][c] += p[i] * load16(v_head + c * kLanes);
    }
  }
  for (int i = 0; i < CH; ++i)
    for (int c = 0; c < NC; ++c) store16(acc + (h0 + i) * h.dp + c0 + c * kLanes, a[i][c]);
}

// The value pass: query heads in register-sized groups (at most 16 accumulator
// vectors, never across a head block); with ND = 0 (dp not 16, 32, 64 or 128)
// columns go four vectors at a time, then one.
template <int ND, int HB, bool kAdjacent>
METALM_ALWAYS_INLINE void row_value_pass(const QueryHeads& h, const RowTile& t,
                                         const float* scores, float* acc) {
  if constexpr (ND > 0) {
    constexpr int CH = std::min<int>(kLanes / ND, HB);
    for (int64_t h0 = 0; h0 < h.q_heads; h0 += CH)
      row_values<ND, HB, ND, CH, kAdjacent>(h, t, scores, h0, 0, acc);
  } else {
    constexpr int CH = std::min<int>(4, HB);
    for (int64_t h0 = 0; h0 < h.q_heads; h0 += CH) {
      int64_t c0 = 0;
      for (; c0 + 4 * kLanes <= h.dp; c0 += 4 * kLanes)
        row_values<ND, HB, 4, CH, kAdjacent>(h, t, scores, h0, c0, acc);
      for (; c0 < h.dp; c0 += kLanes)
        row_values<ND, HB, 1, CH, kAdjacent>(h, t, scores, h0, c0, acc);
    }
  }
}

template <int ND, int HB>
METALM_ALWAYS_INLINE void row_tile_step_impl(const QueryHeads& h, const RowTile& t,
                                             float* scores, float* m, float* l, float* acc) {
  if (h.group == 1 && t.k_head_stride == h.dp && t.v_head_stride == h.dp) {
    row_scores<ND, HB, true>(h, t, scores);
    row_softmax<HB>(h, t.rows, scores, m, l, acc);
    row_value_pass<ND, HB, true>(h, t, scores, acc);
  } else {
    row_scores<ND, HB, false>(h, t, scores);
    row_softmax<HB>(h, t.rows, scores, m, l, acc);
    row_value_pass<ND, HB, false>(h, t, scores, acc);
  }
}

template <int ND>
METALM_ALWAYS_INLINE void row_tile_step_nd(const QueryHeads& h, const RowTile& t,
                                           float* scores, float* m, float* l, float* acc) {
  switch (head_block(h.q_heads)) {
    case 16:
      return row_tile_step_impl<ND, 16>(h, t, scores, m, l, acc);
    case 8:
      return row_tile_step_impl<ND, 8>(h, t, scores, m, l, acc);
    case 4:
      return row_tile_step_impl<ND, 4>(h, t, scores, m, l, acc);
    case 2:
      return row_tile_step_impl<ND, 2>(h, t, scores, m, l, acc);
    default:
      return row_tile_step_impl<ND, 1>(h, t, scores, m, l, acc);
  }
}

// One tile for every query head: scores [q_heads * kTile] scratch, m and l
// [q_heads], acc [q_heads, dp].
METALM_CPU_CLONES static void tile_step(const QueryHeads& h, const RowTile& t, float* scores,
                                        float* m, float* l, float* acc) {
  switch (h.dp / kLanes) {  // compile-time head dims for the common sizes
    case 1:
      return row_tile_step_nd<1>(h, t, scores, m, l, acc);
    case 2:
      return row_tile_step_nd<2>(h, t, scores, m, l, acc);
    case 4:
      return row_tile_step_nd<4>(h, t, scores, m, l, acc);
    case 8:
      return row_tile_step_nd<8>(h, t, scores, m, l, acc);
    default:
      return row_tile_step_nd<0>(h, t, scores, m, l, acc);
  }
}

// ----------------------------------------------------------------------------- double tiles
// double: plain loops.
METALM_ALWAYS_INLINE void softmax_update(double* scores, int64_t group, int64_t rows, double* m,
                                         double* l, double* acc, int64_t dp) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  for (int64_t g = 0; g < group; ++g) {
    double* s = scores + g * kTile;
    double tile_max = kNegInf;
    for (int64_t j = 0; j < rows; ++j) tile_max = std::max(tile_max, s[j]);
    const double new_max = std::max(m[g], tile_max);
    const double base = new_max == kNegInf ? 0.0 : new_max;  // as the float step
    double sum = 0;
    for (int64_t j = 0; j < rows; ++j) {
      s[j] = std::exp(s[j] - base);
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
