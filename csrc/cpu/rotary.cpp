// Rotary position embedding on CPU: the inference kernel of metalm_fast.nn.rotary.
//
//   _rotary_cpu(x, cos, signed_sin) -> out
//   _rotary_cpu_(x!, cos, signed_sin) -> ()          the same, written over x
//
// x [T, H, D] (any row and head strides, last dim contiguous: q or k sliced from a
// fused qkv projection), cos and signed_sin [T, 1, D] contiguous ([cos, cos] and
// [-sin, sin] over the two halves of the head dim), out [T, H, D] contiguous:
//
//   out[t, h, d] = x[t, h, d] * cos[t, d] + x[t, h, d +- D/2] * signed_sin[t, d]
//
// which is the rotate-half formula (first * cos - second * sin, second * cos +
// first * sin) bit for bit as PyTorch evaluates it: two rounded products, then
// one rounded sum (this file turns off FMA contraction; a fused multiply-add
// would round once and change the last bit).
//
// Why a kernel: the PyTorch expression is four passes over q and k (two
// products, roll, sum) plus the roll's copies; at prefill sizes the tensors
// leave the caches, and the passes were a noticeable share of a small model's
// prefill. Here
// each row is read once and written once. Threads split the tokens. The in-place
// form (inference: q and k rotated inside the fused projection) also spares the
// fresh [T, H, D] output, whose page faults were about half of a prefill call.

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "span_attention_rows.h"  // METALM_CPU_CLONES

// After the include: its header turns contraction on for its own polynomials.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace metalm_fast::cpu {
namespace {

constexpr int64_t kElementsPerTask = 1 << 16;  // below this, threads cost more than they save

// One head row: out = x * c + rolled(x) * s, halves of `half` elements.
template <typename T>
METALM_ALWAYS_INLINE void rotate_row(T* __restrict out, const T* __restrict x,
                                     const T* __restrict c, const T* __restrict s, int64_t half) {
  for (int64_t d = 0; d < half; ++d) {
    const T product = x[d] * c[d];
    const T rolled = x[d + half] * s[d];
    out[d] = product + rolled;
  }
  for (int64_t d = half; d < 2 * half; ++d) {
    const T product = x[d] * c[d];
    const T rolled = x[d - half] * s[d];
    out[d] = product + rolled;
  }
}

// Where the rows of x are and where their rotations go ([T, H, D], element strides).
template <typename T>
struct Rows {
  const T* x;
  int64_t x_token_stride, x_head_stride;
  T* out;  // == x: in place
  int64_t out_token_stride, out_head_stride;
  const T* cos;
  const T* sin;
  int64_t heads, dim;
};

// Tokens [begin, end): every head row of each. In place, each row is copied to
// `row` (dim elements) first: out[d] needs x[d +- D/2], which the row's other half
// overwrites. The float version is compiled per ISA (target_clones), so the two
// half loops run in AVX-512 or AVX2 vectors where the CPU has them rather than the
// extension's SSE2 baseline (faster on q of a small-preset prefill, in cache).
template <typename T>
METALM_ALWAYS_INLINE void rotate_tokens_impl(const Rows<T>& r, int64_t begin, int64_t end,
                                             T* row) {
  const bool in_place = r.out == r.x;
  for (int64_t t = begin; t < end; ++t)
    for (int64_t h = 0; h < r.heads; ++h) {
      const T* src = r.x + t * r.x_token_stride + h * r.x_head_stride;
      if (in_place) src = std::copy_n(src, r.dim, row) - r.dim;
      rotate_row(r.out + t * r.out_token_stride + h * r.out_head_stride, src,
                 r.cos + t * r.dim, r.sin + t * r.dim, r.dim / 2);
    }
}

METALM_CPU_CLONES static void rotate_tokens(const Rows<float>& r, int64_t begin, int64_t end,
                                            float* row) {
  rotate_tokens_impl(r, begin, end, row);
}

static void rotate_tokens(const Rows<double>& r, int64_t begin, int64_t end, double* row) {
  rotate_tokens_impl(r, begin, end, row);
}

template <typename T>
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const Rows<T> rows{x.const_data_ptr<T>(), x.stride(0),   x.stride(1),
                     out.mutable_data_ptr<T>(), out.stride(0), out.stride(1),
                     cos.const_data_ptr<T>(), sin.const_data_ptr<T>(), x.size(1), x.size(2)};
  const int64_t grain =
      std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, rows.heads * rows.dim));
  at::parallel_for(0, x.size(0), grain, [&](int64_t begin, int64_t end) {
    std::vector<T> row(rows.out == rows.x ? rows.dim : 0);  // in place: a copy of one row
    rotate_tokens(rows, begin, end, row.data());
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 3, "rotary (cpu): x must be [T, H, D], got ", x.dim(), "-D");
  const int64_t tokens = x.size(0), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0, "rotary (cpu): the head dim D must be even, got ", dim);
  for (const at::Tensor* table : {&cos, &signed_sin}) {
    TORCH_CHECK(table->dim() == 3 && table->size(0) == tokens && table->size(1) == 1 &&
                    table->size(2) == dim && table->is_contiguous(),
                "rotary (cpu): cos and signed_sin must be contiguous [T, 1, D] = [", tokens,
                ", 1, ", dim, "], got ", table->sizes());
    TORCH_CHECK(table->scalar_type() == x.scalar_type(),
                "rotary (cpu): x, cos and signed_sin must share a dtype, got ", x.scalar_type(),
                " and ", table->scalar_type());
  }
  TORCH_CHECK(x.stride(2) == 1 || dim <= 1,
              "rotary (cpu): x needs a contiguous last dim, got strides ", x.strides());
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  check_inputs(x, cos, signed_sin);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotary_cpu",
                             [&] { rotate<scalar_t>(x, cos, signed_sin, out); });
  return out;
}

void rotary_cpu_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  check_inputs(x, cos, signed_sin);
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes,
              "rotary (cpu): x has elements that share memory (strides ", x.strides(),
              "): it cannot be rotated in place");
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotary_cpu_",
                             [&] { rotate<scalar_t>(x, cos, signed_sin, x); });
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def("_rotary_cpu(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
  m.def("_rotary_cpu_(Tensor(a!) x, Tensor cos, Tensor signed_sin) -> ()");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_rotary_cpu", &metalm_fast::cpu::rotary_cpu);
  m.impl("_rotary_cpu_", &metalm_fast::cpu::rotary_cpu_);
}
