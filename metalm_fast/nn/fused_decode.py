"""The fused decode step of a TransformerBlock: one C++ call per layer.

In a decode step (one new token per sequence) a block is a dozen small ops:
two layer norms, four projections, rotary, the cache append, paged decode
attention, the activation and two residual adds. Run module by module from
Python, the calls, checks and dispatch cost a large share of a small model's
layer on the CPU (figures: benchmarks/results). ``metalm::_decode_block_cpu``
(csrc/cpu/decode_block.cpp, bound in metalm_fast/ops/decode_block.py) makes the
same kernel calls, in the same order and on the same arguments, from C++, so its
output and the cache it writes are bit for bit the module path's.

It is PyTorch's fast-path pattern (``nn.TransformerEncoderLayer``):
:func:`fused_decode_block` runs it only where the module path would run exactly
those kernels, and returns None everywhere else, so that the modules run:

- no autograd (``torch.no_grad`` or ``torch.inference_mode``), not while
  torch.compile traces, plain tensors (no subclass) as input and parameters;
- every projection would run decode_linear's kernel (``decode_linear.uses_kernel``,
  asked in its two halves: x [B, Dm] with 0 < B, and each weight and bias) and the
  rotary, when there is one, its cpu kernel (``ops.rotary.uses_kernel``);
- fp32 on CPU: every parameter and the cache;
- the block built of the stock modules (LayerNorm or RMSNorm, SpanSelfAttention
  with DecodeLinear projections and RotaryEmbedding or none, MLP with DecodeLinear)
  and no forward hook on any of them, nor a global one (a hook sees the module
  path);
- a pre-norm block (sequential or parallel residual, any MLP kind, whole-head or
  partial rotary); a post-norm block (BERT's order) runs the modules;
- the attention's backend ``auto`` or ``cpu``, and the extension built with the op.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metalm_fast.nn.attention import SpanSelfAttention
from metalm_fast.nn.inference import forward_hooked
from metalm_fast.nn.linear import DecodeLinear
from metalm_fast.nn.mlp import MLP
from metalm_fast.nn.paged_kv_cache import CacheStep, PagedKVCache
from metalm_fast.nn.rotary import RotaryEmbedding
from metalm_fast.ops import decode_block, decode_linear
from metalm_fast.ops import rotary as rotary_op

__all__ = ["fused_decode_block"]

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
#: The norm modules the op computes, by its norm_kind name.
_NORMS = {nn.LayerNorm: "layernorm", nn.RMSNorm: "rmsnorm"}
_FP32 = torch.float32


# The checks below read submodules and parameters from the modules' ``_modules`` and
# ``_parameters`` dicts: through nn.Module.__getattr__ (a Python call per access)
# they would cost about as much as the fused op itself at small sizes.
def _stock_modules(block) -> tuple[nn.Module, ...] | None:
    """(attention_norm, qkv, out, mlp_norm, up, down, attention, mlp, rotary | None) when
    the block is built of the stock types, else None."""
    modules = block._modules
    attention, mlp = modules.get("attention"), modules.get("mlp")
    if type(attention) is not SpanSelfAttention or type(mlp) is not MLP:
        return None
    rotary = attention._modules.get("rotary")
    if rotary is not None and type(rotary) is not RotaryEmbedding:
        return None
    norm1, norm2 = modules.get("attention_norm"), modules.get("mlp_norm")
    qkv, out = attention._modules.get("qkv"), attention._modules.get("out")
    up, down = mlp._modules.get("up"), mlp._modules.get("down")
    if not (
        type(norm1) is type(norm2)
        and type(norm1) in _NORMS
        and type(qkv) is type(out) is type(up) is type(down) is DecodeLinear
    ):
        return None
    return norm1, qkv, out, norm2, up, down, attention, mlp, rotary


def _op_parameters(norm1, qkv, out, norm2, up, down, model_dim: int) -> tuple | None:
    """The parameters in the op's order, or None where the module path must run them."""
    if norm1.normalized_shape != (model_dim,) or norm2.normalized_shape != (model_dim,):
        return None
    if norm1.eps is None or norm2.eps is None:  # RMSNorm's dtype-dependent default
        return None
    n1, n2 = norm1._parameters, norm2._parameters
    linears = [linear._parameters for linear in (qkv, out, up, down)]
    weights = [linear["weight"] for linear in linears]
    params = (
        n1["weight"],
        n1.get("bias"),
        norm1.eps,
        weights[0],
        linears[0]["bias"],
        weights[1],
        linears[1]["bias"],
        n2["weight"],
        n2.get("bias"),
        norm2.eps,
        weights[2],
        linears[2]["bias"],
        weights[3],
        linears[3]["bias"],
    )
    # Plain tensors only (a subclass such as DTensor dispatches itself); the norms' fp32
    # CPU here, the projections' by decode_linear's rule (its kernel serves each one).
    for value in params:
        if isinstance(value, torch.Tensor) and type(value) not in _PLAIN_TENSORS:
            return None
    for value in (params[0], params[1], params[7], params[8]):
        if value is not None and not (value.dtype == _FP32 and value.is_cpu):
            return None
    for linear in linears:
        if not decode_linear.weight_uses_kernel(linear["weight"], linear["bias"]):
            return None
    return params


def _op_architecture(architecture) -> bool:
    """Whether the op computes this block's architecture (every pre-norm one)."""
    return not architecture.post_norm


def fused_decode_block(
    block, x: torch.Tensor, cache: PagedKVCache, layer_idx: int, step: CacheStep
) -> torch.Tensor | None:
    """``block``'s decode step ([B, Dm] -> [B, Dm], keys and values appended to
    ``layer_idx``'s pages) in one call, or None where the module path must run."""
    kernel = decode_block.cpu_op()
    if kernel is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    # x's rows, dtype and device are those of every projection's input in the step.
    if (
        type(x) is not torch.Tensor
        or x.dim() != 2
        or x.shape[0] == 0
        or not decode_linear.input_uses_kernel(x)
    ):
        return None
    modules = _stock_modules(block)
    if modules is None or forward_hooked(block, *modules):
        return None
    *layers, attention, mlp, rotary = modules
    if not _op_architecture(block.architecture):
        return None
    # q and k would be fp32 CPU rows (last dim contiguous) rotated by fp32 tables, as x
    # is: the rotary rule gives their answer from x.
    if rotary is not None and not rotary_op.uses_kernel(x, x):
        return None
    params = _op_parameters(*layers, x.shape[1])
    if params is None or attention.backend not in ("auto", "cpu"):
        return None
    if (
        cache.dtype != torch.float32
        or cache.device.type != "cpu"
        or cache.num_kv_heads != attention.num_kv_heads
        or cache.head_dim != attention.head_dim
    ):
        return None
    tables = (
        (None, None) if rotary is None else rotary.tables(step.positions, torch.float32, step.memo)
    )
    return kernel(
        x,
        *params,
        mlp.kind,
        attention.num_heads,
        attention.num_kv_heads,
        cache.key_cache(layer_idx),
        cache.value_cache(layer_idx),
        step.slot_mapping,
        step.block_table,
        step.seq_lens,
        1.0 / math.sqrt(attention.head_dim),
        *tables,
        _NORMS[type(layers[0])],
        block.architecture.parallel_residual,
        attention.head_dim if rotary is None else rotary.rotary_dim,
    )
