// 16-float vectors for the CPU kernels, through GCC vector extensions: every
// target_clones clone (METALM_CPU_CLONES) lowers an f32x16 to its own ISA (one
// zmm, two ymm or four xmm). Shared by paged_decode_tile.h and decode_linear.cpp.
#pragma once

#include <cstdint>

#include "span_attention_rows.h"

namespace metalm_fast::cpu::vec16 {

constexpr int64_t kLanes = 16;  // floats per vector

using f32x16 = float __attribute__((vector_size(kLanes * sizeof(float))));
using i32x16 = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

METALM_ALWAYS_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

METALM_ALWAYS_INLINE void store16(float* p, f32x16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

METALM_ALWAYS_INLINE f32x16 splat(float x) { return f32x16{} + x; }

// Lane-wise mask ? a : b, with bitwise operations: GCC turned the vector `?:` into
// one branch per lane in the target_clones build.
METALM_ALWAYS_INLINE f32x16 select(i32x16 mask, f32x16 a, f32x16 b) {
  const i32x16 bits =
      (mask & __builtin_bit_cast(i32x16, a)) | (~mask & __builtin_bit_cast(i32x16, b));
  return __builtin_bit_cast(f32x16, bits);
}

METALM_ALWAYS_INLINE f32x16 max_of(f32x16 a, f32x16 b) { return select(a > b, a, b); }

// Swap blocks of `width` lanes (width 8, 4, 2, 1): one step of a horizontal reduction.
template <int width>
METALM_ALWAYS_INLINE f32x16 swap_blocks(f32x16 v) {
  if constexpr (width == 8) {
    return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  } else if constexpr (width == 4) {
    return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  } else if constexpr (width == 2) {
    return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  } else {
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
}

// ----------------------------------------------------------------------------- folds
// The transposing reduction: four levels of "add the two halves of every block of
// both inputs". Level 1 takes two vectors (16 partial sums each) to lanes 0-7
// (first) and 8-15 (second); levels 2, 3, 4 halve the blocks again, in order,
// until lane j holds the sum of vector j's lanes: 16 horizontal sums in 15
// shuffle-and-add steps instead of 16 dependent chains.
METALM_ALWAYS_INLINE f32x16 fold1(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
METALM_ALWAYS_INLINE f32x16 fold2(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                 31);
}
METALM_ALWAYS_INLINE f32x16 fold3(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                 31);
}
METALM_ALWAYS_INLINE f32x16 fold4(f32x16 x, f32x16 y) {
  return __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The 16 vectors product(0..15) folded into one, lane t = the sum of product t's
// lanes. The tree is built as the products arrive, so few vectors are live. Meant
// for a product that computes its vector (loads and FMAs): vectors already held in
// an array went through memory this way (decode_linear.cpp, much slower); fold those
// with fold1..fold4 on a local copy.
template <typename Product>
METALM_ALWAYS_INLINE f32x16 fold16(const Product& product) {
  f32x16 quarter[4];
  for (int i = 0; i < 4; ++i) {
    const f32x16 a = fold1(product(4 * i), product(4 * i + 1));
    const f32x16 b = fold1(product(4 * i + 2), product(4 * i + 3));
    quarter[i] = fold2(a, b);
  }
  return fold4(fold3(quarter[0], quarter[1]), fold3(quarter[2], quarter[3]));
}

// ----------------------------------------------------------------------------- memory
// Where a software prefetch puts the line.
enum class CacheLevel { kL1, kL2 };

// A software prefetch of the line holding `address`, as asm on x86-64: GCC 12's
// dead-code elimination deleted __builtin_prefetch calls here (nothing else reads
// their addresses).
template <CacheLevel level>
METALM_ALWAYS_INLINE void prefetch(const void* address) {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* line = static_cast<const char*>(address);
  if constexpr (level == CacheLevel::kL1) {
    asm volatile("prefetcht0 %0" : : "m"(*line));
  } else {
    asm volatile("prefetcht1 %0" : : "m"(*line));
  }
#else
  __builtin_prefetch(address, 0, level == CacheLevel::kL1 ? 3 : 2);
#endif
}

// Every 64-byte line of [address, address + bytes), one prefetch each, in order.
template <CacheLevel level>
METALM_ALWAYS_INLINE void prefetch_bytes(const void* address, int64_t bytes) {
  const char* start = static_cast<const char*>(address);
  for (int64_t byte = 0; byte < bytes; byte += 64) prefetch<level>(start + byte);
}

// p itself, hidden from the optimiser: the row pointer stays one register and the
// heads' constant offsets become displacements. Without it GCC hoisted the 16
// (head, column) offsets out of the key loop and kept them in vector registers,
// moving one to a general register before every load (a third of the value pass).
METALM_ALWAYS_INLINE const float* opaque(const float* p) {
  asm("" : "+r"(p));
  return p;
}

}  // namespace metalm_fast::cpu::vec16
