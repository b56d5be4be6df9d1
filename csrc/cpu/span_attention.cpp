// Span-masked attention on CPU: the `cpu` backend of metalm_fast.span_attention.
//
// Ops (schemas in TORCH_LIBRARY_FRAGMENT below; the op layer in
// metalm_fast/ops/span_attention.py validates inputs, handles fp16/bf16 and autograd):
//
//   _span_attention_fwd_cpu(q, k, v, kv_start, kv_end, scale) -> (out, lse)
//   _span_attention_bwd_cpu(grad_out, q, k, v, lse, delta, kv_start, kv_end, scale)
//       -> (dq, dk, dv)
//
// q [Tq, Hq, D], k/v [Tk, Hkv, D] with only the last dim contiguous (slices of a
// fused qkv work as they are: every GEMM reads rows through the tensor's stride).
// Query t attends key j iff kv_start[t] <= j < kv_end[t]; query head h uses kv
// head h / (Hq / Hkv). float32 and float64; lse and delta are [Hq, Tq] in the
// accumulation type (float32 for float32 inputs, float64 for float64 ones).
//
// Forward (flash-attention style, tile-sparse from the intervals): work items are
// (head, query block) with blocks from span_attention_plan.h. An item walks its
// key range in tiles of kKeyTile keys: S = scale Q K^T (BLAS), an online-softmax
// step on each row's allowed columns (span_attention_rows.h; masked entries are
// written as 0, never exponentiated), acc += P V (BLAS). out = acc / l and
// lse = m + log l; a query with an empty interval gets out 0 and lse -inf.
//
// Backward recomputes P = exp(S - lse) and, with delta = rowsum(dO * O) - dLSE,
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q.
// It is deterministic by construction, with no atomics and no racy sums: dK/dV
// items are (kv head, key block) and loop over the query heads of the group and
// the query blocks meeting the key block in a fixed order; dQ items are (head,
// query block) and loop over their key range. Both kinds of item share one
// dynamic queue (outputs are disjoint). Every output element is produced by one
// item with a summation order fixed by the plan, so results are bit-identical
// on repeat and for any thread count. The price is recomputing S and dP in both
// item kinds (7 GEMMs per tile instead of 5).
//
// Threads: at::parallel_for starts one task per thread; each pulls items from an
// atomic counter, longest first (costs estimated from the plan), and keeps its
// scratch tiles for all its items. No per-tile allocation or at::Tensor.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_blas.h"
#include "span_attention_plan.h"
#include "span_attention_rows.h"

namespace metalm_fast::cpu {
namespace {

// Tile sizes (tuned on a 2-core AVX-512 EPYC for D = 64; see benchmarks/).
struct TileSizes {
  int64_t q_rows = 64, key_tile = 256, bwd_q_rows = 64, bwd_key_rows = 64;
};
TileSizes tiles() {
    TileSizes t;
    if (const char* e = std::getenv("METALM_FAST_SPAN_TILES")) {
      long a, b, c, d;
      if (std::sscanf(e, "%ld,%ld,%ld,%ld", &a, &b, &c, &d) == 4) t = {a, b, c, d};
    }
    return t;
}
#define kQueryRows (tiles().q_rows)
#define kKeyTile (tiles().key_tile)
#define kBwdQueryRows (tiles().bwd_q_rows)
#define kBwdKeyRows (tiles().bwd_key_rows)

// 64-byte aligned scratch for one thread's tiles.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t count) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
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

// A [tokens, heads, D] operand read through its strides; rows of one head form a
// column-major D x tokens matrix with leading dimension `ld` (the token stride).
template <typename T>
struct Operand {
  const T* data;
  int64_t ld;
  int64_t head_stride;
  const T* at(int64_t token, int64_t head) const { return data + token * ld + head * head_stride; }
};

// Last dim contiguous and a token stride usable as a BLAS leading dimension; else copy.
at::Tensor blas_ready(const at::Tensor& x) {
  const int64_t head_dim = x.size(2);
  const bool ok = (head_dim <= 1 || x.stride(2) == 1) && (x.size(0) <= 1 || x.stride(0) >= head_dim);
  return ok ? x : x.contiguous();
}

template <typename T>
Operand<T> operand(const at::Tensor& x) {
  const int64_t ld = x.size(0) <= 1 ? std::max<int64_t>({x.stride(0), x.size(2), 1})
                                    : std::max<int64_t>(x.stride(0), 1);
  return {x.const_data_ptr<T>(), ld, x.stride(1)};
}

// Run `work(item, scratch...)` for every item, dynamically, longest first.
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

struct Shape {
  int64_t num_queries, num_keys, heads, kv_heads, head_dim, group;
};

// ------------------------------------------------------------------------------ forward
template <typename T>
struct ForwardScratch {
  Scratch<T> scores, acc, row_max, row_sum;
  Scratch<int32_t> lo, hi;
  explicit ForwardScratch(int64_t head_dim)
      : scores(kQueryRows * kKeyTile),
        acc(kQueryRows * head_dim),
        row_max(kQueryRows),
        row_sum(kQueryRows),
        lo(kQueryRows),
        hi(kQueryRows) {}
};

template <typename T>
void forward_block(const Shape& shape, const Operand<T>& q, const Operand<T>& k,
                   const Operand<T>& v, const std::vector<int32_t>& start,
                   const std::vector<int32_t>& end, const plan::QueryBlock& block, int64_t head,
                   T scale, T* out, T* lse, ForwardScratch<T>& s) {
  const int64_t rows = block.rows(), head_dim = shape.head_dim;
  const int64_t kv_head = head / shape.group;
  T* acc = s.acc.get();
  T* row_max = s.row_max.get();
  T* row_sum = s.row_sum.get();
  std::fill(acc, acc + rows * head_dim, T(0));
  std::fill(row_max, row_max + rows, -std::numeric_limits<T>::infinity());
  std::fill(row_sum, row_sum + rows, T(0));
  const T* q_rows = q.at(block.begin, head);
  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += kKeyTile) {
    const int64_t cols = std::min(kKeyTile, block.key_end - key0);
    // S (rows x cols, row-major, ld cols) = scale * Q K^T, i.e. column-major S^T = K Q^T.
    gemm(true, false, cols, rows, head_dim, scale, k.at(key0, kv_head), k.ld, q_rows, q.ld, T(0),
         s.scores.get(), cols);
    clip_rows(start, end, block.begin, rows, key0, cols, s.lo.get(), s.hi.get());
    rows::softmax_step(s.scores.get(), rows, cols, cols, s.lo.get(), s.hi.get(), row_max, row_sum,
                       acc, head_dim);
    // acc (rows x D, row-major) += P V, i.e. column-major acc^T += V^T P^T.
    gemm(false, false, head_dim, rows, cols, T(1), v.at(key0, kv_head), v.ld, s.scores.get(), cols,
         T(1), acc, head_dim);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = block.begin + r;
    T* out_row = out + (t * shape.heads + head) * head_dim;
    const T* acc_row = acc + r * head_dim;
    if (row_sum[r] > T(0)) {
      const T inv = T(1) / row_sum[r];
      for (int64_t d = 0; d < head_dim; ++d) out_row[d] = acc_row[d] * inv;
      lse[head * shape.num_queries + t] = row_max[r] + std::log(row_sum[r]);
    } else {
      std::fill(out_row, out_row + head_dim, T(0));
      lse[head * shape.num_queries + t] = -std::numeric_limits<T>::infinity();
    }
  }
}

template <typename T>
void forward(const Shape& shape, const at::Tensor& q_t, const at::Tensor& k_t,
             const at::Tensor& v_t, const std::vector<int32_t>& start,
             const std::vector<int32_t>& end, double scale, at::Tensor& out_t,
             at::Tensor& lse_t) {
  const auto blocks = plan::query_blocks(start, end, kQueryRows);
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  std::vector<double> cost(num_blocks * shape.heads);
  for (int64_t b = 0; b < num_blocks; ++b)
    for (int64_t h = 0; h < shape.heads; ++h)
      cost[b * shape.heads + h] = double(blocks[b].rows()) * double(blocks[b].keys() + 1);
  const Operand<T> q = operand<T>(q_t), k = operand<T>(k_t), v = operand<T>(v_t);
  T* out = out_t.data_ptr<T>();
  T* lse = lse_t.data_ptr<T>();
  run_items(
      plan::longest_first(cost), [&] { return ForwardScratch<T>(shape.head_dim); },
      [&](int64_t item, ForwardScratch<T>& s) {
        forward_block<T>(shape, q, k, v, start, end, blocks[item / shape.heads],
                         item % shape.heads, static_cast<T>(scale), out, lse, s);
      });
}

// ------------------------------------------------------------------------------ backward
template <typename T>
struct BackwardScratch {
  const int64_t kRows = std::max(kBwdQueryRows, kBwdKeyRows);
  const int64_t kCols = std::max(kKeyTile, kBwdKeyRows);
  Scratch<T> scores, dscores, acc_a, acc_b;
  Scratch<int32_t> lo, hi;
  explicit BackwardScratch(int64_t head_dim)
      : scores(kRows * kCols),
        dscores(kRows * kCols),
        acc_a(kRows * head_dim),
        acc_b(kRows * head_dim),
        lo(kRows),
        hi(kRows) {}
};

template <typename T>
struct BackwardInputs {
  Operand<T> grad_out, q, k, v;
  const T* lse;    // [Hq, Tq]
  const T* delta;  // [Hq, Tq]
  const std::vector<int32_t>& start;
  const std::vector<int32_t>& end;
  T scale;
};

// One tile: P and dS (rows x cols, ld cols) of query rows `block` (head h) against
// keys [key0, key0 + cols); if `grad_v` is given, also grad_v (cols x D) += P^T dO.
template <typename T>
void backward_tile(const Shape& shape, const BackwardInputs<T>& in, const plan::QueryBlock& block,
                   int64_t head, int64_t key0, int64_t cols, T* grad_v, BackwardScratch<T>& s) {
  const int64_t rows = block.rows(), head_dim = shape.head_dim;
  const int64_t kv_head = head / shape.group;
  const T* q_rows = in.q.at(block.begin, head);
  const T* grad_out_rows = in.grad_out.at(block.begin, head);
  const int64_t row_offset = head * shape.num_queries + block.begin;
  gemm(true, false, cols, rows, head_dim, in.scale, in.k.at(key0, kv_head), in.k.ld, q_rows,
       in.q.ld, T(0), s.scores.get(), cols);
  clip_rows(in.start, in.end, block.begin, rows, key0, cols, s.lo.get(), s.hi.get());
  rows::probs(s.scores.get(), rows, cols, cols, s.lo.get(), s.hi.get(), in.lse + row_offset);
  if (grad_v != nullptr) {
    // grad_v (cols x D, row-major) += P^T dO, i.e. column-major grad_v^T += dO^T P.
    gemm(false, true, head_dim, cols, rows, T(1), grad_out_rows, in.grad_out.ld, s.scores.get(),
         cols, T(1), grad_v, head_dim);
  }
  // dP (rows x cols) = dO V^T, then dS = P * (dP - delta) in place.
  gemm(true, false, cols, rows, head_dim, T(1), in.v.at(key0, kv_head), in.v.ld, grad_out_rows,
       in.grad_out.ld, T(0), s.dscores.get(), cols);
  rows::dscores(s.scores.get(), s.dscores.get(), rows, cols, cols, s.lo.get(), s.hi.get(),
                in.delta + row_offset);
}

// dK, dV rows of one key block for one kv head: sum over the group's heads and query blocks.
template <typename T>
void backward_key_block(const Shape& shape, const BackwardInputs<T>& in,
                        const std::vector<plan::QueryBlock>& query_blocks,
                        const plan::KeyBlockLinks& links, const plan::KeyBlock& key_block,
                        int64_t key_block_index, int64_t kv_head, T* grad_k, T* grad_v,
                        BackwardScratch<T>& s) {
  const int64_t cols = key_block.end - key_block.begin, head_dim = shape.head_dim;
  T* acc_k = s.acc_a.get();
  T* acc_v = s.acc_b.get();
  std::fill(acc_k, acc_k + cols * head_dim, T(0));
  std::fill(acc_v, acc_v + cols * head_dim, T(0));
  for (int64_t g = 0; g < shape.group; ++g) {
    const int64_t head = kv_head * shape.group + g;
    for (int64_t m = links.offsets[key_block_index]; m < links.offsets[key_block_index + 1]; ++m) {
      const plan::QueryBlock& block = query_blocks[links.members[m]];
      backward_tile(shape, in, block, head, key_block.begin, cols, acc_v, s);
      // acc_k (cols x D) += dS^T Q, i.e. column-major acc_k^T += Q^T dS.
      gemm(false, true, head_dim, cols, block.rows(), T(1), in.q.at(block.begin, head), in.q.ld,
           s.dscores.get(), cols, T(1), acc_k, head_dim);
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t offset = ((key_block.begin + j) * shape.kv_heads + kv_head) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      grad_k[offset + d] = acc_k[j * head_dim + d] * in.scale;
      grad_v[offset + d] = acc_v[j * head_dim + d];
    }
  }
}

// dQ rows of one query block for one head: sum over its key range.
template <typename T>
void backward_query_block(const Shape& shape, const BackwardInputs<T>& in,
                          const plan::QueryBlock& block, int64_t head, T* grad_q,
                          BackwardScratch<T>& s) {
  const int64_t rows = block.rows(), head_dim = shape.head_dim;
  const int64_t kv_head = head / shape.group;
  T* acc_q = s.acc_a.get();
  std::fill(acc_q, acc_q + rows * head_dim, T(0));
  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += kKeyTile) {
    const int64_t cols = std::min(kKeyTile, block.key_end - key0);
    backward_tile<T>(shape, in, block, head, key0, cols, nullptr, s);
    // acc_q (rows x D) += dS K, i.e. column-major acc_q^T += K^T dS^T.
    gemm(false, false, head_dim, rows, cols, T(1), in.k.at(key0, kv_head), in.k.ld,
         s.dscores.get(), cols, T(1), acc_q, head_dim);
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* row = grad_q + ((block.begin + r) * shape.heads + head) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) row[d] = acc_q[r * head_dim + d] * in.scale;
  }
}

template <typename T>
void backward(const Shape& shape, const BackwardInputs<T>& in, T* grad_q, T* grad_k, T* grad_v) {
  const auto query_blocks = plan::query_blocks(in.start, in.end, kBwdQueryRows);
  const auto key_blocks = plan::key_blocks(in.start, in.end, shape.num_keys, kBwdKeyRows);
  const auto links = plan::link_key_blocks(query_blocks, key_blocks);
  const int64_t num_key_items = static_cast<int64_t>(key_blocks.size()) * shape.kv_heads;
  const int64_t num_query_items = static_cast<int64_t>(query_blocks.size()) * shape.heads;
  // Items [0, num_key_items): (key block, kv head); then (query block, head).
  std::vector<double> cost(num_key_items + num_query_items);
  for (size_t b = 0; b < key_blocks.size(); ++b) {
    double pairs = 0;
    for (int64_t m = links.offsets[b]; m < links.offsets[b + 1]; ++m)
      pairs += double(query_blocks[links.members[m]].rows());
    pairs *= double(key_blocks[b].end - key_blocks[b].begin) * double(shape.group);
    for (int64_t h = 0; h < shape.kv_heads; ++h) cost[b * shape.kv_heads + h] = 4 * pairs + 1;
  }
  for (size_t b = 0; b < query_blocks.size(); ++b)
    for (int64_t h = 0; h < shape.heads; ++h)
      cost[num_key_items + b * shape.heads + h] =
          3 * double(query_blocks[b].rows()) * double(query_blocks[b].keys()) + 1;
  run_items(
      plan::longest_first(cost), [&] { return BackwardScratch<T>(shape.head_dim); },
      [&](int64_t item, BackwardScratch<T>& s) {
        if (item < num_key_items) {
          const int64_t b = item / shape.kv_heads, kv_head = item % shape.kv_heads;
          backward_key_block(shape, in, query_blocks, links, key_blocks[b], b, kv_head, grad_k,
                             grad_v, s);
        } else {
          const int64_t i = item - num_key_items;
          backward_query_block(shape, in, query_blocks[i / shape.heads], i % shape.heads, grad_q,
                               s);
        }
      });
}

// ------------------------------------------------------------------------------ ops
Shape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& kv_start, const at::Tensor& kv_end) {
  for (const auto* x : {&q, &k, &v}) {
    TORCH_CHECK(x->device().is_cpu(), "span attention (cpu): q, k, v must be CPU tensors");
    TORCH_CHECK(x->dim() == 3, "span attention (cpu): q, k, v must be 3-D [tokens, heads, D], got ",
                x->sizes());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "span attention (cpu): q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "span attention (cpu): q, k and v must have the same dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "span attention (cpu): k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(2) == k.size(2), "span attention (cpu): q and k must have the same head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "span attention (cpu): query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
  for (const auto* x : {&kv_start, &kv_end}) {
    TORCH_CHECK(x->device().is_cpu() && x->dim() == 1 && x->size(0) == q.size(0),
                "span attention (cpu): kv_start and kv_end must be 1-D CPU tensors of length Tq = ",
                q.size(0));
    TORCH_CHECK(!at::isFloatingType(x->scalar_type()) && x->scalar_type() != at::kBool,
                "span attention (cpu): kv_start and kv_end must be integer tensors");
  }
  const int64_t heads = q.size(1), kv_heads = k.size(1);
  return {q.size(0), k.size(0), heads, kv_heads, q.size(2), heads / kv_heads};
}

void intervals(const at::Tensor& kv_start, const at::Tensor& kv_end, const Shape& shape,
               std::vector<int32_t>& start, std::vector<int32_t>& end) {
  const at::Tensor s = kv_start.to(at::kInt).contiguous();
  const at::Tensor e = kv_end.to(at::kInt).contiguous();
  plan::clamp_intervals(s.const_data_ptr<int32_t>(), e.const_data_ptr<int32_t>(),
                        shape.num_queries, shape.num_keys, start, end);
}

std::tuple<at::Tensor, at::Tensor> span_attention_fwd_cpu(const at::Tensor& q_in,
                                                          const at::Tensor& k_in,
                                                          const at::Tensor& v_in,
                                                          const at::Tensor& kv_start,
                                                          const at::Tensor& kv_end, double scale) {
  const Shape shape = check_qkv(q_in, k_in, v_in, kv_start, kv_end);
  const at::Tensor q = blas_ready(q_in), k = blas_ready(k_in), v = blas_ready(v_in);
  at::Tensor out = at::empty({shape.num_queries, shape.heads, shape.head_dim}, q.options());
  at::Tensor lse = at::empty({shape.heads, shape.num_queries}, q.options());
  if (shape.num_queries == 0 || shape.heads == 0) return {out, lse};
  std::vector<int32_t> start, end;
  intervals(kv_start, kv_end, shape, start, end);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "span_attention_fwd_cpu", [&] {
    forward<scalar_t>(shape, q, k, v, start, end, scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> span_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& lse_in, const at::Tensor& delta_in,
    const at::Tensor& kv_start, const at::Tensor& kv_end, double scale) {
  const Shape shape = check_qkv(q_in, k_in, v_in, kv_start, kv_end);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(),
              "span attention (cpu): grad_out must have the shape of q, got ", grad_out_in.sizes());
  for (const auto* x : {&lse_in, &delta_in}) {
    TORCH_CHECK(x->dim() == 2 && x->size(0) == shape.heads && x->size(1) == shape.num_queries,
                "span attention (cpu): lse and delta must be [Hq, Tq] = [", shape.heads, ", ",
                shape.num_queries, "], got ", x->sizes());
  }
  const at::Tensor q = blas_ready(q_in), k = blas_ready(k_in), v = blas_ready(v_in);
  const at::Tensor grad_out = blas_ready(grad_out_in.to(q.scalar_type()));
  // Accumulation type (float64 lse/delta for float64 inputs keep gradients exact).
  const at::Tensor lse = lse_in.to(q.scalar_type()).contiguous();
  const at::Tensor delta = delta_in.to(q.scalar_type()).contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  if (grad_k.numel() > 0 && (shape.num_queries == 0 || shape.heads == 0)) {
    grad_k.zero_();
    grad_v.zero_();
  }
  if (shape.num_queries == 0 || shape.heads == 0) return {grad_q, grad_k, grad_v};
  std::vector<int32_t> start, end;
  intervals(kv_start, kv_end, shape, start, end);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "span_attention_bwd_cpu", [&] {
    const BackwardInputs<scalar_t> inputs{operand<scalar_t>(grad_out),
                                          operand<scalar_t>(q),
                                          operand<scalar_t>(k),
                                          operand<scalar_t>(v),
                                          lse.const_data_ptr<scalar_t>(),
                                          delta.const_data_ptr<scalar_t>(),
                                          start,
                                          end,
                                          static_cast<scalar_t>(scale)};
    backward<scalar_t>(shape, inputs, grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                       grad_v.data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def(
      "_span_attention_fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor kv_start, Tensor kv_end, "
      "float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "_span_attention_bwd_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, "
      "Tensor delta, Tensor kv_start, Tensor kv_end, float scale) -> (Tensor dq, Tensor dk, "
      "Tensor dv)");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_span_attention_fwd_cpu", &metalm_fast::cpu::span_attention_fwd_cpu);
  m.impl("_span_attention_bwd_cpu", &metalm_fast::cpu::span_attention_bwd_cpu);
}
