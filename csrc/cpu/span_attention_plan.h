// Tile planning for span attention on CPU: which (query block, key range) pairs to compute.
//
// Query blocks are runs of at most `max_rows` consecutive queries, cut early
// where a query's interval is disjoint from the union of the block's intervals
// (a new packed sequence or encoder span starts). Each block then computes
// exactly the key range [min kv_start, max kv_end) of its rows, so the
// wasted work of a block is (rows x range) - (allowed pairs): zero for a
// bidirectional span that fits a block, about rows^2 / 2 on a causal diagonal.
// Blocks follow the mask, not a fixed grid, so nothing is wasted at the edges
// of packed sequences.
//
// The backward pass also needs key blocks (it owns dK/dV rows per key block):
// runs of at most `max_keys` keys, cut where a new group of keys starts, i.e.
// at a key p where some interval starts and no interval holds both p - 1 and p.
// Each key block lists the query blocks whose key range meets it (CSR), found
// by binary search when the blocks' key ranges are monotone and by a scan
// otherwise.
//
// Planning is O(Tq + Tk) (plus O(blocks^2) for non-monotone masks) and
// depends on the mask and block sizes only, never on the thread count, so the
// results are bit-identical for any number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace metalm_fast::cpu::plan {

struct QueryBlock {
  int64_t begin, end;          // query rows [begin, end)
  int64_t key_begin, key_end;  // union of the rows' intervals; equal when all rows are empty
  int64_t rows() const { return end - begin; }
  int64_t keys() const { return key_end - key_begin; }
};

struct KeyBlock {
  int64_t begin, end;  // keys [begin, end)
};

// Intervals clamped so that 0 <= start <= end <= num_keys: a kernel never reads
// out of bounds, whatever it is given (SpanMask validates its own, but the raw
// ops take any integer tensor). The clamp runs in 64 bits, before any narrowing:
// a kv_end of 2**32 + 3 is past the end, not 3. An interval with start >= end
// after clamping is empty (out 0, lse -inf, zero gradients).
inline void clamp_intervals(const int64_t* kv_start, const int64_t* kv_end, int64_t num_queries,
                            int64_t num_keys, std::vector<int32_t>& start,
                            std::vector<int32_t>& end) {
  start.resize(num_queries);
  end.resize(num_queries);
  for (int64_t t = 0; t < num_queries; ++t) {
    const int64_t s = std::clamp<int64_t>(kv_start[t], 0, num_keys);
    start[t] = static_cast<int32_t>(s);
    end[t] = static_cast<int32_t>(std::clamp<int64_t>(kv_end[t], s, num_keys));
  }
}

inline std::vector<QueryBlock> query_blocks(const std::vector<int32_t>& start,
                                            const std::vector<int32_t>& end, int64_t max_rows) {
  std::vector<QueryBlock> blocks;
  const int64_t num_queries = static_cast<int64_t>(start.size());
  int64_t t = 0;
  while (t < num_queries) {
    QueryBlock block{t, t, 0, 0};
    bool any = false;
    while (t < num_queries && t - block.begin < max_rows) {
      const int64_t s = start[t], e = end[t];
      if (s < e) {
        if (any && (s >= block.key_end || e <= block.key_begin)) break;  // disjoint: new group
        block.key_begin = any ? std::min(block.key_begin, s) : s;
        block.key_end = any ? std::max(block.key_end, e) : e;
        any = true;
      }
      ++t;
    }
    block.end = t;
    blocks.push_back(block);
  }
  return blocks;
}

inline std::vector<KeyBlock> key_blocks(const std::vector<int32_t>& start,
                                        const std::vector<int32_t>& end, int64_t num_keys,
                                        int64_t max_keys) {
  // crossing[p] = #intervals holding keys p - 1 and p; starts_here[p] = some interval starts at p.
  std::vector<int32_t> crossing(num_keys + 1, 0);
  std::vector<uint8_t> starts_here(num_keys + 1, 0);
  for (size_t t = 0; t < start.size(); ++t) {
    const int64_t s = start[t], e = end[t];
    if (s >= e) continue;
    starts_here[s] = 1;
    if (e - s >= 2) {
      crossing[s + 1] += 1;
      crossing[e] -= 1;
    }
  }
  std::vector<KeyBlock> blocks;
  int64_t begin = 0, holding = 0;
  for (int64_t p = 0; p <= num_keys; ++p) {
    holding += crossing[p];
    const bool boundary = p > begin && (p == num_keys || p - begin >= max_keys ||
                                        (holding == 0 && starts_here[p]));
    if (boundary) {
      blocks.push_back({begin, p});
      begin = p;
    }
  }
  return blocks;
}

// CSR lists: offsets[i] .. offsets[i + 1] index `members` = query blocks meeting key block i.
struct KeyBlockLinks {
  std::vector<int64_t> offsets;
  std::vector<int64_t> members;
};

inline KeyBlockLinks link_key_blocks(const std::vector<QueryBlock>& queries,
                                     const std::vector<KeyBlock>& keys) {
  std::vector<int64_t> nonempty;
  for (size_t i = 0; i < queries.size(); ++i)
    if (queries[i].keys() > 0) nonempty.push_back(static_cast<int64_t>(i));
  bool monotone = true;
  for (size_t i = 1; i < nonempty.size(); ++i) {
    const QueryBlock& a = queries[nonempty[i - 1]];
    const QueryBlock& b = queries[nonempty[i]];
    monotone = monotone && a.key_begin <= b.key_begin && a.key_end <= b.key_end;
  }
  KeyBlockLinks links;
  links.offsets.reserve(keys.size() + 1);
  links.offsets.push_back(0);
  for (const KeyBlock& kb : keys) {
    if (monotone) {
      // key_end is non-decreasing: skip blocks that end before kb; stop at the first
      // block starting after it (key_begin is non-decreasing too).
      auto first = std::partition_point(nonempty.begin(), nonempty.end(), [&](int64_t i) {
        return queries[i].key_end <= kb.begin;
      });
      for (auto it = first; it != nonempty.end() && queries[*it].key_begin < kb.end; ++it)
        links.members.push_back(*it);
    } else {
      for (int64_t i : nonempty)
        if (queries[i].key_begin < kb.end && queries[i].key_end > kb.begin)
          links.members.push_back(i);
    }
    links.offsets.push_back(static_cast<int64_t>(links.members.size()));
  }
  return links;
}

// Work items in decreasing cost (longest first balances a dynamic queue best); ties keep order.
inline std::vector<int64_t> longest_first(const std::vector<double>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

}  // namespace metalm_fast::cpu::plan
