// Encoder-to-decoder embedding scatter on CPU: the `cpu` backend of
// metalm_fast.embed_scatter.
//
// Ops (schemas in TORCH_LIBRARY_FRAGMENT below; the op layer in
// metalm_fast/ops/embed_scatter.py validates shapes, dtypes and devices):
//
//   _embed_scatter_fwd_cpu(token_ids, weight, features, feature_index, scale) -> out
//       out[t] = weight[token_ids[t]] * scale   where feature_index[t] < 0
//              = features[feature_index[t]]     otherwise                    [T, Dm]
//   _embed_scatter_bwd_cpu(grad_out, token_ids, feature_index, num_embeddings,
//                          num_features, scale, padding_idx) -> (grad_weight, grad_features)
//
// One pass forward: every output row is written once, from the one row it comes
// from (a copy, or a copy times scale). The HF path writes each row three times
// (lookup, masked_scatter, scale).
//
// Backward is a deterministic segmented reduction, never float atomics: a stable
// counting sort groups the token positions by id (CSR: offsets[id] .. offsets[id+1]
// in increasing t), then each weight row is summed by one thread, in t order, in
// fp32 (fp64 for double), and written once; rows no token uses, and the padding
// row, are written as exact zeros. The features gradient uses the same grouping
// by feature row (so a feature row referenced twice gets the sum). Results are
// bit-identical on repeat and for any thread count.
//
// Indices are read as int64 and every offset is 64-bit (row * stride can pass
// 2^31 elements for T x Dm or V x Dm beyond 2 G). Ids are trusted here: the op
// layer checks them when validate=True; out-of-range ids are still never
// dereferenced (they raise), whatever the caller passes.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace metalm_fast::cpu {
namespace {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Row r of a 2-D tensor whose last dim is contiguous.
template <typename scalar_t>
inline const scalar_t* row_ptr(const at::Tensor& t, int64_t r) {
  return t.const_data_ptr<scalar_t>() + r * t.stride(0);
}

// CSR grouping of positions t (with key[t] in [0, num_keys), others skipped):
// positions with key k are order[offsets[k] .. offsets[k + 1]), increasing in t.
struct Grouping {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

template <typename KeyFn>
Grouping group_positions(int64_t num_positions, int64_t num_keys, KeyFn key_of) {
  Grouping g;
  g.offsets.assign(num_keys + 1, 0);
  for (int64_t t = 0; t < num_positions; ++t) {
    const int64_t k = key_of(t);
    if (k >= 0) g.offsets[k + 1] += 1;
  }
  for (int64_t k = 0; k < num_keys; ++k) g.offsets[k + 1] += g.offsets[k];
  g.order.resize(g.offsets[num_keys]);
  std::vector<int64_t> cursor(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t t = 0; t < num_positions; ++t) {
    const int64_t k = key_of(t);
    if (k >= 0) g.order[cursor[k]++] = t;
  }
  return g;
}

// dst[r] = factor * sum over positions in group r of grad_out[t], summed in
// acc_t in increasing t; empty groups give exact zeros.
template <typename scalar_t>
void reduce_groups(const Grouping& g, const at::Tensor& grad_out, double factor,
                   at::Tensor& dst) {
  const int64_t width = grad_out.size(1);
  const int64_t rows = dst.size(0);
  scalar_t* out = dst.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<scalar_t>> sum(width);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* dst_row = out + r * width;
      const int64_t first = g.offsets[r], last = g.offsets[r + 1];
      if (first == last) {
        std::memset(static_cast<void*>(dst_row), 0, sizeof(scalar_t) * width);
        continue;
      }
      std::fill(sum.begin(), sum.end(), acc_t<scalar_t>(0));
      for (int64_t i = first; i < last; ++i) {
        const scalar_t* src = row_ptr<scalar_t>(grad_out, g.order[i]);
        for (int64_t d = 0; d < width; ++d) sum[d] += static_cast<acc_t<scalar_t>>(src[d]);
      }
      const auto f = static_cast<acc_t<scalar_t>>(factor);
      for (int64_t d = 0; d < width; ++d) dst_row[d] = static_cast<scalar_t>(sum[d] * f);
    }
  });
}

std::vector<int64_t> as_int64(const at::Tensor& index) {
  const at::Tensor i64 = index.to(at::kLong).contiguous();
  return std::vector<int64_t>(i64.const_data_ptr<int64_t>(),
                              i64.const_data_ptr<int64_t>() + i64.numel());
}

at::Tensor embed_scatter_fwd_cpu(const at::Tensor& token_ids, const at::Tensor& weight,
                                 const at::Tensor& features, const at::Tensor& feature_index,
                                 double scale) {
  TORCH_CHECK(weight.dim() == 2 && features.dim() == 2, "embed_scatter (cpu): 2-D tables expected");
  TORCH_CHECK(weight.stride(1) == 1 && features.stride(1) == 1,
              "embed_scatter (cpu): weight and features must be contiguous in their last dim");
  const int64_t tokens = token_ids.numel();
  const int64_t width = weight.size(1);
  const int64_t vocab = weight.size(0);
  const int64_t num_features = features.size(0);
  const std::vector<int64_t> ids = as_int64(token_ids);
  const std::vector<int64_t> rows = as_int64(feature_index);
  at::Tensor out = at::empty({tokens, width}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "embed_scatter_fwd_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    const bool unit_scale = scale == 1.0;
    const auto factor = static_cast<acc_t<scalar_t>>(scale);
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* dst_row = dst + t * width;
        if (rows[t] >= 0) {
          TORCH_CHECK(rows[t] < num_features, "embed_scatter: feature_index[", t, "]=", rows[t],
                      " is out of range for ", num_features, " feature rows");
          std::memcpy(dst_row, row_ptr<scalar_t>(features, rows[t]), sizeof(scalar_t) * width);
          continue;
        }
        TORCH_CHECK(ids[t] >= 0 && ids[t] < vocab, "embed_scatter: token_ids[", t, "]=", ids[t],
                    " is out of range for ", vocab, " embeddings");
        const scalar_t* src = row_ptr<scalar_t>(weight, ids[t]);
        if (unit_scale) {
          std::memcpy(dst_row, src, sizeof(scalar_t) * width);
        } else {
          for (int64_t d = 0; d < width; ++d)
            dst_row[d] = static_cast<scalar_t>(static_cast<acc_t<scalar_t>>(src[d]) * factor);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> embed_scatter_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& token_ids, const at::Tensor& feature_index,
    int64_t num_embeddings, int64_t num_features, double scale, int64_t padding_idx) {
  const at::Tensor grad_out = grad_out_in.stride(1) == 1 ? grad_out_in : grad_out_in.contiguous();
  const int64_t tokens = grad_out.size(0);
  const int64_t width = grad_out.size(1);
  const std::vector<int64_t> ids = as_int64(token_ids);
  const std::vector<int64_t> rows = as_int64(feature_index);
  const Grouping by_id = group_positions(tokens, num_embeddings, [&](int64_t t) -> int64_t {
    if (rows[t] >= 0) return -1;  // a feature position: its id is never read
    TORCH_CHECK(ids[t] >= 0 && ids[t] < num_embeddings, "embed_scatter: token_ids[", t, "]=",
                ids[t], " is out of range for ", num_embeddings, " embeddings");
    return ids[t] == padding_idx ? -1 : ids[t];
  });
  const Grouping by_row = group_positions(tokens, num_features, [&](int64_t t) -> int64_t {
    TORCH_CHECK(rows[t] < num_features, "embed_scatter: feature_index[", t, "]=", rows[t],
                " is out of range for ", num_features, " feature rows");
    return rows[t] >= 0 ? rows[t] : -1;
  });
  at::Tensor grad_weight = at::empty({num_embeddings, width}, grad_out.options());
  at::Tensor grad_features = at::empty({num_features, width}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "embed_scatter_bwd_cpu", [&] {
    reduce_groups<scalar_t>(by_id, grad_out, scale, grad_weight);
    reduce_groups<scalar_t>(by_row, grad_out, 1.0, grad_features);
  });
  return {grad_weight, grad_features};
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def(
      "_embed_scatter_fwd_cpu(Tensor token_ids, Tensor weight, Tensor features, "
      "Tensor feature_index, float scale) -> Tensor");
  m.def(
      "_embed_scatter_bwd_cpu(Tensor grad_out, Tensor token_ids, Tensor feature_index, "
      "int num_embeddings, int num_features, float scale, int padding_idx) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_embed_scatter_fwd_cpu", &metalm_fast::cpu::embed_scatter_fwd_cpu);
  m.impl("_embed_scatter_bwd_cpu", &metalm_fast::cpu::embed_scatter_bwd_cpu);
}
