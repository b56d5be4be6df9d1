// Encoder-to-decoder embedding scatter in CUDA: the `cuda` backend of
// metalm_fast.embed_scatter. Written against the CUDA runtime only (raw pointers
// and a stream, extern "C" launchers) so it compiles with nvcc on any machine;
// csrc/cuda/bindings.cpp wraps it for torch.
//
//   out[t] = weight[ids[t]] * scale   where rows[t] < 0
//          = features[rows[t]]        otherwise
//
// Forward: one block per output row, threads striding over the columns in
// 16-byte vectors when every row start is 16-byte aligned (the common case:
// Dm a multiple of 8 halves / 4 floats), else element by element. Each output
// element is read once and written once.
//
// Backward (deterministic, no atomics): the caller sorts positions by key
// (stable) into `order` with CSR `offsets`; one block per (key row, column
// chunk) sums its positions' gradient rows in fp32, in position order, and
// writes the row once (zeros for empty rows and `skip_row`).
//
// Every offset is 64-bit. Ids or rows out of range are never dereferenced: they
// read as zeros (the op layer has already queued a device-side assert for them,
// so this is defence in depth, not the contract). Launch sizes the grid cannot
// hold (rows >= 2^31 on grid.x, column chunks > 65535 on grid.y) are refused with
// cudaErrorInvalidValue rather than truncated by the unsigned casts below.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One block per output row.
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) embed_scatter_fwd_kernel(
    T* __restrict__ out, const T* __restrict__ weight, const T* __restrict__ features,
    const int64_t* __restrict__ ids, const int64_t* __restrict__ rows, int64_t width,
    int64_t num_embeddings, int64_t num_features, int64_t stride_out, int64_t stride_weight,
    int64_t stride_features, float scale) {
  const int64_t t = blockIdx.x;
  const int64_t row = rows[t];
  const int64_t id = ids[t];
  const bool is_feature = row >= 0;
  const bool in_range = is_feature ? row < num_features : (id >= 0 && id < num_embeddings);
  T* dst = out + t * stride_out;
  const T* src = is_feature ? features + row * stride_features : weight + id * stride_weight;
  const bool copy = is_feature || scale == 1.0f;
  if (kVectorized && in_range && copy) {
    constexpr int kPerVector = 16 / sizeof(T);
    const int64_t vectors = width / kPerVector;
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    return;
  }
  for (int64_t d = threadIdx.x; d < width; d += blockDim.x) {
    T value = from_float<T>(0.0f);
    if (in_range) value = copy ? src[d] : from_float<T>(to_float(src[d]) * scale);
    dst[d] = value;
  }
}

// One block per (key row, chunk of kThreads columns).
template <typename T>
__global__ void __launch_bounds__(kThreads) segment_sum_kernel(
    T* __restrict__ dst, const T* __restrict__ grad, const int32_t* __restrict__ order,
    const int32_t* __restrict__ offsets, int64_t width, int64_t stride_dst, int64_t stride_grad,
    float factor, int64_t skip_row) {
  const int64_t r = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= width) return;
  float total = 0.0f;
  if (r != skip_row) {
    for (int32_t i = offsets[r]; i < offsets[r + 1]; ++i)
      total += to_float(grad[static_cast<int64_t>(order[i]) * stride_grad + d]);
  }
  dst[r * stride_dst + d] = from_float<T>(total * factor);
}

template <typename T>
bool aligned16(const T* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * sizeof(T)) % 16 == 0;
}

template <typename T>
cudaError_t launch_fwd(void* out, const void* weight, const void* features, const int64_t* ids,
                       const int64_t* rows, int64_t tokens, int64_t width,
                       int64_t num_embeddings, int64_t num_features, int64_t stride_out,
                       int64_t stride_weight, int64_t stride_features, float scale,
                       cudaStream_t stream) {
  if (tokens == 0 || width == 0) return cudaSuccess;
  if (tokens < 0 || tokens > kMaxGridX) return cudaErrorInvalidValue;
  auto* o = static_cast<T*>(out);
  const auto* w = static_cast<const T*>(weight);
  const auto* f = static_cast<const T*>(features);
  const bool vectorized = (width * sizeof(T)) % 16 == 0 && aligned16(o, stride_out) &&
                          aligned16(w, stride_weight) && aligned16(f, stride_features);
  const dim3 grid(static_cast<unsigned>(tokens));
  if (vectorized) {
    embed_scatter_fwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        o, w, f, ids, rows, width, num_embeddings, num_features, stride_out, stride_weight,
        stride_features, scale);
  } else {
    embed_scatter_fwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        o, w, f, ids, rows, width, num_embeddings, num_features, stride_out, stride_weight,
        stride_features, scale);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_segment_sum(void* dst, const void* grad, const int32_t* order,
                               const int32_t* offsets, int64_t num_rows, int64_t width,
                               int64_t stride_dst, int64_t stride_grad, float factor,
                               int64_t skip_row, cudaStream_t stream) {
  if (num_rows == 0 || width == 0) return cudaSuccess;
  if (num_rows < 0 || num_rows > kMaxGridX || (width + kThreads - 1) / kThreads > kMaxGridY)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_rows),
                  static_cast<unsigned>((width + kThreads - 1) / kThreads));
  segment_sum_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<T*>(dst), static_cast<const T*>(grad), order, offsets, width, stride_dst,
      stride_grad, factor, skip_row);
  return cudaGetLastError();
}

}  // namespace

// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
extern "C" cudaError_t metalm_embed_scatter_fwd(
    int dtype, void* out, const void* weight, const void* features, const int64_t* ids,
    const int64_t* rows, int64_t tokens, int64_t width, int64_t num_embeddings,
    int64_t num_features, int64_t stride_out, int64_t stride_weight, int64_t stride_features,
    float scale, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      return launch_fwd<float>(out, weight, features, ids, rows, tokens, width, num_embeddings,
                               num_features, stride_out, stride_weight, stride_features, scale,
                               stream);
    case 1:
      return launch_fwd<__half>(out, weight, features, ids, rows, tokens, width,
                                num_embeddings, num_features, stride_out, stride_weight,
                                stride_features, scale, stream);
    case 2:
      return launch_fwd<__nv_bfloat16>(out, weight, features, ids, rows, tokens, width,
                                       num_embeddings, num_features, stride_out,
                                       stride_weight, stride_features, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t metalm_embed_scatter_segment_sum(
    int dtype, void* dst, const void* grad, const int32_t* order, const int32_t* offsets,
    int64_t num_rows, int64_t width, int64_t stride_dst, int64_t stride_grad, float factor,
    int64_t skip_row, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      return launch_segment_sum<float>(dst, grad, order, offsets, num_rows, width, stride_dst,
                                       stride_grad, factor, skip_row, stream);
    case 1:
      return launch_segment_sum<__half>(dst, grad, order, offsets, num_rows, width, stride_dst,
                                        stride_grad, factor, skip_row, stream);
    case 2:
      return launch_segment_sum<__nv_bfloat16>(dst, grad, order, offsets, num_rows, width,
                                               stride_dst, stride_grad, factor, skip_row, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
