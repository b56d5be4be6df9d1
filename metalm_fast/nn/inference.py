"""Helpers of the inference fast paths (no autograd) that compute a module's math
without calling it: metalm_fast.nn.fused_decode, and the row chunks of
SpanSelfAttention's projection and of the MLP in a prefill.

:func:`linear_into_serves` is the one rule for "may a chunk's projection be
written in place"; it asks DecodeLinear (hence decode_linear's rule) which kernel
the module would run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.modules.module as module_hooks
from torch import nn

from metalm_fast.nn.linear import DecodeLinear

__all__ = [
    "INFERENCE_CHUNK_ROWS",
    "chunk_rows",
    "forward_hooked",
    "linear_into",
    "linear_into_serves",
]

#: Rows per chunk (at most) of the inference prefill paths: a chunk's projection and
#: activation stay in cache and its buffers are reused across chunks.
INFERENCE_CHUNK_ROWS = 1024

_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_forward_hooks_always_called",
)


def forward_hooked(*modules: nn.Module | None) -> bool:
    """True when a global forward hook, or one on any of ``modules``, is registered: a
    fast path runs only where no hook would see the difference."""
    if any(getattr(module_hooks, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def chunk_rows(tokens: int, most: int) -> int:
    """Rows per chunk when ``tokens`` rows go through in equal chunks of at most ``most``:
    no chunk is a short remainder, for which the BLAS may pick another kernel (and
    round differently)."""
    return math.ceil(tokens / math.ceil(tokens / most))


def linear_into(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """``out = F.linear(x, weight, bias)`` for a 2-D x, written into ``out``: the addmm
    (or mm without a bias) that F.linear runs, so the same values bit for bit."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def linear_into_serves(linear: nn.Module, x: torch.Tensor) -> bool:
    """True where :func:`linear_into` computes exactly what calling ``linear`` on x would:
    an ``nn.Linear``, or a DecodeLinear whose rule picks F.linear for x (not its few-row
    kernel); x in the weight's dtype; no autograd, no autocast, not while torch.compile
    traces; and no hook that the call would run."""
    if type(linear) is DecodeLinear:
        if linear.uses_kernel(x):
            return False
    elif type(linear) is not nn.Linear:
        return False
    return (
        not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
        and x.dtype == linear.weight.dtype
        and not forward_hooked(linear)
    )
