// The register-resident step of paged decode attention on CPU (fp32), for
// models whose query heads' accumulators fit in registers: Hq a power of two
// <= 16 and Hq * D <= 256 floats (the small preset: Hq = 8, D = 32).
//
// Why a second step: the tile step (paged_decode_tile.h) scores 32 keys, then
// reads their 32 value rows, so the key and value streams take turns in bursts
// of 32 KB (Hkv = 8, D = 32) and each starts cold. Measured on one core with
// plain streaming loops over pages as the step lays them out, a key row then its
// value row reads faster than 32-key bursts of each. A decode
// step is memory-bound, so this step walks the keys in groups of KB = 16 / Hq
// (one score vector) and reads each group's value rows right after its key
// rows. That needs an online-softmax update per group instead of per 32 keys,
// which is only cheap when m, l and the accumulators stay in registers:
//
//   scores: one vector of KB keys x Hq heads (lane (j - j0) * Hq + i), folded
//     from 16 product vectors by the transposing shuffle tree (as the tile step);
//   softmax: m and l are vectors, lane x holding head x % Hq (m repeated, l as
//     partial sums); the accumulators are rescaled only when a head's max grows
//     (rarely after the first keys), then P = exp(S - m) on the whole vector;
//   values: acc[i] += P[j, i] v_j[kv head of i], Hq * D / 16 <= 16 accumulator
//     vectors in registers for the whole tile.
//
// The hardware prefetchers stream rows that follow each other in memory;
// software prefetches go only where the stream jumps to another page (see
// JumpPrefetcher), which is why run_item gives this step contiguous tiles only
// (on shuffled pages the tile step, which prefetches every row, is faster).
// m, l and acc are loaded from and stored to the item's
// scratch once per tile, in the layout the tile step uses, so the two steps
// share run_item, the splits and the final merge.
#pragma once

#include <cstdint>
#include <limits>

#include "paged_decode_tile.h"
#include "vec16.h"

namespace metalm_fast::cpu::paged_decode {

using vec16::i32x16;
using vec16::select;
using vec16::splat;

constexpr int64_t kAhead = 16;  // keys between a row's prefetch and its use

// True when the register-resident step serves these heads (see the top).
// (dp / 16 vectors per head, a power of two too: the compiled head dims).
inline bool stream_fits(int64_t q_heads, int64_t dp) {
  auto power_of_two = [](int64_t n) { return n > 0 && (n & (n - 1)) == 0; };
  return power_of_two(q_heads) && power_of_two(dp / kLanes) && dp % kLanes == 0 &&
         q_heads * dp <= kLanes * kLanes;
}

// Key j's key and value rows (j at or past `rows` is in the next tile), or
// nulls past the next tile.
METALM_ALWAYS_INLINE void key_rows(const RowTile& t, int64_t j, const float*& k, const float*& v) {
  if (j < t.rows) {
    k = t.k_rows[j];
    v = t.v_rows[j];
  } else if (j - t.rows < t.next_rows) {
    k = t.next_k_rows[j - t.rows];
    v = t.next_v_rows[j - t.rows];
  } else {
    k = v = nullptr;
  }
}

// The prefetcher of the key stream. Where a key's rows follow the previous
// key's in memory the hardware prefetchers stream them (on contiguous pages a
// software prefetch of every row only slowed the stream down); where the stream
// jumps (the next page is elsewhere) they cannot know where, so the first
// kRowsAfterJump rows there are prefetched kAhead keys early (without, shuffled
// pages read slower).
struct JumpPrefetcher {
  static constexpr int64_t kRowsAfterJump = 1;
  const float* last_k = nullptr;
  int64_t since_jump = kRowsAfterJump;

  METALM_ALWAYS_INLINE void key(const RowTile& t, int64_t j) {
    const float* k;
    const float* v;
    key_rows(t, j, k, v);
    if (k == nullptr) return;
    since_jump = (last_k != nullptr && k == last_k + t.k_row_stride) ? since_jump + 1 : 0;
    last_k = k;
    if (since_jump < kRowsAfterJump) {
      prefetch_bytes<CacheLevel::kL2>(k, t.row_bytes);
      prefetch_bytes<CacheLevel::kL2>(v, t.row_bytes);
    }
  }
};

// True when the tile's key rows, and its value rows, follow each other in
// memory (its keys sit on consecutive pages of a contiguous pool). Only the
// ends are compared: a tile that jumps away and back still computes exactly,
// through the prefetcher's jump handling, just not at full speed.
inline bool rows_contiguous(const RowTile& t) {
  const int64_t last = t.rows - 1;
  return t.k_rows[last] == t.k_rows[0] + last * t.k_row_stride &&
         t.v_rows[last] == t.v_rows[0] + last * t.v_row_stride;
}

// exp_approx on every lane (exactly 0 below -87.3, -inf included).
METALM_ALWAYS_INLINE f32x16 exp16(f32x16 x) {
  float lanes[kLanes];
  store16(lanes, x);
#pragma omp simd
  for (int lane = 0; lane < kLanes; ++lane) lanes[lane] = rows::exp_approx(lanes[lane]);
  return load16(lanes);
}

// Lane l of v, in every lane.
METALM_ALWAYS_INLINE f32x16 broadcast(f32x16 v, int lane) { return splat(v[lane]); }

template <int HQ, int ND, bool kAdjacent>
METALM_ALWAYS_INLINE void stream_tile_impl(const QueryHeads& h, const RowTile& t, float* m,
                                           float* l, float* acc) {
  constexpr int KB = kLanes / HQ;  // keys per score vector
  constexpr int64_t dp = ND * kLanes;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t k_offset[HQ], v_offset[HQ];
  for (int i = 0; i < HQ; ++i) {
    k_offset[i] = kAdjacent ? i * dp : i / h.group * t.k_head_stride;
    v_offset[i] = kAdjacent ? i * dp : i / h.group * t.v_head_stride;
  }
  f32x16 a[HQ][ND];
  for (int i = 0; i < HQ; ++i)
    for (int c = 0; c < ND; ++c) a[i][c] = load16(acc + i * dp + c * kLanes);
  f32x16 m_vec, l_vec = splat(0.0f);
  for (int lane = 0; lane < kLanes; ++lane) m_vec[lane] = m[lane % HQ];
  for (int i = 0; i < HQ; ++i) l_vec[i] = l[i];  // one lane per head holds its sum so far
  // What P subtracts: m, or 0 for a head with only -inf scores so far (exp(-inf - 0)
  // = 0, where exp(-inf - -inf) would be NaN); updated only where m changes.
  auto base_of = [](f32x16 m) { return select(m == splat(kNegInf), splat(0.0f), m); };
  f32x16 m_base = base_of(m_vec);
  i32x16 key_of_lane;                            // lane x scores key j0 + x / HQ
  for (int lane = 0; lane < kLanes; ++lane) key_of_lane[lane] = lane / HQ;
  JumpPrefetcher prefetcher;

  for (int64_t j0 = 0; j0 < t.rows; j0 += KB) {
    const int64_t keys = std::min<int64_t>(KB, t.rows - j0);
    for (int64_t j = j0; j < j0 + keys; ++j) prefetcher.key(t, j + kAhead);
    const float* const* k = t.k_rows + j0;  // padded to kBlock rows: all KB readable
    f32x16 s = fold16([&](int p) {
      const int i = p % HQ;
      const float* key = kAdjacent ? opaque(k[p / HQ]) + i * dp : k[p / HQ] + k_offset[i];
      return products<ND>(h.q + i * dp, key, dp);
    });
    if (keys < KB) s = select(key_of_lane >= static_cast<int32_t>(keys), splat(kNegInf), s);
    const f32x16 m_new = max_of(m_vec, combine_head_lanes<HQ, true>(s));
    const i32x16 grew = m_new > m_vec;
    bool any_grew = false;
    for (int lane = 0; lane < HQ; ++lane) any_grew |= grew[lane] != 0;
    if (any_grew) {
      // exp(-inf - m) = 0 before a head's first key; heads whose max held keep 1.
      const f32x16 alpha = select(grew, exp16(m_vec - m_new), splat(1.0f));
      l_vec *= alpha;
      for (int i = 0; i < HQ; ++i) {
        const f32x16 factor = broadcast(alpha, i);
        for (int c = 0; c < ND; ++c) a[i][c] *= factor;
      }
      m_vec = m_new;
      m_base = base_of(m_vec);
    }
    const f32x16 p = exp16(s - m_base);  // 0 on the lanes of keys past the tile
    l_vec += p;
    for (int64_t j = 0; j < keys; ++j) {
      const float* v = opaque(t.v_rows[j0 + j]);
      for (int i = 0; i < HQ; ++i) {
        const f32x16 weight = broadcast(p, static_cast<int>(j) * HQ + i);
        const float* v_head = v + v_offset[i];
        for (int c = 0; c < ND; ++c) a[i][c] += weight * load16(v_head + c * kLanes);
      }
    }
  }

  for (int i = 0; i < HQ; ++i)
    for (int c = 0; c < ND; ++c) store16(acc + i * dp + c * kLanes, a[i][c]);
  const f32x16 sums = combine_head_lanes<HQ, false>(l_vec);
  for (int i = 0; i < HQ; ++i) {
    m[i] = m_vec[i];
    l[i] = sums[i];
  }
}

template <int HQ, int ND>
METALM_ALWAYS_INLINE void stream_tile_heads(const QueryHeads& h, const RowTile& t, float* m,
                                            float* l, float* acc) {
  if constexpr (HQ * ND <= kLanes) {
    if (h.group == 1 && t.k_head_stride == h.dp && t.v_head_stride == h.dp)
      stream_tile_impl<HQ, ND, true>(h, t, m, l, acc);
    else
      stream_tile_impl<HQ, ND, false>(h, t, m, l, acc);
  }
}

template <int HQ>
METALM_ALWAYS_INLINE void stream_tile_dims(const QueryHeads& h, const RowTile& t, float* m,
                                           float* l, float* acc) {
  switch (h.dp / kLanes) {
    case 1:
      return stream_tile_heads<HQ, 1>(h, t, m, l, acc);
    case 2:
      return stream_tile_heads<HQ, 2>(h, t, m, l, acc);
    case 4:
      return stream_tile_heads<HQ, 4>(h, t, m, l, acc);
    case 8:
      return stream_tile_heads<HQ, 8>(h, t, m, l, acc);
    default:
      return stream_tile_heads<HQ, 16>(h, t, m, l, acc);
  }
}

// One tile for every query head, with (m, l, acc) of the item read and written
// back: m and l [q_heads], acc [q_heads, dp]. Only for stream_fits(q_heads, dp).
METALM_CPU_CLONES static void stream_tile(const QueryHeads& h, const RowTile& t, float* m,
                                          float* l, float* acc) {
  switch (h.q_heads) {
    case 1:
      return stream_tile_dims<1>(h, t, m, l, acc);
    case 2:
      return stream_tile_dims<2>(h, t, m, l, acc);
    case 4:
      return stream_tile_dims<4>(h, t, m, l, acc);
    case 8:
      return stream_tile_dims<8>(h, t, m, l, acc);
    default:
      return stream_tile_dims<16>(h, t, m, l, acc);
  }
}

}  // namespace metalm_fast::cpu::paged_decode
