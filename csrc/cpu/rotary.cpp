// Rotary position embedding on CPU: the inference kernel of metalm_fast.nn.rotary.
//
//   _rotary_cpu(x, cos, signed_sin) -> out
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
// leave the caches, and the passes took ~15 % of a small model's prefill. Here
// each row is read once and written once. Threads split the tokens.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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

// Tokens [begin, end): every head row of each. The float version is compiled per ISA
// (target_clones), so the two half loops run in AVX-512 or AVX2 vectors where the
// CPU has them rather than the extension's SSE2 baseline (q of a small-preset prefill,
// [4950, 8, 32] strided, in cache: 0.42 -> 0.35 ms).
template <typename T>
METALM_ALWAYS_INLINE void rotate_tokens_impl(T* out, const T* x, const T* cos, const T* sin,
                                             int64_t begin, int64_t end, int64_t heads,
                                             int64_t dim, int64_t token_stride,
                                             int64_t head_stride) {
  for (int64_t t = begin; t < end; ++t)
    for (int64_t h = 0; h < heads; ++h)
      rotate_row(out + (t * heads + h) * dim, x + t * token_stride + h * head_stride,
                 cos + t * dim, sin + t * dim, dim / 2);
}

METALM_CPU_CLONES static void rotate_tokens(float* out, const float* x, const float* cos,
                                            const float* sin, int64_t begin, int64_t end,
                                            int64_t heads, int64_t dim, int64_t token_stride,
                                            int64_t head_stride) {
  rotate_tokens_impl(out, x, cos, sin, begin, end, heads, dim, token_stride, head_stride);
}

static void rotate_tokens(double* out, const double* x, const double* cos, const double* sin,
                          int64_t begin, int64_t end, int64_t heads, int64_t dim,
                          int64_t token_stride, int64_t head_stride) {
  rotate_tokens_impl(out, x, cos, sin, begin, end, heads, dim, token_stride, head_stride);
}

template <typename T>
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  const T* x_data = x.const_data_ptr<T>();
  const T* cos_data = cos.const_data_ptr<T>();
  const T* sin_data = sin.const_data_ptr<T>();
  T* out_data = out.mutable_data_ptr<T>();
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, heads * dim));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    rotate_tokens(out_data, x_data, cos_data, sin_data, begin, end, heads, dim, token_stride,
                  head_stride);
  });
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
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
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotary_cpu",
                             [&] { rotate<scalar_t>(x, cos, signed_sin, out); });
  return out;
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def("_rotary_cpu(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) { m.impl("_rotary_cpu", &metalm_fast::cpu::rotary_cpu); }
