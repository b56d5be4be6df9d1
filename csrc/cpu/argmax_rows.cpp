// Row-wise argmax on CPU: greedy decoding's token choice.
//
//   _argmax_rows_cpu(logits) -> int64 [B]
//
// logits [B, V] fp32, rows contiguous (any row stride). The same answer as
// torch.argmax(logits, dim=-1): the first index of the row's maximum, where a
// NaN counts as larger than every number (the first NaN wins).
//
// Why a kernel: torch.argmax over a decode step's logits ([8, 8192]) scans one
// logit at a time; a vector scan reads a 32 KB row from L2 several times faster
// (figures: benchmarks/results). Each of 16 lanes keeps the
// largest value it has seen and where (a strictly larger value replaces it, so
// each lane keeps its first maximum); the answer is the smallest index among
// the lanes that hold the row's maximum. A row with a NaN is rescanned for its
// first NaN. Threads split the rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec16.h"

namespace metalm_fast::cpu {
namespace {

using vec16::f32x16;
using vec16::i32x16;
using vec16::kLanes;
using vec16::load16;
using vec16::select;

constexpr int64_t kLogitsPerTask = 1 << 16;

int64_t first_nan(const float* row, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (std::isnan(row[i])) return i;
  return -1;
}

METALM_CPU_CLONES int64_t argmax_row(const float* row, int64_t count) {
  int64_t best = 0;  // the scalar answer for what the vectors do not cover
  float best_value = row[0];
  int64_t start = 0;
  if (count >= kLanes) {
    f32x16 values = load16(row);
    i32x16 index, lane_index;
    for (int lane = 0; lane < kLanes; ++lane) index[lane] = lane_index[lane] = lane;
    i32x16 nan = values != values;
    for (start = kLanes; start + kLanes <= count; start += kLanes) {
      const f32x16 v = load16(row + start);
      const i32x16 larger = v > values;
      nan |= v != v;
      values = select(larger, v, values);
      index = (larger & (lane_index + static_cast<int32_t>(start))) | (~larger & index);
    }
    bool any_nan = false;
    for (int lane = 0; lane < kLanes; ++lane) any_nan |= nan[lane] != 0;
    if (any_nan) return first_nan(row, count);
    best_value = values[0];
    best = index[0];
    for (int lane = 1; lane < kLanes; ++lane) {
      if (values[lane] > best_value || (values[lane] == best_value && index[lane] < best)) {
        best_value = values[lane];
        best = index[lane];
      }
    }
  } else {
    start = 1;
    if (std::isnan(best_value)) return 0;
  }
  for (int64_t i = start; i < count; ++i) {  // the tail (or a row under 16 logits)
    if (std::isnan(row[i])) return first_nan(row, count);
    if (row[i] > best_value) {
      best_value = row[i];
      best = i;
    }
  }
  return best;
}

at::Tensor argmax_rows_cpu(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "argmax_rows (cpu): logits must be 2-D [B, V], got ",
              logits.dim(), "-D");
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "argmax_rows (cpu): logits must be float32");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows (cpu): logits must have V > 0 columns");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
              "argmax_rows (cpu): rows must be contiguous (stride(1) == 1)");
  // The vector loop indexes lanes with int32.
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int32_t>::max(),
              "argmax_rows (cpu): V must be below 2^31");
  const int64_t rows = logits.size(0), count = logits.size(1), stride = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = logits.const_data_ptr<float>();
  int64_t* result = out.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kLogitsPerTask / count);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) result[r] = argmax_row(data + r * stride, count);
  });
  return out;
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) { m.def("_argmax_rows_cpu(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_argmax_rows_cpu", &metalm_fast::cpu::argmax_rows_cpu);
}
