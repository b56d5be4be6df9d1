"""apply_rotary: the rotate-half rotation of packed head vectors by precomputed tables.

``apply_rotary(x [T, H, D], cos [T, 1, D], signed_sin [T, 1, D]) -> [T, H, D]`` with
``cos = [cos, cos]`` and ``signed_sin = [-sin, sin]`` over the two halves of the
head dim (metalm_fast.nn.RotaryEmbedding builds them once per step):

    out = x * cos + [second, first] * signed_sin,   x = [first, second]

which is the rotate-half formula (first cos - second sin, second cos + first sin;
a - b is a + (-b) exactly) bit for bit, in four tensor ops instead of eight.

Dispatch, by the arguments alone: in eager inference on CPU with x in the tables'
dtype (fp32 or fp64) and a contiguous last dim, the ``cpu`` kernel
(csrc/cpu/rotary.cpp) computes the same products and sums in one pass, bit for
bit (the tensor expression makes four passes over q and k, a noticeable share
of a small model's prefill). Autograd, torch.compile (inductor fuses the expression
itself), other devices and dtypes, and a missing build run the tensor expression;
:func:`uses_kernel` is that rule, written once.
``apply_rotary_`` is the same rotation written over x (inference: q and k inside
their fused projection).
"""

from __future__ import annotations

import torch

from metalm_fast.ops._backend import compiled_op

__all__ = ["apply_rotary", "apply_rotary_", "uses_kernel"]

_CPU_OP = "_rotary_cpu"
_CPU_OP_IN_PLACE = "_rotary_cpu_"


def _check_inputs(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [T, H, D] with D even, got shape {tuple(x.shape)}")
    expected = (x.shape[0], 1, x.shape[2])
    for name, table in (("cos", cos), ("signed_sin", signed_sin)):
        if tuple(table.shape) != expected:
            raise ValueError(
                f"{name} must be [T, 1, D] = {list(expected)}, got {list(table.shape)}"
            )
    if cos.dtype != signed_sin.dtype or cos.device != signed_sin.device:
        raise ValueError(
            f"cos and signed_sin must share a dtype and device, got {cos.dtype} "
            f"on {cos.device} and {signed_sin.dtype} on {signed_sin.device}"
        )


def uses_kernel(x: torch.Tensor, cos: torch.Tensor, *, in_place: bool = False) -> bool:
    """Whether :func:`apply_rotary` (``in_place``: :func:`apply_rotary_`) runs the cpu
    kernel for x and the tables' dtype (``cos``): the dispatch rule of the module
    docstring."""
    if torch.compiler.is_compiling():
        return False
    if not (x.is_cpu and x.dtype == cos.dtype and x.stride(-1) == 1):
        return False
    if torch.is_grad_enabled() and x.requires_grad:  # the kernel has no backward
        return False
    return compiled_op(_CPU_OP_IN_PLACE if in_place else _CPU_OP) is not None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by the tables cos, signed_sin [T, 1, D] (see the module).

    Returns a new [T, H, D] tensor in x's dtype; the tables may be wider (the
    rotation is computed in their dtype). x may be a strided view (q or k sliced
    from a fused qkv projection).

    Example
    -------
    >>> import torch
    >>> x = torch.tensor([[[1.0, 0.0]]])          # T = 1, H = 1, D = 2
    >>> cos, signed_sin = torch.zeros(1, 1, 2), torch.tensor([[[-1.0, 1.0]]])
    >>> apply_rotary(x, cos, signed_sin).tolist()  # a quarter turn
    [[[0.0, 1.0]]]
    """
    _check_inputs(x, cos, signed_sin)
    if uses_kernel(x, cos):
        return compiled_op(_CPU_OP)(x, cos.contiguous(), signed_sin.contiguous())
    return _expression(x, cos, signed_sin)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` written over ``x`` (returned), the same values bit for bit.

    For inference, where q and k are views into a fused projection that nothing
    else reads: the kernel then writes no [T, H, D] output of its own. x's
    elements must not share memory (an expanded tensor cannot be rotated in place).
    """
    _check_inputs(x, cos, signed_sin)
    if uses_kernel(x, cos, in_place=True):
        compiled_op(_CPU_OP_IN_PLACE)(x, cos.contiguous(), signed_sin.contiguous())
        return x
    return x.copy_(_expression(x, cos, signed_sin))


def _expression(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    same = x.dtype == cos.dtype
    y = x if same else x.to(cos.dtype)
    rotated = y * cos + y.roll(y.shape[-1] // 2, dims=-1) * signed_sin
    return rotated if same else rotated.to(x.dtype)
