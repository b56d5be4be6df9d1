// Paged KV-cache append on CPU: the `cpu` backend of metalm_fast.kv_cache_append.
//
//   _kv_cache_append_cpu(k_cache!, v_cache!, k_new, v_new, slot_mapping) -> ()
//
// Caches are [num_blocks, block_size, Hkv, D]; token t of k_new / v_new
// ([T, Hkv, D]) goes to slot s = slot_mapping[t], i.e. cache[s / block_size,
// s % block_size]. Slots < 0 are skipped, and so are slots past the pool
// (num_blocks * block_size): the op layer raises for those with validate=True,
// and whatever the caller passes, nothing outside the caches is ever written.
//
// It is a pure copy, so it is dtype-agnostic: rows move as bytes (memcpy), which
// makes it bit-exact for every dtype, float64 included. When a token's Hkv head
// rows are adjacent in both the source and the destination (the common case:
// [.., Hkv, D] contiguous in its last two dims, including k and v sliced from a
// fused qkv projection) one memcpy moves the whole token; otherwise one per head.
// Only the last dim must be contiguous. Tokens are split across threads only
// when there is enough data to pay for it (a decode step moves a few KiB).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace metalm_fast::cpu {
namespace {

constexpr int64_t kBytesPerTask = 64 * 1024;  // below this, threads cost more than they save

// Byte layout of one [.., Hkv, D] operand: where token/slot rows and head rows start.
struct RowLayout {
  char* base;
  int64_t head_stride;  // bytes
  bool heads_adjacent;  // head h starts at h * D elements: one memcpy per token
};

RowLayout layout_of(const at::Tensor& t, int64_t head_dim) {
  const int64_t element = t.element_size();
  const int64_t head_stride = t.stride(-2) * element;
  return {static_cast<char*>(t.data_ptr()), head_stride,
          t.size(-2) == 1 || head_stride == head_dim * element};
}

void copy_heads(char* dst, const RowLayout& dst_layout, const char* src,
                const RowLayout& src_layout, int64_t kv_heads, int64_t row_bytes) {
  if (dst_layout.heads_adjacent && src_layout.heads_adjacent) {
    std::memcpy(dst, src, row_bytes * kv_heads);
    return;
  }
  for (int64_t h = 0; h < kv_heads; ++h)
    std::memcpy(dst + h * dst_layout.head_stride, src + h * src_layout.head_stride, row_bytes);
}

void kv_cache_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new,
                         const at::Tensor& v_new, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "kv_cache_append (cpu): caches must be [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_new.dim() == 3 && v_new.dim() == 3,
              "kv_cache_append (cpu): k_new and v_new must be [T, Hkv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_new.sizes() == v_new.sizes(),
              "kv_cache_append (cpu): k and v shapes differ");
  TORCH_CHECK(k_cache.scalar_type() == k_new.scalar_type() &&
                  v_cache.scalar_type() == v_new.scalar_type(),
              "kv_cache_append (cpu): cache and new rows must share a dtype (a bit-exact copy)");
  TORCH_CHECK(k_cache.size(2) == k_new.size(1) && k_cache.size(3) == k_new.size(2),
              "kv_cache_append (cpu): [Hkv, D] of the cache and of the new rows differ");
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&k_cache, &v_cache, &k_new, &v_new})
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) == 1,
                "kv_cache_append (cpu): every tensor must be contiguous in its last dim");
  const int64_t tokens = k_new.size(0);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens,
              "kv_cache_append (cpu): slot_mapping must be [T]");
  const int64_t kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  const int64_t block_size = k_cache.size(1);
  const int64_t num_slots = k_cache.size(0) * block_size;
  const int64_t row_bytes = head_dim * k_cache.element_size();
  if (tokens == 0 || row_bytes == 0 || kv_heads == 0) return;

  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const RowLayout kc = layout_of(k_cache, head_dim), vc = layout_of(v_cache, head_dim);
  const RowLayout kn = layout_of(k_new, head_dim), vn = layout_of(v_new, head_dim);
  const int64_t element = k_cache.element_size();
  const int64_t grain = std::max<int64_t>(1, kBytesPerTask / (2 * kv_heads * row_bytes));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t];
      if (s < 0 || s >= num_slots) continue;  // skipped, or outside the pool: never written
      const int64_t block = s / block_size, offset = s % block_size;
      char* k_dst = kc.base + (block * k_cache.stride(0) + offset * k_cache.stride(1)) * element;
      char* v_dst = vc.base + (block * v_cache.stride(0) + offset * v_cache.stride(1)) * element;
      copy_heads(k_dst, kc, kn.base + t * k_new.stride(0) * element, kn, kv_heads, row_bytes);
      copy_heads(v_dst, vc, vn.base + t * v_new.stride(0) * element, vn, kv_heads, row_bytes);
    }
  });
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def(
      "_kv_cache_append_cpu(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, "
      "Tensor v_new, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_kv_cache_append_cpu", &metalm_fast::cpu::kv_cache_append_cpu);
}
