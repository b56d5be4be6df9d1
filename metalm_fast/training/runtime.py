"""Where and in what precision a model runs: the device, the autocast dtype, moving batches.

One home for the rule that ``train``, ``generate``, ``eval`` and ``demo`` share:

- device ``"auto"`` is CUDA when torch sees one, else the CPU
  (:func:`metalm_fast.training.distributed.resolve_device`);
- dtype ``"fp32"`` runs in the weights' float32; ``"bf16"`` runs the forward
  under ``torch.autocast(device_type, dtype=torch.bfloat16)``, on CUDA and on
  the CPU alike (weights, optimizer state and the loss stay float32); ``"auto"``
  is bf16 on CUDA and fp32 on the CPU (where bf16 matmuls are rarely faster).

Only the forward runs under autocast; backward follows the dtypes autocast chose.

Example
-------
>>> import torch
>>> with autocast(torch.device("cpu"), "bf16"):
...     torch.ones(2, 3) @ torch.ones(3, 4)
tensor([[3., 3., 3., 3.],
        [3., 3., 3., 3.]], dtype=torch.bfloat16)
>>> autocast_dtype(torch.device("cpu"), "auto") is None
True
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

__all__ = ["DTYPES", "autocast", "autocast_dtype", "move_batch"]

#: the ``dtype`` choices: "auto" (bf16 on CUDA, fp32 on the CPU), "fp32", "bf16" (autocast)
DTYPES = ("auto", "fp32", "bf16")


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` on ``device``; None: no autocast (float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if dtype == "bf16" else None


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """A fresh context manager: ``torch.autocast`` for bf16, a no-op for fp32."""
    target = autocast_dtype(device, dtype)
    if target is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=target)


def move_batch(batch, device: torch.device):
    """``batch`` (a dataclass of tensors and other fields) with its tensors on ``device``."""
    fields = {field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)}
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in fields.values()):
        return batch
    moved = {
        name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for name, value in fields.items()
    }
    return dataclasses.replace(batch, **moved)
