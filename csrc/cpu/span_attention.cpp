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
// (head, query block) with blocks that follow the mask (span_attention_plan.h).
// An item walks its key range in tiles of `key_tile` keys: S = scale Q K^T, an
// online-softmax step on each row's allowed columns (span_attention_rows.h;
// masked entries are written as 0, never exponentiated), acc += P V. Then
// out = acc / l and lse = m + log l; a query with an empty interval gets out 0
// and lse -inf. The tile products (span_attention_gemm.h) are register-blocked
// AVX-512 / AVX2 micro-kernels for float (K^T and V^T transposed once per call,
// span_attention_parts.h), BLAS for float64 and on other CPUs.
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
// item kinds (7 tile products per tile instead of 5). The micro-kernels sum each
// element in a fixed order whatever the tile's shape, so the backward's S is
// bit-identical to the forward's and P = exp(S - lse) is consistent with lse.
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
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu_blas.h"
#include "span_attention_gemm.h"
#include "span_attention_parts.h"
#include "span_attention_plan.h"
#include "span_attention_rows.h"

namespace metalm_fast::cpu {
namespace {

using tile::Kernel;
using tile::Product;

// Tile sizes, tuned on a 2-core AVX-512 EPYC for D = 64 (benchmarks/): fewer,
// larger query blocks amortise per-block work better than they lose on the
// causal diagonal (about rows / 2 wasted keys per row). At D <= 32 a row's products
// are half as long, so the diagonal's waste weighs more: 64-row forward blocks ran
// a small-preset prefill's causal attention (8 documents of 309-880 tokens, Hq 8,
// D 32) faster than 128-row ones, with the same result bit for bit (the sums over
// keys do not depend on the query block).
struct TileSizes {
  int64_t q_rows = 128;        // forward: rows per query block
  int64_t key_tile = 256;      // forward and dQ items: keys per tile
  int64_t bwd_q_rows = 128;    // backward: rows per query block
  int64_t bwd_key_rows = 128;  // backward dK/dV items: keys per key block
};
TileSizes tile_sizes(int64_t head_dim) {
  TileSizes sizes;
  if (head_dim <= 32) sizes.q_rows = 64;
  return sizes;
}

struct Shape {
  int64_t num_queries, num_keys, heads, kv_heads, head_dim, group;
};

// ------------------------------------------------------------------------------ forward
template <typename T>
struct ForwardScratch {
  Scratch<T> scores, acc, row_max, row_sum;
  Scratch<int32_t> lo, hi;
  ForwardScratch(const TileSizes& t, int64_t head_dim)
      : scores(t.q_rows * (t.key_tile + kPad)),
        acc(t.q_rows * head_dim),
        row_max(t.q_rows),
        row_sum(t.q_rows),
        lo(t.q_rows),
        hi(t.q_rows) {}
};

template <typename T>
struct ForwardInputs {
  Operand<T> q, v;
  KeysT<T> keys;
  const NonFiniteRows& bad_values;  // of v, per kv head
  const std::vector<int32_t>& start;
  const std::vector<int32_t>& end;
  T scale;
  Kernel kernel;
  int64_t key_tile;
};

template <typename T>
void forward_block(const Shape& shape, const ForwardInputs<T>& in, const plan::QueryBlock& block,
                   int64_t head, T* out, T* lse, ForwardScratch<T>& s) {
  const int64_t rows = block.rows(), head_dim = shape.head_dim;
  const int64_t kv_head = head / shape.group;
  const int64_t width = tile::vector_width(in.kernel);
  T* acc = s.acc.get();
  T* row_max = s.row_max.get();
  T* row_sum = s.row_sum.get();
  T* scores = s.scores.get();
  std::fill(acc, acc + rows * head_dim, T(0));
  std::fill(row_max, row_max + rows, -std::numeric_limits<T>::infinity());
  std::fill(row_sum, row_sum + rows, T(0));
  const T* q_rows = in.q.at(block.begin, head);
  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += in.key_tile) {
    const int64_t cols = std::min(in.key_tile, block.key_end - key0);
    const int64_t ld = round_up(cols, width);  // extra columns are computed, never read
    // S = scale Q K^T.
    Product qk = product<T>(rows, ld, head_dim, q_rows, in.q.ld, false, nullptr, 0, scores, ld,
                            false);
    qk.alpha = in.scale;
    in.keys.operand(kv_head, key0, ld, qk);
    tile::matmul<T>(in.kernel, qk);
    clip_rows(in.start, in.end, block.begin, rows, key0, cols, s.lo.get(), s.hi.get());
    rows::softmax_step(scores, rows, cols, ld, s.lo.get(), s.hi.get(), row_max, row_sum, acc,
                       head_dim);
    // acc += P V.
    const int32_t* lo = s.lo.get();
    const int32_t* hi = s.hi.get();
    matmul_allowed<T>(in.kernel,
                      product<T>(rows, head_dim, cols, scores, ld, false, in.v.at(key0, kv_head),
                                 in.v.ld, acc, head_dim, true),
                      in.bad_values, kv_head, key0,
                      [&](int64_t r, int64_t j) { return lo[r] <= j && j < hi[r]; });
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = block.begin + r;
    T* out_row = out + (t * shape.heads + head) * head_dim;
    const T* acc_row = acc + r * head_dim;
    // Emptiness comes from the interval, not from l: a row that attends a NaN or
    // +inf score has l = NaN and must come out NaN, as its float math says.
    if (in.start[t] < in.end[t]) {
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
  const TileSizes sizes = tile_sizes(shape.head_dim);
  const Kernel kernel = tile::pick_kernel(std::is_same_v<T, float>, shape.head_dim);
  const auto blocks = plan::query_blocks(start, end, sizes.q_rows);
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  std::vector<double> cost(num_blocks * shape.heads);
  for (int64_t b = 0; b < num_blocks; ++b)
    for (int64_t h = 0; h < shape.heads; ++h)
      cost[b * shape.heads + h] = double(blocks[b].rows()) * double(blocks[b].keys() + 1);
  const Operand<T> k = operand<T>(k_t);
  std::unique_ptr<Transposed<T>> k_transposed;
  if (tile::vector_width(kernel) > 1)
    k_transposed = std::make_unique<Transposed<T>>(k, shape.num_keys, shape.kv_heads,
                                                   shape.head_dim, 0);
  const Operand<T> v = operand<T>(v_t);
  const NonFiniteRows bad_values(v, static_cast<const Operand<T>*>(nullptr), shape.num_keys,
                                 shape.kv_heads, shape.head_dim);
  const ForwardInputs<T> in{operand<T>(q_t), v,     {k, k_transposed.get()}, bad_values, start,
                            end,             static_cast<T>(scale), kernel, sizes.key_tile};
  T* out = out_t.data_ptr<T>();
  T* lse = lse_t.data_ptr<T>();
  run_items(
      plan::longest_first(cost), [&] { return ForwardScratch<T>(sizes, shape.head_dim); },
      [&](int64_t item, ForwardScratch<T>& s) {
        forward_block<T>(shape, in, blocks[item / shape.heads], item % shape.heads, out, lse, s);
      });
}

// ------------------------------------------------------------------------------ backward
template <typename T>
struct BackwardScratch {
  Scratch<T> scores, dscores, acc_a, acc_b;
  Scratch<int32_t> lo, hi;
  BackwardScratch(const TileSizes& t, int64_t head_dim)
      : scores(rows(t) * (std::max(t.key_tile, t.bwd_key_rows) + kPad)),
        dscores(rows(t) * (std::max(t.key_tile, t.bwd_key_rows) + kPad)),
        acc_a(rows(t) * head_dim),
        acc_b(rows(t) * head_dim),
        lo(rows(t)),
        hi(rows(t)) {}
  static int64_t rows(const TileSizes& t) { return std::max(t.bwd_q_rows, t.bwd_key_rows); }
};

template <typename T>
struct BackwardInputs {
  Operand<T> grad_out, q, k, v;
  KeysT<T> keys, values;  // K^T and V^T operands
  const NonFiniteRows& bad_keys;     // of k, per kv head
  const NonFiniteRows& bad_queries;  // of q or grad_out, per head
  const T* lse;           // [Hq, Tq]
  const T* delta;         // [Hq, Tq]
  const std::vector<int32_t>& start;
  const std::vector<int32_t>& end;
  T scale;
  Kernel kernel;
  TileSizes sizes;
};

// Predicates of matmul_allowed over the tile that clip_rows last described in
// s.lo / s.hi: row r of the tile may use key column j, as (r, j) or as (j, r).
template <typename T>
auto row_allowed(const BackwardScratch<T>& s) {
  return [lo = s.lo.get(), hi = s.hi.get()](int64_t r, int64_t j) { return lo[r] <= j && j < hi[r]; };
}
template <typename T>
auto column_allowed(const BackwardScratch<T>& s) {
  return [lo = s.lo.get(), hi = s.hi.get()](int64_t j, int64_t r) { return lo[r] <= j && j < hi[r]; };
}

// One tile: P in s.scores and dS in s.dscores (rows x cols, ld returned) of query
// rows `block` (head h) against keys [key0, key0 + cols); with `grad_v`, also
// grad_v (cols x D) += P^T dO.
template <typename T>
int64_t backward_tile(const Shape& shape, const BackwardInputs<T>& in,
                      const plan::QueryBlock& block, int64_t head, int64_t key0, int64_t cols,
                      T* grad_v, BackwardScratch<T>& s) {
  const int64_t rows = block.rows(), head_dim = shape.head_dim;
  const int64_t kv_head = head / shape.group;
  const int64_t ld = round_up(cols, tile::vector_width(in.kernel));
  const T* q_rows = in.q.at(block.begin, head);
  const T* grad_out_rows = in.grad_out.at(block.begin, head);
  const int64_t row_offset = head * shape.num_queries + block.begin;
  T* probs = s.scores.get();
  T* dscores = s.dscores.get();
  Product qk = product<T>(rows, ld, head_dim, q_rows, in.q.ld, false, nullptr, 0, probs, ld, false);
  qk.alpha = in.scale;
  in.keys.operand(kv_head, key0, ld, qk);
  tile::matmul<T>(in.kernel, qk);
  clip_rows(in.start, in.end, block.begin, rows, key0, cols, s.lo.get(), s.hi.get());
  rows::probs(probs, rows, cols, ld, s.lo.get(), s.hi.get(), in.lse + row_offset);
  if (grad_v != nullptr) {  // grad_v += P^T dO
    matmul_allowed<T>(in.kernel,
                      product<T>(cols, head_dim, rows, probs, ld, true, grad_out_rows,
                                 in.grad_out.ld, grad_v, head_dim, true),
                      in.bad_queries, head, block.begin, column_allowed(s));
  }
  // dP = dO V^T, then dS = P * (dP - delta) in place.
  Product dov = product<T>(rows, ld, head_dim, grad_out_rows, in.grad_out.ld, false, nullptr, 0,
                           dscores, ld, false);
  dov.depth = 16;  // |dP| >> |dP - delta| on rows with few keys: keep dP's rounding small
  in.values.operand(kv_head, key0, ld, dov);
  tile::matmul<T>(in.kernel, dov);
  rows::dscores(probs, dscores, rows, cols, ld, s.lo.get(), s.hi.get(), in.delta + row_offset);
  return ld;
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
      const int64_t ld = backward_tile(shape, in, block, head, key_block.begin, cols, acc_v, s);
      // acc_k += dS^T Q.
      matmul_allowed<T>(in.kernel,
                        product<T>(cols, head_dim, block.rows(), s.dscores.get(), ld, true,
                                   in.q.at(block.begin, head), in.q.ld, acc_k, head_dim, true),
                        in.bad_queries, head, block.begin, column_allowed(s));
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
  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += in.sizes.key_tile) {
    const int64_t cols = std::min(in.sizes.key_tile, block.key_end - key0);
    const int64_t ld = backward_tile<T>(shape, in, block, head, key0, cols, nullptr, s);
    // acc_q += dS K.
    matmul_allowed<T>(in.kernel,
                      product<T>(rows, head_dim, cols, s.dscores.get(), ld, false,
                                 in.k.at(key0, kv_head), in.k.ld, acc_q, head_dim, true),
                      in.bad_keys, kv_head, key0, row_allowed(s));
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* row = grad_q + ((block.begin + r) * shape.heads + head) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) row[d] = acc_q[r * head_dim + d] * in.scale;
  }
}

template <typename T>
void backward(const Shape& shape, const at::Tensor& grad_out, const at::Tensor& q,
              const at::Tensor& k_t, const at::Tensor& v_t, const T* lse, const T* delta,
              const std::vector<int32_t>& start, const std::vector<int32_t>& end, double scale,
              T* grad_q, T* grad_k, T* grad_v) {
  const TileSizes sizes = tile_sizes(shape.head_dim);
  const Kernel kernel = tile::pick_kernel(std::is_same_v<T, float>, shape.head_dim);
  const Operand<T> k = operand<T>(k_t), v = operand<T>(v_t);
  std::unique_ptr<Transposed<T>> k_transposed, v_transposed;
  if (tile::vector_width(kernel) > 1) {
    k_transposed =
        std::make_unique<Transposed<T>>(k, shape.num_keys, shape.kv_heads, shape.head_dim, 0);
    v_transposed =
        std::make_unique<Transposed<T>>(v, shape.num_keys, shape.kv_heads, shape.head_dim, 1);
  }
  const Operand<T> q_rows = operand<T>(q), grad_out_rows = operand<T>(grad_out);
  const NonFiniteRows bad_keys(k, static_cast<const Operand<T>*>(nullptr), shape.num_keys,
                               shape.kv_heads, shape.head_dim);
  const NonFiniteRows bad_queries(q_rows, &grad_out_rows, shape.num_queries, shape.heads,
                                  shape.head_dim);
  const BackwardInputs<T> in{grad_out_rows, q_rows, k, v, {k, k_transposed.get()},
                             {v, v_transposed.get()}, bad_keys, bad_queries, lse, delta, start,
                             end, static_cast<T>(scale), kernel, sizes};
  const auto query_blocks = plan::query_blocks(start, end, sizes.bwd_q_rows);
  const auto key_blocks = plan::key_blocks(start, end, shape.num_keys, sizes.bwd_key_rows);
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
      plan::longest_first(cost), [&] { return BackwardScratch<T>(sizes, shape.head_dim); },
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
  // Widened, never narrowed, before the clamp (see plan::clamp_intervals).
  const at::Tensor s = kv_start.to(at::kLong).contiguous();
  const at::Tensor e = kv_end.to(at::kLong).contiguous();
  plan::clamp_intervals(s.const_data_ptr<int64_t>(), e.const_data_ptr<int64_t>(),
                        shape.num_queries, shape.num_keys, start, end);
}

std::tuple<at::Tensor, at::Tensor> span_attention_fwd_cpu(const at::Tensor& q_in,
                                                          const at::Tensor& k_in,
                                                          const at::Tensor& v_in,
                                                          const at::Tensor& kv_start,
                                                          const at::Tensor& kv_end, double scale) {
  const Shape shape = check_qkv(q_in, k_in, v_in, kv_start, kv_end);
  const at::Tensor q = row_ready(q_in), k = row_ready(k_in), v = row_ready(v_in);
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
  const at::Tensor q = row_ready(q_in), k = row_ready(k_in), v = row_ready(v_in);
  const at::Tensor grad_out = row_ready(grad_out_in.to(q.scalar_type()));
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
    backward<scalar_t>(shape, grad_out, q, k, v, lse.const_data_ptr<scalar_t>(),
                       delta.const_data_ptr<scalar_t>(), start, end, scale,
                       grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
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
