// The linear layers of a decode step on CPU: the kernel of metalm_fast.decode_linear.
//
//   _decode_linear_cpu(x, weight, bias) -> y,    y = x @ weight.T + bias
//
// x [M, K] fp32 with few rows (M = the decode batch, 1..32), weight [N, K] fp32 as
// nn.Linear stores it (row-major, read in place: never packed or copied), bias
// [N] or None, y [M, N] fp32 contiguous. x and weight may have a row stride; their
// last dim must be contiguous.
//
// Why not F.linear: with few rows the work is reading the weight once (N * K
// floats) against 2 M FLOPs per weight element. MKL's sgemm on this AMD CPU
// streams the weight well below memory speed for so few rows, slower still when
// the weight is not in cache, which is the real case: per decode step the KV cache
// streams through the caches between two uses of a layer's weights (figures:
// benchmarks/results). Here:
//
//   - a block of kRows weight rows is the unit of work: its kRows x MR products
//     are dot products, accumulated over K in 16-lane vectors (kRows + MR vector
//     loads feed kRows * MR FMAs; kRows * MR accumulators in registers), then a
//     transposing shuffle tree folds 16 accumulators into one vector of 16
//     outputs (the fold of paged_decode_tile.h) instead of 16 horizontal sums.
//     kRows = MR = 4: 16 accumulators + 4 weight vectors fit the 32 zmm registers
//     (6 x 4 and 8 x 3 tiles made GCC 12 keep the accumulators on the stack,
//     which ran much slower);
//   - the block stays in L1 while every block of MR rows of x passes over it, so
//     the weight is read from memory exactly once;
//   - while the first x block passes, the rows of the block kPrefetchBytes
//     ahead are prefetched to L2 (prefetcht1), one cache line per row per
//     16-float chunk. The stream is sequential, but the hardware prefetcher
//     alone left the loop waiting on memory when the weight was not in cache
//     (Zen 4, LM head 8192 x 256, M = 8, weight evicted: prefetching to L2 was
//     clearly faster than to L1 or not at all; 8 KiB or 32 KiB ahead did no
//     better than 16 KiB).
//
// Any K: the last K % 16 floats of each row (of x once per call, of the weight
// block once per block) are copied into zero-padded 16-float rows, so the tail is
// one more vector step. Any N: the last block repeats the last weight row in its
// unused slots (computed, never stored). Any M >= 0: the last x block uses a
// smaller MR.
//
// Threads: at::parallel_for over weight blocks, with a grain of
// kMinFlopsPerThread, so a decode-sized layer runs on the calling thread.
//
// The kernel is compiled for AVX-512, AVX2+FMA and baseline x86-64 (target_clones)
// through GCC vector extensions, as paged_decode_tile.h is (the AVX2 clone has 16
// ymm registers for 32 accumulator halves, so it spills: correct, not tuned).
// Accumulation is fp32;
// each output sums 16 lane-wise running sums pairwise, so its rounding does not
// depend on the ISA.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "span_attention_rows.h"
#include "vec16.h"

namespace metalm_fast::cpu {
namespace {

using vec16::f32x16;
using vec16::fold1;
using vec16::fold2;
using vec16::fold3;
using vec16::fold4;
using vec16::kLanes;  // floats per vector (one zmm, two ymm or four xmm)
using vec16::load16;
using vec16::CacheLevel;
using vec16::prefetch;

constexpr int kRows = 4;   // weight rows per block
constexpr int kXRows = 4;  // x rows per register tile: 16 accumulators, 4 + 4 loads
constexpr int64_t kPrefetchBytes = 16 << 10;              // prefetch distance in the weight
constexpr int64_t kMinFlopsPerThread = int64_t{1} << 23;  // enough work to pay for a thread

// sums[j] = the sum of acc[j]'s 16 lanes, for j < count; 16 accumulators per tree
// (a short last group is padded with zero vectors, which the compiler folds away).
// The vectors are copied into a local array first: folding straight from acc
// (vec16::fold16 with a lambda reading acc) kept the accumulators in memory and made
// the whole kernel much slower.
template <int count>
METALM_ALWAYS_INLINE void fold_sums(const f32x16* acc, float* sums) {
  for (int group = 0; group < count; group += 16) {
    f32x16 v[16];
    for (int j = 0; j < 16; ++j) v[j] = group + j < count ? acc[group + j] : f32x16{};
    f32x16 quarter[4];
    for (int q = 0; q < 4; ++q)
      quarter[q] = fold2(fold1(v[4 * q], v[4 * q + 1]), fold1(v[4 * q + 2], v[4 * q + 3]));
    const f32x16 all = fold4(fold3(quarter[0], quarter[1]), fold3(quarter[2], quarter[3]));
    for (int j = 0; j < 16 && group + j < count; ++j) sums[group + j] = all[j];
  }
}

// ----------------------------------------------------------------------------- tile
// The kRows x MR dot products of one weight block and MR x rows over K:
// `chunks` full 16-float chunks read in place, then (when tail) one chunk from
// the zero-padded copies w_tail [kRows][16] and x_tail rows. out[r * MR + m] =
// w_r . x_m. With `ahead` set (the rows of the block ahead), one line of each of
// them is prefetched per chunk.
template <int MR>
METALM_ALWAYS_INLINE void dot_tile(const float* const* w, const float* const* x, int64_t chunks,
                                   const float* w_tail, const float* const* x_tail,
                                   const float* const* ahead, float* out) {
  f32x16 acc[kRows * MR];
  for (int i = 0; i < kRows * MR; ++i) acc[i] = f32x16{};
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k = c * kLanes;
    if (ahead != nullptr)
      for (int r = 0; r < kRows; ++r) prefetch<CacheLevel::kL2>(ahead[r] + k);
    f32x16 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = load16(w[r] + k);
    for (int m = 0; m < MR; ++m) {
      const f32x16 xv = load16(x[m] + k);
      for (int r = 0; r < kRows; ++r) acc[r * MR + m] += wv[r] * xv;
    }
  }
  if (w_tail != nullptr) {
    for (int m = 0; m < MR; ++m) {
      const f32x16 xv = load16(x_tail[m]);
      for (int r = 0; r < kRows; ++r) acc[r * MR + m] += load16(w_tail + r * kLanes) * xv;
    }
  }
  fold_sums<kRows * MR>(acc, out);
}

struct Problem {
  const float* x;
  const float* weight;
  const float* bias;  // nullptr when None
  float* y;
  int64_t m, n, k;
  int64_t x_stride, w_stride;  // row strides in elements
  const float* x_tail;         // [m][16]: the last k % 16 floats of each x row, zero-padded
};

// Weight blocks [block_begin, block_end) against every row of x.
METALM_CPU_CLONES static void linear_blocks(const Problem& p, int64_t block_begin,
                                            int64_t block_end) {
  const int64_t chunks = p.k / kLanes;
  const int64_t tail = p.k % kLanes;
  const int64_t blocks = (p.n + kRows - 1) / kRows;
  const int64_t ahead_blocks =
      std::max<int64_t>(1, kPrefetchBytes / (kRows * std::max<int64_t>(p.k, 1) * 4));
  alignas(64) float w_tail[kRows * kLanes] = {};
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t n0 = block * kRows;
    const float* w[kRows];
    for (int r = 0; r < kRows; ++r) w[r] = p.weight + std::min(n0 + r, p.n - 1) * p.w_stride;
    const float* ahead[kRows];
    const float* const* ahead_rows = nullptr;  // none past the last block
    if (block + ahead_blocks < blocks) {
      const int64_t n_ahead = n0 + ahead_blocks * kRows;
      for (int r = 0; r < kRows; ++r)
        ahead[r] = p.weight + std::min(n_ahead + r, p.n - 1) * p.w_stride;
      ahead_rows = ahead;
    }
    if (tail > 0)
      for (int r = 0; r < kRows; ++r) std::memcpy(w_tail + r * kLanes, w[r] + chunks * kLanes,
                                                  tail * sizeof(float));
    const int64_t valid_rows = std::min<int64_t>(kRows, p.n - n0);
    for (int64_t m0 = 0; m0 < p.m; m0 += kXRows) {
      const int64_t rows = std::min<int64_t>(kXRows, p.m - m0);
      const float* x[kXRows];
      const float* x_tail[kXRows];
      for (int64_t i = 0; i < rows; ++i) {
        x[i] = p.x + (m0 + i) * p.x_stride;
        x_tail[i] = tail > 0 ? p.x_tail + (m0 + i) * kLanes : nullptr;
      }
      float out[kRows * kXRows];
      const float* wt = tail > 0 ? w_tail : nullptr;
      const float* const* pf = m0 == 0 ? ahead_rows : nullptr;
      // MR = rows: a short last x block computes no padding rows.
      static_assert(kXRows <= 8, "add cases below for larger x tiles");
      switch (rows) {
        case 1: dot_tile<1>(w, x, chunks, wt, x_tail, pf, out); break;
        case 2: dot_tile<kXRows >= 2 ? 2 : 1>(w, x, chunks, wt, x_tail, pf, out); break;
        case 3: dot_tile<kXRows >= 3 ? 3 : 1>(w, x, chunks, wt, x_tail, pf, out); break;
        case 4: dot_tile<kXRows >= 4 ? 4 : 1>(w, x, chunks, wt, x_tail, pf, out); break;
        case 5: dot_tile<kXRows >= 5 ? 5 : 1>(w, x, chunks, wt, x_tail, pf, out); break;
        case 6: dot_tile<kXRows >= 6 ? 6 : 1>(w, x, chunks, wt, x_tail, pf, out); break;
        case 7: dot_tile<kXRows >= 7 ? 7 : 1>(w, x, chunks, wt, x_tail, pf, out); break;
        default: dot_tile<kXRows>(w, x, chunks, wt, x_tail, pf, out); break;
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* y_row = p.y + (m0 + i) * p.n + n0;
        for (int64_t r = 0; r < valid_rows; ++r)
          y_row[r] = out[r * rows + i] + (p.bias != nullptr ? p.bias[n0 + r] : 0.0f);
      }
    }
  }
}

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "decode_linear (cpu): x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "decode_linear (cpu): weight must be 2-D [N, K], got ",
              weight.dim(), "-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "decode_linear (cpu): x.size(1) (", x.size(1),
              ") must equal weight.size(1) (", weight.size(1), ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "decode_linear (cpu): x and weight must be float32, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "decode_linear (cpu): x and weight must be CPU tensors");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1,
              "decode_linear (cpu): x needs a contiguous last dim, got strides ", x.strides());
  TORCH_CHECK(weight.stride(1) == 1 || weight.size(1) <= 1,
              "decode_linear (cpu): weight needs a contiguous last dim, got strides ",
              weight.strides());
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n,
                "decode_linear (cpu): bias must be [N] = [", n, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "decode_linear (cpu): bias must be a float32 CPU tensor, got ",
                bias->scalar_type(), " on ", bias->device());
  }
  at::Tensor y = at::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || n == 0) return y;
  const at::Tensor bias_contiguous = bias.has_value() ? bias->contiguous() : at::Tensor();

  const int64_t chunks = k / kLanes, tail = k % kLanes;
  std::vector<float> x_tail(tail > 0 ? static_cast<size_t>(m * kLanes) : 0, 0.0f);
  const float* x_data = x.const_data_ptr<float>();
  if (tail > 0)
    for (int64_t i = 0; i < m; ++i)
      std::memcpy(x_tail.data() + i * kLanes, x_data + i * x.stride(0) + chunks * kLanes,
                  tail * sizeof(float));

  Problem p;
  p.x = x_data;
  p.weight = weight.const_data_ptr<float>();
  p.bias = bias.has_value() ? bias_contiguous.const_data_ptr<float>() : nullptr;
  p.y = y.mutable_data_ptr<float>();
  p.m = m;
  p.n = n;
  p.k = k;
  p.x_stride = x.stride(0);
  p.w_stride = weight.stride(0);
  p.x_tail = x_tail.data();

  const int64_t blocks = (n + kRows - 1) / kRows;
  const int64_t flops_per_block = 2 * kRows * std::max<int64_t>(k, 1) * m;
  const int64_t grain = std::max<int64_t>(1, kMinFlopsPerThread / flops_per_block);
  at::parallel_for(0, blocks, grain,
                   [&](int64_t begin, int64_t end) { linear_blocks(p, begin, end); });
  return y;
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def("_decode_linear_cpu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_decode_linear_cpu", &metalm_fast::cpu::decode_linear_cpu);
}
