// Tile matrix products of the CPU span-attention kernels, in one form:
//
//   C[i, n] (= or +=) alpha * sum_p A(i, p) * B(p, n),   i < M, n < N, p < K,
//   A(i, p) = a[i * a_row + p * a_col],  B(p, n) = b[p * b_row + n * b_col],
//   C row-major with leading dimension ldc.
//
// Every product of attention is this form (S = Q K^T with B = K^T, acc += P V,
// dV += P^T dO with A transposed, ...). Three implementations:
//
// - register-blocked micro-kernels (x86 AVX-512 or AVX2+FMA, float only) for
//   b_col == 1 and N a multiple of the vector width. They need no packing: the
//   callers keep B row-contiguous (K^T and V^T are transposed once per call, V,
//   K, Q and dO rows are used in place) and A is read by scalar broadcasts, so
//   a tile costs only its FMAs. Each C element sums over p in a fixed order
//   (chunks of 64 terms added to C in turn): results do not depend on threads,
//   on the tile's shape or on where it starts.
// - BLAS (sgemm_/dgemm_, see cpu_blas.h), which packs both operands per call;
// - the portable loop of cpu_blas.h.
//
// Written with GCC vector extensions inside functions compiled for one target
// each, so the library still runs on any x86-64 (the caller picks the kernel
// from __builtin_cpu_supports).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_blas.h"

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define METALM_HAVE_X86_KERNELS 1
#else
#define METALM_HAVE_X86_KERNELS 0
#endif

namespace metalm_fast::cpu::tile {

enum class Kernel { kPortable, kBlas, kAvx2, kAvx512 };

// Vector width (floats) of a micro-kernel; 1 for the others.
inline int64_t vector_width(Kernel kernel) {
  return kernel == Kernel::kAvx512 ? 16 : (kernel == Kernel::kAvx2 ? 8 : 1);
}

struct Product {
  int64_t m, n, k;
  const void* a;
  int64_t a_row, a_col;
  const void* b;
  int64_t b_row, b_col;
  void* c;
  int64_t ldc;
  bool accumulate;
  double alpha = 1.0;
  // Sums over p run in chunks of `depth` terms, each added to C in turn (blocked
  // summation). Short chunks cut the rounding of a long dot product; the
  // backward's dP = dO V^T needs that, since dS = P * (dP - delta) cancels.
  int64_t depth = 64;
};

#if METALM_HAVE_X86_KERNELS
// The vector helpers are always inlined into target-specific functions, so the
// ABI note GCC gives for passing wide vectors in baseline code does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
namespace micro {

#define METALM_INLINE inline __attribute__((always_inline))

template <typename V>
METALM_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
METALM_INLINE void store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// One R x (NV * W) block of C: R * NV accumulators live in registers for all of K.
template <typename V, int W, int R, int NV>
METALM_INLINE void block(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                         int64_t b_row, float* c, int64_t ldc, bool accumulate, float alpha) {
  // The block's partial sums start at 0 and are added to C at the end: a blocked
  // summation, like BLAS, keeps the rounding of long accumulations (dK, dV over
  // many query blocks) at the level of the reference's.
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t p = 0; p < k; ++p) {
    const float* b_row_p = b + p * b_row;
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load<V>(b_row_p + v * W);
    const float* a_p = a + p * a_col;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V av = a_p[r * a_row] - V{};  // a broadcast (x - 0 folds to x; x + 0 does not)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* out = c + r * ldc + v * W;
      const V sum = alpha == 1.0f ? acc[r][v] : acc[r][v] * alpha;
      store<V>(out, accumulate ? load<V>(out) + sum : sum);
    }
}

template <typename V, int W, int R, int NV>
METALM_INLINE void rows_of(int64_t rows, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                           const float* b, int64_t b_row, float* c, int64_t ldc, bool accumulate,
                           float alpha) {
  if constexpr (R > 0) {
    if (rows == R) {
      block<V, W, R, NV>(k, a, a_row, a_col, b, b_row, c, ldc, accumulate, alpha);
    } else {
      rows_of<V, W, R - 1, NV>(rows, k, a, a_row, a_col, b, b_row, c, ldc, accumulate, alpha);
    }
  }
}

template <typename V, int W, int RMAX, int NV>
METALM_INLINE void panel(const Product& p, int64_t n0) {
  const float* a = static_cast<const float*>(p.a);
  const float* b = static_cast<const float*>(p.b) + n0;
  float* c = static_cast<float*>(p.c) + n0;
  // Blocked summation over p (see Product::depth): long sums (dQ over 256 keys)
  // round like the reference's.
  const int64_t chunk = std::max<int64_t>(p.depth, 1);
  for (int64_t k0 = 0; k0 < std::max<int64_t>(p.k, 1); k0 += chunk) {
    const int64_t depth = std::min<int64_t>(chunk, p.k - k0);
    for (int64_t i0 = 0; i0 < p.m; i0 += RMAX) {
      const int64_t rows = std::min<int64_t>(RMAX, p.m - i0);
      rows_of<V, W, RMAX, NV>(rows, depth, a + i0 * p.a_row + k0 * p.a_col, p.a_row, p.a_col,
                              b + k0 * p.b_row, p.b_row, c + i0 * p.ldc, p.ldc,
                              p.accumulate || k0 > 0, static_cast<float>(p.alpha));
    }
  }
}

template <typename V, int W, int RMAX, int NVMAX>
METALM_INLINE void run(const Product& p) {
  for (int64_t n0 = 0; n0 < p.n; n0 += NVMAX * W) {
    const int64_t vectors = std::min<int64_t>(NVMAX, (p.n - n0) / W);
    if constexpr (NVMAX >= 4) {
      if (vectors == 4) { panel<V, W, RMAX, 4>(p, n0); continue; }
      if (vectors == 3) { panel<V, W, RMAX, 3>(p, n0); continue; }
    }
    if (vectors == 2) {
      panel<V, W, RMAX, 2>(p, n0);
    } else {
      panel<V, W, RMAX, 1>(p, n0);
    }
  }
}

#undef METALM_INLINE

}  // namespace micro

// 6 x 64 blocks: 24 zmm accumulators, 4 loads and 6 broadcasts per 24 FMAs.
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
inline void run_avx512(const Product& p) {
  typedef float V __attribute__((vector_size(64)));
  micro::run<V, 16, 6, 4>(p);
}

// 6 x 16 blocks: 12 ymm accumulators (the classic AVX2 sgemm shape).
__attribute__((target("avx2,fma"))) inline void run_avx2(const Product& p) {
  typedef float V __attribute__((vector_size(32)));
  micro::run<V, 8, 6, 2>(p);
}
#pragma GCC diagnostic pop
#endif  // METALM_HAVE_X86_KERNELS

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols (K or V -> K^T, V^T).
template <typename T>
void transpose(const T* src, int64_t src_ld, int64_t rows, int64_t cols, T* dst, int64_t dst_ld) {
  int64_t r0 = 0;
#if defined(__SSE2__)
  if constexpr (sizeof(T) == sizeof(float)) {
    // 4 x 4 blocks in SSE registers (x86-64 baseline): 4 loads, 8 shuffles, 4 stores.
    for (; r0 + 4 <= rows; r0 += 4) {
      int64_t c0 = 0;
      for (; c0 + 4 <= cols; c0 += 4) {
        __m128 a = _mm_loadu_ps(src + (r0 + 0) * src_ld + c0);
        __m128 b = _mm_loadu_ps(src + (r0 + 1) * src_ld + c0);
        __m128 c = _mm_loadu_ps(src + (r0 + 2) * src_ld + c0);
        __m128 d = _mm_loadu_ps(src + (r0 + 3) * src_ld + c0);
        _MM_TRANSPOSE4_PS(a, b, c, d);
        _mm_storeu_ps(dst + (c0 + 0) * dst_ld + r0, a);
        _mm_storeu_ps(dst + (c0 + 1) * dst_ld + r0, b);
        _mm_storeu_ps(dst + (c0 + 2) * dst_ld + r0, c);
        _mm_storeu_ps(dst + (c0 + 3) * dst_ld + r0, d);
      }
      for (; c0 < cols; ++c0)
        for (int64_t r = r0; r < r0 + 4; ++r) dst[c0 * dst_ld + r] = src[r * src_ld + c0];
    }
  }
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = src[r * src_ld + c];
}

// The fastest kernel this machine runs for float tiles: AVX-512 when head_dim is a
// multiple of 16 (N = head_dim in half of the products), else AVX2+FMA when it is
// a multiple of 8, else BLAS. float64 always takes BLAS (or the portable loop when
// libtorch exports no BLAS). METALM_FAST_CPU_GEMM=avx512|avx2|blas|portable
// forces a choice (read per call: tests and benchmarks cover every path); a
// forced micro-kernel the CPU lacks falls back to the next one.
inline Kernel pick_kernel(bool is_float, int64_t head_dim) {
  const char* env = std::getenv("METALM_FAST_CPU_GEMM");
  const std::string forced = env == nullptr ? "" : env;
  const Kernel fallback =
      (!blas_enabled() || forced == "portable") ? Kernel::kPortable : Kernel::kBlas;
  if (!is_float || forced == "blas" || forced == "portable") return fallback;
#if METALM_HAVE_X86_KERNELS
  if (forced != "avx2" && head_dim % 16 == 0 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return Kernel::kAvx512;
  if (head_dim % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Kernel::kAvx2;
#endif
  return fallback;
}

// BLAS / portable: row-major C = A B is column-major C^T = B^T A^T.
template <typename T>
void run_blas(const Product& p, bool portable) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* c = static_cast<T*>(p.c);
  // B^T as column-major N x K is "N" with ld b_row when b_col == 1 (needs ld >= N),
  // else "T" of a K x N matrix with ld b_col. A^T as column-major K x M: "T" of an
  // M x K matrix with ld a_col when a_row == 1 (needs ld >= M), else "N" with ld a_row.
  const bool b_rows = p.b_col == 1 && (p.b_row >= p.n || p.b_row != 1);
  const bool a_rows = !(p.a_row == 1 && p.a_col >= p.m);
  const int64_t ldb = b_rows ? p.b_row : p.b_col;
  const int64_t lda = a_rows ? p.a_row : p.a_col;
  const T beta = p.accumulate ? T(1) : T(0);
  const T alpha = static_cast<T>(p.alpha);
  if (portable) {
    gemm_portable<T>(!b_rows, !a_rows, p.n, p.m, p.k, alpha, b, std::max<int64_t>(ldb, 1), a,
                     std::max<int64_t>(lda, 1), beta, c, p.ldc);
  } else {
    gemm(!b_rows, !a_rows, p.n, p.m, p.k, alpha, b, std::max<int64_t>(ldb, 1), a,
         std::max<int64_t>(lda, 1), beta, c, p.ldc);
  }
}

template <typename T>
void matmul(Kernel kernel, const Product& p) {
  if (p.m == 0 || p.n == 0) return;
  if (kernel != Kernel::kAvx512 && kernel != Kernel::kAvx2 && p.depth < p.k) {
    // BLAS and the portable loop sum over all of K at once: split K instead.
    for (int64_t k0 = 0; k0 < p.k; k0 += p.depth) {
      Product part = p;
      part.k = std::min(p.depth, p.k - k0);
      part.a = static_cast<const T*>(p.a) + k0 * p.a_col;
      part.b = static_cast<const T*>(p.b) + k0 * p.b_row;
      part.accumulate = p.accumulate || k0 > 0;
      part.depth = part.k;
      matmul<T>(kernel, part);
    }
    return;
  }
#if METALM_HAVE_X86_KERNELS
  if constexpr (sizeof(T) == sizeof(float)) {
    if (kernel == Kernel::kAvx512 && p.b_col == 1 && p.n % 16 == 0) return run_avx512(p);
    if ((kernel == Kernel::kAvx2 || kernel == Kernel::kAvx512) && p.b_col == 1 && p.n % 8 == 0)
      return run_avx2(p);
  }
#endif
  run_blas<T>(p, kernel == Kernel::kPortable);
}

}  // namespace metalm_fast::cpu::tile
