// Column-major GEMM on raw pointers for the CPU kernels: C = alpha op(A) op(B) + beta C.
//
// The kernels call BLAS once per tile, so per-call overhead matters: creating
// at::Tensor views per tile costs more than the math for 64 x 64 tiles. The
// float/double overloads of at::native::cpublas::gemm are not exported from
// libtorch, so we call the Fortran BLAS symbols (sgemm_/dgemm_) that libtorch
// re-exports from its statically linked MKL (or OpenBLAS). They are declared
// weak: a torch build that does not export them still links and loads, and the
// portable loop below takes over (correct, slower; METALM_FAST_CPU_GEMM=portable
// forces it, which is how the tests cover it).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>
#include <algorithm>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace metalm_fast::cpu {

// True when libtorch exports the Fortran BLAS symbols.
inline bool blas_enabled() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// The portable fallback: same column-major semantics as BLAS gemm. Each column
// sums into a fresh buffer, then C = beta C + alpha sum: blocked like BLAS, so
// long accumulations across calls (beta = 1) round like the BLAS path.
template <typename T>
void gemm_portable(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                   const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  std::vector<T> sum(static_cast<size_t>(m));
  for (int64_t j = 0; j < n; ++j) {
    std::fill(sum.begin(), sum.end(), T(0));
    for (int64_t p = 0; p < k; ++p) {
      const T b_pj = trans_b ? b[j + p * ldb] : b[p + j * ldb];
      if (trans_a) {
        for (int64_t i = 0; i < m; ++i) sum[i] += a[p + i * lda] * b_pj;
      } else {
        const T* a_col = a + p * lda;
        for (int64_t i = 0; i < m; ++i) sum[i] += a_col[i] * b_pj;
      }
    }
    T* c_col = c + j * ldc;
    for (int64_t i = 0; i < m; ++i)
      c_col[i] = beta == T(0) ? alpha * sum[i] : beta * c_col[i] + alpha * sum[i];
  }
}

inline int blas_int(int64_t value) {
  TORCH_CHECK(value <= std::numeric_limits<int>::max(),
              "span attention (cpu): a stride or size exceeds the BLAS 32-bit index range");
  return static_cast<int>(value);
}

// C (m x n, ldc) = alpha * op(A) * op(B) + beta * C, column-major, op = transpose when trans_*.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (!blas_enabled() || k == 0) {
    gemm_portable<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = blas_int(m), ni = blas_int(n), ki = blas_int(k);
  const int ldai = blas_int(lda), ldbi = blas_int(ldb), ldci = blas_int(ldc);
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &ldai, b, &ldbi, &beta, c, &ldci);
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                 double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (!blas_enabled() || k == 0) {
    gemm_portable<double>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = blas_int(m), ni = blas_int(n), ki = blas_int(k);
  const int ldai = blas_int(lda), ldbi = blas_int(ldb), ldci = blas_int(ldc);
  dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &ldai, b, &ldbi, &beta, c, &ldci);
}

}  // namespace metalm_fast::cpu
