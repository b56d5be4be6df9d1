// Building blocks of the CPU span-attention kernels (span_attention.cpp): thread
// scratch, strided operands, lazily transposed K/V panels, the work queue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "span_attention_gemm.h"

namespace metalm_fast::cpu {
namespace {

using tile::Product;

constexpr int64_t kPad = 16;  // scratch columns beyond a tile (round-up to the vector width)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned scratch for one thread's tiles.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t count) {
    const size_t bytes =
        (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(data_ != nullptr, "span attention (cpu): out of memory for scratch tiles");
  }
  T* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// A [tokens, heads, D] operand read through its strides: the rows of one head
// form a row-major tokens x D matrix with leading dimension `ld`.
template <typename T>
struct Operand {
  const T* data;
  int64_t ld;
  int64_t head_stride;
  const T* at(int64_t token, int64_t head) const { return data + token * ld + head * head_stride; }
};

// Last dim contiguous and a token stride usable as a leading dimension; else copy.
at::Tensor row_ready(const at::Tensor& x) {
  const int64_t head_dim = x.size(2);
  const bool ok =
      (head_dim <= 1 || x.stride(2) == 1) && (x.size(0) <= 1 || x.stride(0) >= head_dim);
  return ok ? x : x.contiguous();
}

template <typename T>
Operand<T> operand(const at::Tensor& x) {
  const int64_t ld = x.size(0) <= 1 ? std::max<int64_t>({x.stride(0), x.size(2), 1})
                                    : std::max<int64_t>(x.stride(0), 1);
  return {x.const_data_ptr<T>(), ld, x.stride(1)};
}

// K (or V) transposed per kv head, panel[h][d][j] = x[j, h, d], so that K^T is a
// row-contiguous B operand for the micro-kernels. Filled lazily, 256 keys at a
// time, by whichever thread first needs a chunk (others wait for it): each key
// is transposed once per call instead of once per tile, with no extra pass.
template <typename T>
class Transposed {
 public:
  static constexpr int64_t kChunk = 256;

  // `slot` picks one of the calling thread's cached buffers (K and V need two).
  Transposed(const Operand<T>& x, int64_t tokens, int64_t heads, int64_t head_dim, int slot)
      : x_(x), tokens_(tokens), head_dim_(head_dim) {
    ld_ = round_up(tokens, kPad) + kPad;
    if ((ld_ * static_cast<int64_t>(sizeof(T))) % 4096 == 0) ld_ += kPad;  // no 4K aliasing
    chunks_ = std::max<int64_t>((tokens + kChunk - 1) / kChunk, 1);
    data_ = buffer(slot, heads * head_dim * ld_);
    state_ = std::make_unique<std::atomic<uint8_t>[]>(heads * chunks_);
    for (int64_t i = 0; i < heads * chunks_; ++i) state_[i].store(0, std::memory_order_relaxed);
  }

  int64_t ld() const { return ld_; }

  // Panel of `head` from key `begin`; keys [begin, end) are ready (end <= tokens + kPad).
  const T* columns(int64_t head, int64_t begin, int64_t end) {
    const int64_t last = std::min(end, tokens_) - 1;
    for (int64_t c = begin / kChunk; c <= last / kChunk; ++c) ensure(head, c);
    return data_ + head * head_dim_ * ld_ + begin;
  }

 private:
  // The panels live in a buffer per calling thread kept between calls (up to
  // kKeepBytes each for K and V; larger ones are allocated per call): a fresh
  // multi-megabyte allocation per call page-faults on every call, a noticeable
  // share of an encoder-span forward. Uninitialised on purpose: fill() writes every column
  // before it is read.
  static constexpr int64_t kKeepBytes = int64_t{64} << 20;

  T* buffer(int slot, int64_t size) {
    thread_local std::unique_ptr<T[]> kept[2];
    thread_local int64_t capacity[2] = {0, 0};
    if (size * static_cast<int64_t>(sizeof(T)) > kKeepBytes) {
      owned_.reset(new T[size]);
      return owned_.get();
    }
    if (capacity[slot] < size) {
      kept[slot].reset();
      kept[slot].reset(new T[size]);
      capacity[slot] = size;
    }
    return kept[slot].get();
  }

  void ensure(int64_t head, int64_t chunk) {
    std::atomic<uint8_t>& state = state_[head * chunks_ + chunk];
    if (state.load(std::memory_order_acquire) == 2) return;
    uint8_t expected = 0;
    if (state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      fill(head, chunk);
      state.store(2, std::memory_order_release);
      return;
    }
    while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
  }

  void fill(int64_t head, int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(begin + kChunk, tokens_);
    // The last chunk also zeroes the padding columns [tokens, ld).
    const int64_t pad_end = end == tokens_ ? ld_ : end;
    T* panel = data_ + head * head_dim_ * ld_;
    tile::transpose(x_.at(begin, head), x_.ld, end - begin, head_dim_, panel + begin, ld_);
    for (int64_t d = 0; d < head_dim_; ++d)
      std::fill(panel + d * ld_ + end, panel + d * ld_ + pad_end, T(0));
  }

  Operand<T> x_;
  int64_t tokens_, head_dim_, ld_, chunks_;
  std::unique_ptr<T[]> owned_;  // a panel set too large to keep
  T* data_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
};

// The B operand of S = X Y^T for keys [key0, key0 + cols) of one kv head: the
// transposed panel when there is one (micro-kernels), else Y's rows read transposed.
template <typename T>
struct KeysT {
  Operand<T> rows;
  Transposed<T>* transposed;  // null on the BLAS paths
  void operand(int64_t kv_head, int64_t key0, int64_t cols, Product& p) const {
    if (transposed != nullptr) {
      p.b = transposed->columns(kv_head, key0, key0 + cols);
      p.b_row = transposed->ld();
      p.b_col = 1;
    } else {
      p.b = rows.at(key0, kv_head);
      p.b_row = 1;
      p.b_col = rows.ld;
    }
  }
};

// Run `work(item, scratch)` for every item, dynamically, longest first.
template <typename MakeScratch, typename Work>
void run_items(const std::vector<int64_t>& order, MakeScratch&& make_scratch, Work&& work) {
  const int64_t count = static_cast<int64_t>(order.size());
  if (count == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) work(order[i], scratch);
  });
}

// Row r's allowed columns in the key tile [key0, key0 + cols), as [lo, hi) in the tile.
inline void clip_rows(const std::vector<int32_t>& start, const std::vector<int32_t>& end,
                      int64_t row0, int64_t rows, int64_t key0, int64_t cols, int32_t* lo,
                      int32_t* hi) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = std::clamp<int64_t>(start[row0 + r] - key0, 0, cols);
    const int64_t b = std::clamp<int64_t>(end[row0 + r] - key0, a, cols);
    lo[r] = static_cast<int32_t>(a);
    hi[r] = static_cast<int32_t>(b);
  }
}


// Which token rows of a [tokens, heads, D] operand (or of either of two such
// operands) hold a NaN or an infinity, per head. Masked entries of P and dS are
// exact zeros, and 0 * NaN = NaN: a non-finite row fed to a tile product would
// reach output rows that never attend it. matmul_allowed routes the products
// over such rows through a slow path; for finite inputs the only cost is this
// one pass over the operand per call.
class NonFiniteRows {
 public:
  template <typename T>
  NonFiniteRows(const Operand<T>& a, const Operand<T>* b, int64_t tokens, int64_t heads,
                int64_t head_dim)
      : tokens_(tokens) {
    std::vector<uint8_t> flags(static_cast<size_t>(tokens * heads), 0);
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h) {
          const bool bad = !finite(a.at(t, h), head_dim) ||
                           (b != nullptr && !finite(b->at(t, h), head_dim));
          flags[h * tokens + t] = bad ? 1 : 0;
        }
    });
    if (std::find(flags.begin(), flags.end(), uint8_t{1}) == flags.end()) return;
    // Prefix counts per head: "does [begin, end) hold one?" in O(1) per tile.
    count_.assign(static_cast<size_t>((tokens + 1) * heads), 0);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < tokens; ++t)
        count_[h * (tokens + 1) + t + 1] = count_[h * (tokens + 1) + t] + flags[h * tokens + t];
  }

  // Whether rows [begin, end) of `head` hold a non-finite value.
  bool meets(int64_t head, int64_t begin, int64_t end) const {
    if (count_.empty()) return false;
    const int32_t* c = count_.data() + head * (tokens_ + 1);
    return c[end] > c[begin];
  }
  bool row(int64_t head, int64_t token) const { return meets(head, token, token + 1); }

 private:
  // x * 0 is +-0 for a finite x and NaN otherwise; a sum of zeros compares equal to 0.
  template <typename T>
  static bool finite(const T* x, int64_t n) {
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; ++d) sum += x[d] * T(0);
    return sum == T(0);
  }

  int64_t tokens_;
  std::vector<int32_t> count_;  // empty when every row is finite
};

// C += A B, where B's rows are the tokens [token0, token0 + p.k) of `head` of an
// operand whose non-finite rows `bad` lists, and allowed(i, r) says whether C row
// i may use B row r (A(i, r) is a masked zero otherwise). With no non-finite row
// in range this is tile::matmul. Otherwise the runs of finite rows go through
// tile::matmul and each non-finite row is added to the allowed C rows only: the
// float math of the allowed terms (NaN, inf as it says), and nothing else.
template <typename T, typename Allowed>
void matmul_allowed(tile::Kernel kernel, const Product& p, const NonFiniteRows& bad, int64_t head,
                    int64_t token0, Allowed&& allowed) {
  if (!bad.meets(head, token0, token0 + p.k)) return tile::matmul<T>(kernel, p);
  TORCH_INTERNAL_ASSERT(p.accumulate, "matmul_allowed accumulates into C");
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* c = static_cast<T*>(p.c);
  const T alpha = static_cast<T>(p.alpha);
  int64_t run = 0;  // first row of the current run of finite rows
  for (int64_t r = 0; r <= p.k; ++r) {
    if (r < p.k && !bad.row(head, token0 + r)) continue;
    if (r > run) {
      Product part = p;
      part.k = r - run;
      part.a = a + run * p.a_col;
      part.b = b + run * p.b_row;
      tile::matmul<T>(kernel, part);
    }
    run = r + 1;
    if (r == p.k) break;
    for (int64_t i = 0; i < p.m; ++i) {
      if (!allowed(i, r)) continue;
      const T coefficient = alpha * a[i * p.a_row + r * p.a_col];
      for (int64_t n = 0; n < p.n; ++n)
        c[i * p.ldc + n] += coefficient * b[r * p.b_row + n * p.b_col];
    }
  }
}

// Row-major C (m x n, ldc) (+)= A B with A rows `a` (ld a_ld) or A^T (`a_transposed`).
template <typename T>
Product product(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_ld, bool a_transposed,
                const T* b, int64_t b_ld, T* c, int64_t ldc, bool accumulate) {
  return Product{m, n, k, a, a_transposed ? 1 : a_ld, a_transposed ? a_ld : 1, b, b_ld, 1, c,
                 ldc, accumulate};
}

}  // namespace
}  // namespace metalm_fast::cpu
