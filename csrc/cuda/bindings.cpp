// torch bindings of the CUDA-runtime kernels in csrc/cuda: the Python module
// metalm_fast._cuda. Built only when torch has CUDA (setup.py). Each op here
// checks what the raw launcher cannot (devices, dtypes, strides), computes the
// index preprocessing with torch ops (the stable sort of the deterministic
// backward), then calls the extern "C" launcher on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <Python.h>

extern "C" cudaError_t metalm_embed_scatter_fwd(
    int dtype, void* out, const void* weight, const void* features, const int64_t* ids,
    const int64_t* rows, int64_t tokens, int64_t width, int64_t num_embeddings,
    int64_t num_features, int64_t stride_out, int64_t stride_weight, int64_t stride_features,
    float scale, cudaStream_t stream);

extern "C" cudaError_t metalm_embed_scatter_segment_sum(
    int dtype, void* dst, const void* grad, const int32_t* order, const int32_t* offsets,
    int64_t num_rows, int64_t width, int64_t stride_dst, int64_t stride_grad, float factor,
    int64_t skip_row, cudaStream_t stream);

namespace metalm_fast::cuda {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "embed_scatter (cuda): float32, float16 or bfloat16 expected, got ",
                         t.scalar_type());
  }
}

void check(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": ", cudaGetErrorString(status));
}

at::Tensor embed_scatter_fwd_cuda(const at::Tensor& token_ids, const at::Tensor& weight,
                                  const at::Tensor& features, const at::Tensor& feature_index,
                                  double scale) {
  const c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK(weight.stride(1) == 1 && features.stride(1) == 1,
              "embed_scatter (cuda): weight and features must be contiguous in their last dim");
  const at::Tensor ids = token_ids.to(at::kLong).contiguous();
  const at::Tensor rows = feature_index.to(at::kLong).contiguous();
  at::Tensor out = at::empty({ids.numel(), weight.size(1)}, weight.options());
  const at::Tensor& feature_table = features.size(0) ? features : weight;  // never read if F == 0
  check(metalm_embed_scatter_fwd(
            dtype_code(weight), out.data_ptr(), weight.const_data_ptr(),
            feature_table.const_data_ptr(), ids.const_data_ptr<int64_t>(),
            rows.const_data_ptr<int64_t>(), ids.numel(), weight.size(1), weight.size(0),
            features.size(0), out.stride(0), weight.stride(0), feature_table.stride(0),
            static_cast<float>(scale), c10::cuda::getCurrentCUDAStream()),
        "embed_scatter forward");
  return out;
}

// Sum grad rows grouped by key into a [num_rows, Dm] tensor; key num_rows = "none".
at::Tensor segment_sum(const at::Tensor& grad, const at::Tensor& keys, int64_t num_rows,
                       double factor, int64_t skip_row) {
  at::Tensor dst = at::empty({num_rows, grad.size(1)}, grad.options());
  if (num_rows == 0 || grad.size(1) == 0) return dst;
  const at::Tensor order = std::get<1>(keys.sort(/*stable=*/true, 0, false)).to(at::kInt);
  at::Tensor offsets = at::zeros({num_rows + 2}, keys.options().dtype(at::kInt));
  offsets.slice(0, 1).copy_(at::bincount(keys, {}, num_rows + 1).slice(0, 0, num_rows + 1).cumsum(0));
  check(metalm_embed_scatter_segment_sum(
            dtype_code(grad), dst.data_ptr(), grad.const_data_ptr(),
            order.const_data_ptr<int32_t>(), offsets.const_data_ptr<int32_t>(), num_rows,
            grad.size(1), dst.stride(0), grad.stride(0), static_cast<float>(factor), skip_row,
            c10::cuda::getCurrentCUDAStream()),
        "embed_scatter backward");
  return dst;
}

std::tuple<at::Tensor, at::Tensor> embed_scatter_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& token_ids, const at::Tensor& feature_index,
    int64_t num_embeddings, int64_t num_features, double scale, int64_t padding_idx) {
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.stride(1) == 1 ? grad_out_in : grad_out_in.contiguous();
  const at::Tensor ids = token_ids.to(at::kLong);
  const at::Tensor rows = feature_index.to(at::kLong);
  const at::Tensor is_feature = rows.ge(0);
  // Positions of the other kind, and out-of-range indices, get the "none" key.
  const at::Tensor id_keys = at::where(
      is_feature.logical_or(ids.lt(0)).logical_or(ids.ge(num_embeddings)),
      at::full_like(ids, num_embeddings), ids);
  const at::Tensor row_keys = at::where(is_feature.logical_and(rows.lt(num_features)), rows,
                                        at::full_like(rows, num_features));
  return {segment_sum(grad_out, id_keys, num_embeddings, scale, padding_idx),
          segment_sum(grad_out, row_keys, num_features, 1.0, -1)};
}

}  // namespace
}  // namespace metalm_fast::cuda

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def(
      "_embed_scatter_fwd_cuda(Tensor token_ids, Tensor weight, Tensor features, "
      "Tensor feature_index, float scale) -> Tensor");
  m.def(
      "_embed_scatter_bwd_cuda(Tensor grad_out, Tensor token_ids, Tensor feature_index, "
      "int num_embeddings, int num_features, float scale, int padding_idx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metalm, CUDA, m) {
  m.impl("_embed_scatter_fwd_cuda", &metalm_fast::cuda::embed_scatter_fwd_cuda);
  m.impl("_embed_scatter_bwd_cuda", &metalm_fast::cuda::embed_scatter_bwd_cuda);
}

PyMODINIT_FUNC PyInit__cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda",
                               "metalm-fast CUDA kernels (registered in torch.ops.metalm)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

// ----------------------------------------------------------------------------- kv_cache_append
#include <initializer_list>

#include "kv_cache_append.h"

namespace metalm_fast::cuda {
namespace {

// Copies k_new / v_new ([T, Hkv, D]) into their slots of the paged caches
// ([num_blocks, block_size, Hkv, D]); the op layer validated shapes and dtypes.
void kv_cache_append_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, const at::Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&k_cache, &v_cache, &k_new, &v_new})
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) == 1,
                "kv_cache_append (cuda): every tensor must be contiguous in its last dim");
  TORCH_CHECK(k_cache.scalar_type() == k_new.scalar_type() &&
                  v_cache.scalar_type() == v_new.scalar_type(),
              "kv_cache_append (cuda): cache and new rows must share a dtype");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t element = k_cache.element_size();
  MetalmKvAppendArgs args{};
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.k_new = k_new.const_data_ptr();
  args.v_new = v_new.const_data_ptr();
  args.slots = slots.const_data_ptr<int64_t>();
  args.num_tokens = k_new.size(0);
  args.kv_heads = k_new.size(1);
  args.row_bytes = k_new.size(2) * element;
  args.num_slots = k_cache.size(0) * k_cache.size(1);
  args.block_size = k_cache.size(1);
  args.k_block_stride = k_cache.stride(0) * element;
  args.k_slot_stride = k_cache.stride(1) * element;
  args.k_head_stride = k_cache.stride(2) * element;
  args.v_block_stride = v_cache.stride(0) * element;
  args.v_slot_stride = v_cache.stride(1) * element;
  args.v_head_stride = v_cache.stride(2) * element;
  args.k_new_token_stride = k_new.stride(0) * element;
  args.k_new_head_stride = k_new.stride(1) * element;
  args.v_new_token_stride = v_new.stride(0) * element;
  args.v_new_head_stride = v_new.stride(1) * element;
  check(metalm_kv_cache_append(&args, c10::cuda::getCurrentCUDAStream()), "kv_cache_append");
}

}  // namespace
}  // namespace metalm_fast::cuda

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def(
      "_kv_cache_append_cuda(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, "
      "Tensor v_new, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(metalm, CUDA, m) {
  m.impl("_kv_cache_append_cuda", &metalm_fast::cuda::kv_cache_append_cuda);
}
