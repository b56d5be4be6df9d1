"""decode_block: one decode step of a pre-norm transformer block on CPU, in one call.

The Python side of csrc/cpu/decode_block.cpp, whose header states the math: the
op makes a block's kernel calls (decode_linear, rotary, kv_cache_append,
paged_decode_attention, layer norms, activation, residual adds) from C++, in the
order the modules make them, so its result is the module path's bit for bit.
Each kernel it calls checks its own arguments.

Internal: :mod:`metalm_fast.nn.fused_decode` decides where it may serve a
TransformerBlock (asking each module's kernel rule) and passes the block's
parameters. There is no fake implementation: the fast path steps aside while
torch.compile traces, and the modules are traced instead.
"""

from __future__ import annotations

from metalm_fast.ops._backend import compiled_op

__all__ = ["cpu_op"]

_CPU_OP = "_decode_block_cpu"


def cpu_op():
    """``torch.ops.metalm._decode_block_cpu``, or None without a build that has it.

    Arguments, in order: x [B, Dm]; attention_norm weight, bias, eps; qkv weight,
    bias; out weight, bias; mlp_norm weight, bias, eps; up weight, bias; down
    weight, bias; mlp_kind (nn.MLP's kinds); num_heads; num_kv_heads; the
    layer's k_cache and v_cache (written); slot_mapping; block_table; seq_lens;
    scale; rotary cos and signed_sin tables (or both None); norm_kind ("layernorm" |
    "rmsnorm"); parallel_residual; rotary_dim (the rotated leading dims of each head).
    Returns [B, Dm].
    """
    return compiled_op(_CPU_OP)
