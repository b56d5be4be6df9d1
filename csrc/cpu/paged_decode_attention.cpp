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
//   1. look the tile's rows up through the block table: one pointer per key to
//      its row in the page (all heads of the key), read in place (fp32 and fp64
//      with D a multiple of 16). Other dtypes and head dims are staged: widened
//      and zero-padded into a [kTile, Hkv, dp] scratch row by row. Any block
//      size works; a page id outside [0, num_blocks) is skipped, never
//      dereferenced;
//   2. fp32, every query head at once, one of two steps:
//      - where all query heads' accumulators fit in registers (Hq a power of two,
//        Hq * D <= 256) and the tile's rows are one contiguous run (pages in
//        order, as a fresh cache hands them out), the register-resident step of
//        paged_decode_stream.h: keys in groups of one score vector, each group's
//        value rows read right after its key rows, an online-softmax update per
//        group;
//      - otherwise the tile step of paged_decode_tile.h: scores of 16 (key, head)
//        pairs at a time folded by a transposing shuffle tree, one online-softmax
//        update per tile and head, acc += P V with the accumulators in registers;
//        each key's row is read front to back.
//
// Memory: a decode step reads every cached key and value once, and the cache
// of a model's layers does not fit in the last-level cache, so the step streams
// from DRAM. Where pages are in arbitrary order the tile step prefetches the
// rows of tile t + 1 to L2 while tile t computes, one row per key of tile t
// (keys during the score pass, values during the value pass): spread out, the
// requests stay within the miss buffers (a burst of the whole next tile, or
// prefetching to L1, measured slower; on shuffled pages the prefetch makes a
// layer markedly faster). Where pages are in order the hardware prefetchers
// stream the rows and the register-resident step prefetches only where the
// stream jumps, which reads the pages faster than the tile step does there.
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
// Accumulation is fp32 for fp32/fp16/bf16 and fp64 for fp64. Lengths are
// clamped to [0, max_blocks * block_size] in int64, so no index is ever read past
// the block table, whatever seq_lens holds; int64 page ids are checked against
// the pool before they are narrowed (pages_for_kernel).
//
// Non-finite values follow the float math of each row over its own keys: a NaN
// or inf in q, k or v reaches exactly the rows whose keys include it (NaN / inf
// as softmax(S) V says), keys past seq_lens or on skipped pages are never read,
// a row with no key is 0 and a row whose scores are all -inf is NaN.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "paged_decode_stream.h"
#include "paged_decode_tile.h"

namespace metalm_fast::cpu {
namespace {

using paged_decode::kBlock;
using paged_decode::kLanes;
using paged_decode::kTile;
using paged_decode::CacheLevel;
using paged_decode::prefetch_bytes;
using paged_decode::stream_tile;
using paged_decode::tile_step;

constexpr int64_t kMinSplitKeys = 256;  // a split shorter than this is not worth a merge
constexpr int64_t kItemsPerThread = 4;  // splits are added until items >= this * workers
constexpr int64_t kMinElementsPerThread = 1 << 18;  // K + V elements (1 MiB of fp32) per thread

template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

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

// One tile's key and value rows, every kv head (see paged_decode_tile.h).
template <typename T>
struct TileRows {
  std::vector<const T*> k, v;  // kTile entries, k padded to a multiple of kBlock
  int64_t count = 0;
  TileRows() : k(kTile + kBlock), v(kTile + kBlock) {}
};

// Per-thread scratch, allocated once per call. staged_k / staged_v ([kTile, Hkv, dp],
// padding columns zero) exist only on the staged path.
template <typename T>
struct Scratch {
  std::vector<T> q, staged_k, staged_v, scores, m, l, acc;
  TileRows<T> tiles[2];  // in place: the tile being computed and the next one
  Scratch(const Problem& p, bool staged)
      : q(p.q_heads * p.padded_dim),
        staged_k(staged ? kTile * p.kv_heads * p.padded_dim : 0),
        staged_v(staged ? kTile * p.kv_heads * p.padded_dim : 0), scores(p.q_heads * kTile),
        m(p.q_heads), l(p.q_heads), acc(p.q_heads * p.padded_dim) {}
};

// Reading keys and values straight from the pages needs the compute type and
// whole vectors (D a multiple of kLanes).
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

// ----------------------------------------------------------------------------- rows
// Staged path: prefetch the whole rows of keys [first, last) before they are copied.
template <typename scalar_t>
void prefetch_rows(const Problem& p, const int32_t* pages, int64_t first, int64_t last) {
  const int64_t row_bytes = p.kv_heads * p.head_dim * static_cast<int64_t>(sizeof(scalar_t));
  const bool heads_adjacent = p.k.head_stride == p.head_dim && p.v.head_stride == p.head_dim;
  if (!heads_adjacent) return;  // an unusual layout: not worth the arithmetic
  for (int64_t key = first; key < last; ++key) {
    const int64_t page = pages[key / p.block_size];
    if (page < 0 || page >= p.num_blocks) continue;
    const int64_t offset = key % p.block_size;
    const auto* k_row = static_cast<const scalar_t*>(p.k.data) + page * p.k.block_stride +
                        offset * p.k.row_stride;
    const auto* v_row = static_cast<const scalar_t*>(p.v.data) + page * p.v.block_stride +
                        offset * p.v.row_stride;
    prefetch_bytes<CacheLevel::kL1>(k_row, row_bytes);
    prefetch_bytes<CacheLevel::kL1>(v_row, row_bytes);
  }
}

// Fills `tile` with the rows of keys [first, last) of one sequence; keys on an
// invalid page are left out. In place, a row pointer is the key's row in its page;
// staged, the row is widened into the [kTile, Hkv, dp] scratch (a page read front
// to back, all heads of a key at once). k is padded to a multiple of kBlock with
// the first row.
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
// (m, l, acc) of all Hq query heads in the scratch. Returns whether the item saw
// a key (one on a page inside the pool): an item that saw none has no allowed key.
template <typename scalar_t, typename T>
bool run_item(const Problem& p, const Item& item, const at::Tensor& q, double scale,
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
  const int32_t* pages = p.block_table + item.batch * p.max_blocks;
  const int64_t k_head_stride = in_place ? p.k.head_stride : dp;
  const int64_t v_head_stride = in_place ? p.v.head_stride : dp;
  // Bytes from a row's start to its last head's end (what a prefetch of the row covers).
  const int64_t row_bytes =
      ((p.kv_heads - 1) * std::max(k_head_stride, v_head_stride) + p.head_dim) *
      static_cast<int64_t>(sizeof(T));
  auto tile_end = [&](int64_t first) { return std::min(first + kTile, item.last_key); };
  const int64_t k_row_stride = in_place ? p.k.row_stride : p.kv_heads * dp;
  const int64_t v_row_stride = in_place ? p.v.row_stride : p.kv_heads * dp;
  // The register-resident step where the heads fit and a tile's rows follow each
  // other in memory; the tile step elsewhere (paged_decode_stream.h says why).
  const bool stream = paged_decode::stream_fits(p.q_heads, dp);
  int current = 0;
  bool seen = false;
  if (in_place)
    collect_rows<scalar_t>(p, item, item.first_key, tile_end(item.first_key), true, scratch,
                           scratch.tiles[0]);
  for (int64_t first = item.first_key; first < item.last_key; first += kTile) {
    const int64_t last = tile_end(first);
    TileRows<T>& tile = scratch.tiles[current];
    TileRows<T>& next = scratch.tiles[1 - current];
    next.count = 0;
    if (in_place) {
      if (last < item.last_key)
        collect_rows<scalar_t>(p, item, last, tile_end(last), true, scratch, next);
      current = 1 - current;
    } else {
      prefetch_rows<scalar_t>(p, pages, last, tile_end(last));
      collect_rows<scalar_t>(p, item, first, last, false, scratch, tile);
    }
    if (tile.count == 0) continue;
    seen = true;
    if constexpr (std::is_same_v<T, float>) {
      const paged_decode::QueryHeads heads{scratch.q.data(), p.q_heads, p.group, dp};
      const paged_decode::RowTile rows{tile.k.data(),  k_head_stride, tile.v.data(),
                                       v_head_stride,  tile.count,    next.k.data(),
                                       next.v.data(),  next.count,    row_bytes,
                                       k_row_stride,   v_row_stride};
      if (stream && paged_decode::rows_contiguous(rows))
        stream_tile(heads, rows, scratch.m.data(), scratch.l.data(), scratch.acc.data());
      else
        tile_step(heads, rows, scratch.scores.data(), scratch.m.data(), scratch.l.data(),
                  scratch.acc.data());
    } else {
      for (int64_t h = 0; h < p.kv_heads; ++h) {
        const int64_t g0 = h * p.group;
        tile_step(scratch.q.data() + g0 * dp, p.group, dp, tile.k.data(), h * k_head_stride,
                  tile.v.data(), h * v_head_stride, tile.count, scratch.scores.data(),
                  scratch.m.data() + g0, scratch.l.data() + g0, scratch.acc.data() + g0 * dp);
      }
    }
  }
  return seen;
}

// out[b, h] = acc / l for every query head of one item (zeros when it saw no key).
// Where it saw keys, l is not tested: a NaN l stays NaN, and l = 0 (every score
// -inf) gives 0 * inf = NaN, as softmax over those keys does.
template <typename scalar_t, typename T>
void write_final(const Problem& p, const Item& item, bool seen, const Scratch<T>& scratch,
                 at::Tensor& out) {
  scalar_t* dst = out.data_ptr<scalar_t>() + item.batch * p.q_heads * p.head_dim;
  for (int64_t h = 0; h < p.q_heads; ++h) {
    const T inv = seen ? T(1) / scratch.l[h] : T(0);
    for (int64_t d = 0; d < p.head_dim; ++d)
      dst[h * p.head_dim + d] = static_cast<scalar_t>(scratch.acc[h * p.padded_dim + d] * inv);
  }
}

// Partials of every split: ml [B, Hq, splits, 2], acc [B, Hq, splits, D] and
// seen [B, splits] (the split saw a key; m = -inf, l = 0 alone cannot tell a split
// with no key from one whose scores were all -inf).
template <typename T>
struct Partials {
  std::vector<T> ml, acc;
  std::vector<uint8_t> seen;
  int64_t q_heads, splits;
  explicit Partials(const Problem& p)
      : ml(p.splits > 1 ? p.batch * p.q_heads * p.splits * 2 : 0),
        acc(p.splits > 1 ? p.batch * p.q_heads * p.splits * p.head_dim : 0),
        seen(p.splits > 1 ? p.batch * p.splits : 0), q_heads(p.q_heads), splits(p.splits) {}
  int64_t index(int64_t b, int64_t h, int64_t s) const { return (b * q_heads + h) * splits + s; }
};

template <typename T>
void store_partial(const Problem& p, const Item& item, bool seen, const Scratch<T>& scratch,
                   Partials<T>& partials) {
  partials.seen[item.batch * p.splits + item.split] = seen;
  for (int64_t h = 0; h < p.q_heads; ++h) {
    const int64_t i = partials.index(item.batch, h, item.split);
    partials.ml[2 * i] = scratch.m[h];
    partials.ml[2 * i + 1] = scratch.l[h];
    std::copy_n(scratch.acc.data() + h * p.padded_dim, p.head_dim,
                partials.acc.data() + i * p.head_dim);
  }
}

// Second pass of flash-decoding: merge the splits of every (sequence, query head).
// Only splits that saw no key are left out, whatever their (m, l): a NaN l or m
// must reach the output (a test `l > 0` would drop it and return a finite row),
// and splits whose scores were all -inf weigh exp(-inf - M) = 0, or give 0 / 0 =
// NaN where every split's were (softmax over -inf scores only).
template <typename scalar_t, typename T>
void merge_partials(const Problem& p, const Partials<T>& partials, at::Tensor& out) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, p.batch * p.q_heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(p.head_dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
      const int64_t used = (p.lengths[b] + p.split_keys - 1) / p.split_keys;
      const uint8_t* seen = partials.seen.data() + b * p.splits;
      T max_m = kNegInf;
      bool any_seen = false;
      for (int64_t s = 0; s < used; ++s) {
        if (!seen[s]) continue;  // a split whose pages were all outside the pool
        any_seen = true;
        const T m = partials.ml[2 * partials.index(b, h, s)];
        if (m > max_m) max_m = m;  // a NaN m is not the max; its weight is NaN below
      }
      const T base = max_m == kNegInf ? T(0) : max_m;  // no exp(-inf - -inf)
      std::fill(sum.begin(), sum.end(), T(0));
      T total = 0;
      for (int64_t s = 0; s < used; ++s) {
        if (!seen[s]) continue;
        const int64_t i = partials.index(b, h, s);
        const T weight = std::exp(partials.ml[2 * i] - base);
        total += weight * partials.ml[2 * i + 1];
        const T* acc = partials.acc.data() + i * p.head_dim;
        for (int64_t d = 0; d < p.head_dim; ++d) sum[d] += weight * acc[d];
      }
      const T inv = any_seen ? T(1) / total : T(0);
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
    const bool seen = run_item<scalar_t>(p, items[i], q, scale, in_place, scratch);
    if (p.splits == 1) {
      write_final<scalar_t>(p, items[i], seen, scratch, out);
    } else {
      store_partial(p, items[i], seen, scratch, partials);
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

// The block table as the kernel reads it: int32, contiguous. An int64 page id is
// compared with the pool in its own width first and one outside [0, num_blocks)
// becomes -1 (skipped): narrowed as it is, 2^32 + 1 would alias page 1. O(B x
// max_blocks), and nothing at all for an int32 table (the allocator's).
at::Tensor pages_for_kernel(const at::Tensor& block_table, int64_t num_blocks) {
  if (block_table.scalar_type() == at::kInt) return block_table.contiguous();
  const at::Tensor outside = block_table.lt(0).logical_or(block_table.ge(num_blocks));
  return block_table.masked_fill(outside, -1).to(at::kInt).contiguous();
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
  for (const at::Tensor* t : {&block_table, &seq_lens})
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                "paged_decode_attention (cpu): block_table and seq_lens must be int32 or int64, "
                "got ", t->scalar_type());
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
  const at::Tensor table = pages_for_kernel(block_table, p.num_blocks);
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
