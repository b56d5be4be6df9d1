// One decode step of a pre-norm transformer block on CPU, in one call: the fused
// inference path of metalm_fast.models.TransformerBlock.
//
//   _decode_block_cpu(x, <the block's parameters>, k_cache!, v_cache!, slot_mapping,
//                     block_table, seq_lens, scale, rotary_cos, rotary_signed_sin) -> y
//
// x [B, Dm] fp32 (one new token per sequence), y [B, Dm]:
//
//   h        = norm(x)                                    attention_norm
//   q, k, v  = split(decode_linear(h, qkv))               [B, Hq, D], [B, Hkv, D] x 2
//   q, k     = rotary(q), rotary(k)                       when the tables are given; over
//                                                         the first rotary_dim dims only
//   append k, v to slot_mapping's slots of k_cache, v_cache
//   a        = decode_linear(paged_decode_attention(q, caches), out)
//   y        = (x + a) + mlp(norm(x + a))                 sequential residual       mlp_norm
//   y        = (x + a) + mlp(norm(x))                     parallel (GPT-NeoX)
//   mlp(z)   = decode_linear(act(decode_linear(z, up)), down)
//
// with norm = layer_norm or rms_norm (norm_kind), and act = gelu (erf) or gelu_tanh
// (in place), quick_gelu (z * sigmoid(1.702 z)), relu, silu, or swiglu (silu(gate) *
// value, gate | value = the up projection's halves).
//
// Why: in a decode step the block's work is a dozen small ops, and called one by
// one from Python (module calls, argument checks, dispatch) they cost a large
// share of a layer more than from here, a noticeable part of a small-preset
// decode step (figures: benchmarks/results). This op makes the same calls, in
// the same order and on the same arguments, from C++: every step is the op the
// module path runs (metalm::_decode_linear_cpu, _rotary_cpu, _kv_cache_append_cpu,
// _paged_decode_attention_cpu, aten layer_norm, gelu_, silu_, mul, add), reached
// through the dispatcher, so the result is bit for bit the module path's and each
// kernel keeps its own argument checks. It is PyTorch's "fast path" pattern (as
// nn.TransformerEncoderLayer's): metalm_fast/nn/fused_decode.py calls it (through
// metalm_fast/ops/decode_block.py) only
// where the module path would run exactly these ops (no autograd, fp32 CPU, no
// hooks, the expected module types) and runs the modules everywhere else.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

namespace metalm_fast::cpu {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The sibling kernels, looked up once (after every op of the library is registered).
template <typename Signature>
c10::TypedOperatorHandle<Signature> metalm_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const OptionalTensor& bias) {
  static const auto op =
      metalm_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&)>(
          "metalm::_decode_linear_cpu");
  return op.call(x, weight, bias);
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  static const auto op =
      metalm_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "metalm::_rotary_cpu");
  return op.call(x, cos, signed_sin);
}

void kv_cache_append(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& slot_mapping) {
  static const auto op = metalm_op<void(at::Tensor&, at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&)>(
      "metalm::_kv_cache_append_cpu");
  op.call(k_cache, v_cache, k, v, slot_mapping);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, double scale) {
  static const auto op =
      metalm_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double)>(
          "metalm::_paged_decode_attention_cpu");
  return op.call(q, k_cache, v_cache, block_table, seq_lens, scale);
}

// The MLP's hidden activation, in place on the up projection where the module does so
// (the in-place forms of metalm_fast/nn/mlp.py, op for op).
at::Tensor activate(at::Tensor hidden, std::string_view mlp_kind) {
  if (mlp_kind == "gelu") return at::gelu_(hidden);
  if (mlp_kind == "gelu_tanh") return at::gelu_(hidden, "tanh");
  if (mlp_kind == "quick_gelu") return hidden.mul_(at::sigmoid(at::mul(hidden, 1.702)));
  if (mlp_kind == "relu") return at::relu_(hidden);
  if (mlp_kind == "silu") return at::silu_(hidden);
  auto halves = hidden.chunk(2, -1);  // swiglu: gate, value
  return at::mul(at::silu_(halves[0]), halves[1]);
}

bool known_mlp_kind(std::string_view kind) {
  for (const char* known : {"gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "swiglu"}) {
    if (kind == known) return true;
  }
  return false;
}

at::Tensor norm(const at::Tensor& x, std::string_view kind, const OptionalTensor& weight,
                const OptionalTensor& bias, double eps) {
  if (kind == "rmsnorm") return at::rms_norm(x, {x.size(-1)}, weight, eps);
  return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
}

// Rotary over the first rotary_dim dims of each head; the rest pass through (a new
// tensor, as the module's torch.cat makes).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin,
                  int64_t rotary_dim) {
  if (rotary_dim == x.size(-1)) return rotary(x, cos, signed_sin);
  return at::cat({rotary(x.slice(-1, 0, rotary_dim), cos, signed_sin),
                  x.slice(-1, rotary_dim)}, -1);
}

at::Tensor decode_block_cpu(
    const at::Tensor& x, const OptionalTensor& attention_norm_weight,
    const OptionalTensor& attention_norm_bias, double attention_norm_eps,
    const at::Tensor& qkv_weight, const OptionalTensor& qkv_bias, const at::Tensor& out_weight,
    const OptionalTensor& out_bias, const OptionalTensor& mlp_norm_weight,
    const OptionalTensor& mlp_norm_bias, double mlp_norm_eps, const at::Tensor& up_weight,
    const OptionalTensor& up_bias, const at::Tensor& down_weight, const OptionalTensor& down_bias,
    c10::string_view mlp_kind, int64_t num_heads, int64_t num_kv_heads, at::Tensor& k_cache,
    at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale, const OptionalTensor& rotary_cos,
    const OptionalTensor& rotary_signed_sin, c10::string_view norm_kind,
    bool parallel_residual, int64_t rotary_dim) {
  TORCH_CHECK(x.dim() == 2, "decode_block (cpu): x must be [B, Dm], got ", x.dim(), "-D");
  TORCH_CHECK(known_mlp_kind(mlp_kind), "decode_block (cpu): unknown mlp_kind '", mlp_kind, "'");
  TORCH_CHECK(norm_kind == "layernorm" || norm_kind == "rmsnorm",
              "decode_block (cpu): norm_kind must be 'layernorm' or 'rmsnorm', got '", norm_kind,
              "'");
  TORCH_CHECK(rotary_cos.has_value() == rotary_signed_sin.has_value(),
              "decode_block (cpu): give both rotary tables or neither");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && k_cache.dim() == 4,
              "decode_block (cpu): num_heads and num_kv_heads must be > 0 and k_cache 4-D");
  const int64_t tokens = x.size(0), head_dim = k_cache.size(3);
  const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  TORCH_CHECK(qkv_weight.dim() == 2 && qkv_weight.size(0) == q_width + 2 * kv_width,
              "decode_block (cpu): qkv_weight must have (num_heads + 2 num_kv_heads) * D = ",
              q_width + 2 * kv_width, " rows, got ", qkv_weight.sizes());

  TORCH_CHECK(rotary_dim > 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0,
              "decode_block (cpu): rotary_dim must be even and in (0, head_dim], got ",
              rotary_dim);
  const at::Tensor normed =
      norm(x, norm_kind, attention_norm_weight, attention_norm_bias, attention_norm_eps);
  const at::Tensor fused = decode_linear(normed, qkv_weight, qkv_bias);
  at::Tensor q = fused.slice(1, 0, q_width).view({tokens, num_heads, head_dim});
  at::Tensor k = fused.slice(1, q_width, q_width + kv_width).view({tokens, num_kv_heads, head_dim});
  const at::Tensor v = fused.slice(1, q_width + kv_width).view({tokens, num_kv_heads, head_dim});
  if (rotary_cos.has_value()) {
    q = rotate(q, *rotary_cos, *rotary_signed_sin, rotary_dim);
    k = rotate(k, *rotary_cos, *rotary_signed_sin, rotary_dim);
  }
  kv_cache_append(k_cache, v_cache, k, v, slot_mapping);
  const at::Tensor attended =
      paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale).contiguous();
  const at::Tensor h =
      at::add(x, decode_linear(attended.view({tokens, q_width}), out_weight, out_bias));

  const at::Tensor mlp_in =
      norm(parallel_residual ? x : h, norm_kind, mlp_norm_weight, mlp_norm_bias, mlp_norm_eps);
  const at::Tensor hidden = activate(decode_linear(mlp_in, up_weight, up_bias), mlp_kind);
  return at::add(h, decode_linear(hidden, down_weight, down_bias));
}

}  // namespace
}  // namespace metalm_fast::cpu

TORCH_LIBRARY_FRAGMENT(metalm, m) {
  m.def(
      "_decode_block_cpu(Tensor x, Tensor? attention_norm_weight, Tensor? attention_norm_bias, "
      "float attention_norm_eps, Tensor qkv_weight, Tensor? qkv_bias, Tensor out_weight, "
      "Tensor? out_bias, Tensor? mlp_norm_weight, Tensor? mlp_norm_bias, float mlp_norm_eps, "
      "Tensor up_weight, Tensor? up_bias, Tensor down_weight, Tensor? down_bias, str mlp_kind, "
      "int num_heads, int num_kv_heads, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_table, Tensor seq_lens, float scale, "
      "Tensor? rotary_cos, Tensor? rotary_signed_sin, str norm_kind, bool parallel_residual, "
      "int rotary_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(metalm, CPU, m) {
  m.impl("_decode_block_cpu", &metalm_fast::cpu::decode_block_cpu);
}
