// Paged KV-cache append in CUDA: the `cuda` backend of metalm_fast.kv_cache_append.
// Written against the CUDA runtime only (raw pointers and a stream, an extern "C"
// launcher) so it compiles with nvcc on any machine; bindings.cpp wraps it for torch.
//
//   k_cache[s / block_size, s % block_size, h, :] = k_new[t, h, :]    s = slots[t]
//   v_cache[...]                                  = v_new[t, h, :]
//
// A pure copy, so it is dtype-agnostic and bit-exact: rows move as raw units of
// 16, 8, 4, 2 or 1 bytes, the widest unit that every base pointer, stride and
// the row length are multiples of (16-byte uint4 for the usual D * 2 or 4
// bytes with aligned tensors). One thread block per token copies all Hkv rows of
// its key and its value; a slot < 0 (padding) or past the pool makes the block
// return without writing. Offsets are 64-bit.

#include "kv_cache_append.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 128;

template <typename Unit>
__device__ __forceinline__ void copy_row_units(char* dst, int64_t dst_head_stride, const char* src,
                                               int64_t src_head_stride, int64_t units_per_row,
                                               int64_t units) {
  for (int64_t i = threadIdx.x; i < units; i += blockDim.x) {
    const int64_t head = i / units_per_row, unit = i - head * units_per_row;
    reinterpret_cast<Unit*>(dst + head * dst_head_stride)[unit] =
        reinterpret_cast<const Unit*>(src + head * src_head_stride)[unit];
  }
}

template <typename Unit>
__global__ void __launch_bounds__(kThreads) kv_cache_append_kernel(MetalmKvAppendArgs a) {
  const int64_t token = blockIdx.x;
  const int64_t slot = a.slots[token];
  if (slot < 0 || slot >= a.num_slots) return;  // skipped, or outside the pool: never written
  const int64_t block = slot / a.block_size, offset = slot - block * a.block_size;
  const int64_t units_per_row = a.row_bytes / static_cast<int64_t>(sizeof(Unit));
  const int64_t units = a.kv_heads * units_per_row;
  copy_row_units<Unit>(
      static_cast<char*>(a.k_cache) + block * a.k_block_stride + offset * a.k_slot_stride,
      a.k_head_stride, static_cast<const char*>(a.k_new) + token * a.k_new_token_stride,
      a.k_new_head_stride, units_per_row, units);
  copy_row_units<Unit>(
      static_cast<char*>(a.v_cache) + block * a.v_block_stride + offset * a.v_slot_stride,
      a.v_head_stride, static_cast<const char*>(a.v_new) + token * a.v_new_token_stride,
      a.v_new_head_stride, units_per_row, units);
}

// The widest power-of-two unit (<= 16 bytes) dividing every address and byte count.
int64_t unit_bytes(const MetalmKvAppendArgs& a) {
  const uint64_t bits =
      reinterpret_cast<uintptr_t>(a.k_cache) | reinterpret_cast<uintptr_t>(a.v_cache) |
      reinterpret_cast<uintptr_t>(a.k_new) | reinterpret_cast<uintptr_t>(a.v_new) |
      static_cast<uint64_t>(a.row_bytes | a.k_block_stride | a.k_slot_stride | a.k_head_stride |
                            a.v_block_stride | a.v_slot_stride | a.v_head_stride |
                            a.k_new_token_stride | a.k_new_head_stride | a.v_new_token_stride |
                            a.v_new_head_stride) |
      16u;
  return static_cast<int64_t>(bits & (~bits + 1));  // lowest set bit
}

template <typename Unit>
cudaError_t launch(const MetalmKvAppendArgs& a, cudaStream_t stream) {
  kv_cache_append_kernel<Unit>
      <<<static_cast<unsigned>(a.num_tokens), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t metalm_kv_cache_append(const MetalmKvAppendArgs* args,
                                              cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const MetalmKvAppendArgs& a = *args;
  if (a.num_tokens == 0 || a.kv_heads == 0 || a.row_bytes == 0) return cudaSuccess;
  if (a.num_tokens > 0x7fffffff || a.block_size <= 0) return cudaErrorInvalidValue;
  switch (unit_bytes(a)) {
    case 16: return launch<uint4>(a, stream);
    case 8: return launch<uint2>(a, stream);
    case 4: return launch<uint32_t>(a, stream);
    case 2: return launch<uint16_t>(a, stream);
    default: return launch<uint8_t>(a, stream);
  }
}
