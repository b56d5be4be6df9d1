"""argmax_rows: the greedy token of every row of a logits matrix.

``argmax_rows(logits [B, V]) -> int64 [B]``, exactly ``logits.argmax(-1)``: the
first index of each row's maximum, a NaN counting as the maximum (the first NaN).

Dispatch, by the arguments alone: fp32 CPU logits with contiguous rows, outside
torch.compile tracing, run the ``cpu`` kernel (csrc/cpu/argmax_rows.cpp, a 16-lane
vector scan, several times faster than torch.argmax on a decode step's logits);
everything else is ``logits.argmax(-1)``. :func:`uses_kernel` is that rule.
"""

from __future__ import annotations

import torch

from metalm_fast.ops._backend import compiled_op

__all__ = ["argmax_rows", "uses_kernel"]

_CPU_OP = "_argmax_rows_cpu"
#: The kernel's vector loop indexes lanes with int32 (csrc/cpu/argmax_rows.cpp checks it).
_KERNEL_MAX_VOCAB = 2**31 - 1


def uses_kernel(logits: torch.Tensor) -> bool:
    """Whether :func:`argmax_rows` runs the cpu kernel for ``logits`` (else torch.argmax)."""
    if torch.compiler.is_compiling():
        return False
    if not (logits.is_cpu and logits.dtype == torch.float32):
        return False
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        return False
    if logits.shape[1] >= _KERNEL_MAX_VOCAB:  # the kernel would refuse it; argmax serves it
        return False
    return compiled_op(_CPU_OP) is not None


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the index of the largest logit of each row of ``logits`` [B, V].

    Example
    -------
    >>> import torch
    >>> argmax_rows(torch.tensor([[0.5, 2.0, 2.0], [3.0, -1.0, 0.0]])).tolist()
    [1, 0]
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V > 0, got shape {tuple(logits.shape)}")
    if uses_kernel(logits):
        return compiled_op(_CPU_OP)(logits)
    return logits.argmax(-1)
