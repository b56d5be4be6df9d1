// The C interface of csrc/cuda/kv_cache_append.cu, shared with bindings.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// Every stride is in bytes; rows are contiguous runs of row_bytes bytes.
struct MetalmKvAppendArgs {
  void* k_cache;
  void* v_cache;
  const void* k_new;
  const void* v_new;
  const int64_t* slots;  // [num_tokens], device memory
  int64_t num_tokens;
  int64_t kv_heads;
  int64_t row_bytes;  // head_dim * element size
  int64_t num_slots;  // num_blocks * block_size
  int64_t block_size;
  int64_t k_block_stride, k_slot_stride, k_head_stride;
  int64_t v_block_stride, v_slot_stride, v_head_stride;
  int64_t k_new_token_stride, k_new_head_stride;
  int64_t v_new_token_stride, v_new_head_stride;
};

// Copies k_new / v_new rows into their slots on `stream`; returns the launch status.
extern "C" cudaError_t metalm_kv_cache_append(const MetalmKvAppendArgs* args, cudaStream_t stream);
