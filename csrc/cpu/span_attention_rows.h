// Row-wise softmax arithmetic of span attention on one score tile (the non-GEMM work).
//
// A tile is `rows` x `cols` scores, row-major with leading dimension `ld`; row r
// may only use columns [lo[r], hi[r]) (its interval clipped to the tile; lo == hi
// when it sees none of the tile's keys). Masked entries are never exponentiated:
// they are written as exact zeros, so a fully masked row contributes nothing and
// no -inf arithmetic (hence no NaN) ever happens.
//
// The float versions are the hot loop of the CPU backend besides the tile
// products. The extension is built for the baseline x86-64 ISA, so they are
// compiled three times with GCC's target_clones (AVX-512, AVX2+FMA, baseline)
// and the loader picks the best clone for the machine (ifunc). Their exp is a
// Cephes-style polynomial (under 1 ulp on [-20, 0], checked against float64)
// written as straight-line code the compiler vectorises under `#pragma omp simd`.
// Row sums use 16 fixed lanes, so their rounding is the same on every ISA and
// optimisation level. The double versions use std::exp and favour exactness over
// speed (float64 is for tests and debugging).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__)
// Let the compiler fuse a * b + c into FMA in the polynomial (ISO mode disables it).
#pragma GCC optimize("fp-contract=fast")
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
// (`unused`: GCC counts only the dispatcher's uses and would warn about the clones.)
#define METALM_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), unused))
#else
#define METALM_CPU_CLONES
#endif

#define METALM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace metalm_fast::cpu::rows {

// exp(x) for x <= 88; exactly 0 below -87.3 (including -inf).
METALM_ALWAYS_INLINE float exp_approx(float x) {
  const float clamped = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (vectorises on every ISA).
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = clamped - n * 0.693359375f;  // ln 2 split in two for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.3f ? 0.0f : p * two_n;
}

METALM_ALWAYS_INLINE double exp_of(double x) { return std::exp(x); }
METALM_ALWAYS_INLINE float exp_of(float x) { return exp_approx(x); }

template <typename T>
METALM_ALWAYS_INLINE void zero_outside(T* row, int64_t lo, int64_t hi, int64_t cols) {
  for (int64_t j = 0; j < lo; ++j) row[j] = T(0);
  for (int64_t j = hi; j < cols; ++j) row[j] = T(0);
}

constexpr int64_t kLanes = 16;

// Online-softmax step of the forward pass. On entry S holds scaled scores; on
// exit S holds exp(S - m_new) (0 where masked), the running max m and sum l are
// updated and the output accumulator rows acc (rows x head_dim) are rescaled by
// exp(m_old - m_new) so that acc += P V completes the step.
template <typename T>
METALM_ALWAYS_INLINE void softmax_step_impl(T* scores, int64_t rows, int64_t cols, int64_t ld,
                                            const int32_t* lo, const int32_t* hi,
                                            T* row_max, T* row_sum, T* acc, int64_t head_dim) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = scores + r * ld;
    const int64_t a = lo[r], b = hi[r];
    if (a >= b) {
      zero_outside(s, cols, cols, cols);
      continue;
    }
    T tile_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = a; j < b; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
    const T old_max = row_max[r];
    const T new_max = old_max > tile_max ? old_max : tile_max;
    // 16 running sums (lane l takes columns a + l, a + l + 16, ...) added pairwise at
    // the end: the same rounding on every ISA and optimisation level, and more
    // accurate than one sequential sum.
    T lanes[kLanes] = {};
    int64_t j = a;
    for (; j + kLanes <= b; j += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const T p = exp_of(s[j + l] - new_max);
        s[j + l] = p;
        lanes[l] += p;
      }
    }
    for (int64_t l = 0; j < b; ++j, ++l) {
      const T p = exp_of(s[j] - new_max);
      s[j] = p;
      lanes[l] += p;
    }
    for (int64_t width = kLanes / 2; width > 0; width /= 2)
      for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    const T sum = lanes[0];
    zero_outside(s, a, b, cols);
    if (new_max != old_max) {
      // old_max == -inf on the row's first keys: acc and l are 0, so multiply by 0.
      const T alpha = old_max == -std::numeric_limits<T>::infinity()
                          ? T(0)
                          : static_cast<T>(std::exp(old_max - new_max));
      T* acc_row = acc + r * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= alpha;
      row_sum[r] *= alpha;
    }
    row_sum[r] += sum;
    row_max[r] = new_max;
  }
}

// Backward: S <- exp(S - lse) on allowed entries, 0 elsewhere (P recomputed from lse).
template <typename T>
METALM_ALWAYS_INLINE void probs_impl(T* scores, int64_t rows, int64_t cols, int64_t ld,
                                     const int32_t* lo, const int32_t* hi, const T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = scores + r * ld;
    const int64_t a = lo[r], b = hi[r];
    if (a >= b) {
      zero_outside(s, cols, cols, cols);
      continue;
    }
    const T row_lse = lse[r];
#pragma omp simd
    for (int64_t j = a; j < b; ++j) s[j] = exp_of(s[j] - row_lse);
    zero_outside(s, a, b, cols);
  }
}

// Backward: dP <- P * (dP - delta), the gradient of the scaled scores (before `scale`).
template <typename T>
METALM_ALWAYS_INLINE void dscores_impl(const T* probs, T* dprobs, int64_t rows, int64_t cols,
                                       int64_t ld, const int32_t* lo, const int32_t* hi,
                                       const T* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = probs + r * ld;
    T* dp = dprobs + r * ld;
    const int64_t a = lo[r], b = hi[r];
    if (a >= b) {
      zero_outside(dp, cols, cols, cols);
      continue;
    }
    const T row_delta = delta[r];
#pragma omp simd
    for (int64_t j = a; j < b; ++j) dp[j] = p[j] * (dp[j] - row_delta);
    zero_outside(dp, a, b, cols);
  }
}

METALM_CPU_CLONES static void softmax_step(float* scores, int64_t rows, int64_t cols,
                                           int64_t ld, const int32_t* lo, const int32_t* hi,
                                           float* row_max, float* row_sum, float* acc,
                                           int64_t head_dim) {
  softmax_step_impl(scores, rows, cols, ld, lo, hi, row_max, row_sum, acc, head_dim);
}
static inline void softmax_step(double* scores, int64_t rows, int64_t cols, int64_t ld,
                                const int32_t* lo, const int32_t* hi, double* row_max,
                                double* row_sum, double* acc, int64_t head_dim) {
  softmax_step_impl(scores, rows, cols, ld, lo, hi, row_max, row_sum, acc, head_dim);
}

METALM_CPU_CLONES static void probs(float* scores, int64_t rows, int64_t cols, int64_t ld,
                                    const int32_t* lo, const int32_t* hi, const float* lse) {
  probs_impl(scores, rows, cols, ld, lo, hi, lse);
}
static inline void probs(double* scores, int64_t rows, int64_t cols, int64_t ld,
                         const int32_t* lo, const int32_t* hi, const double* lse) {
  probs_impl(scores, rows, cols, ld, lo, hi, lse);
}

METALM_CPU_CLONES static void dscores(const float* probs, float* dprobs, int64_t rows,
                                      int64_t cols, int64_t ld, const int32_t* lo,
                                      const int32_t* hi, const float* delta) {
  dscores_impl(probs, dprobs, rows, cols, ld, lo, hi, delta);
}
static inline void dscores(const double* probs, double* dprobs, int64_t rows, int64_t cols,
                           int64_t ld, const int32_t* lo, const int32_t* hi,
                           const double* delta) {
  dscores_impl(probs, dprobs, rows, cols, ld, lo, hi, delta);
}

}  // namespace metalm_fast::cpu::rows
