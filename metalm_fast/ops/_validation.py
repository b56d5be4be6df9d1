"""Host-side input checks shared by every op; each error names the argument.

Shapes, dtypes, devices and strides are checked on every call without a device
sync. Index *contents* are the ops' own business (``validate=True``).
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
#: Head dims every attention backend supports: multiples of 8 from 16 to 256.
SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 8))


def _check_is_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_float_tensor(
    name: str,
    tensor,
    shape_text: str,
    *,
    dtype_text: str = "float16, bfloat16, float32 or float64",
) -> None:
    """A floating tensor of the rank ``shape_text`` starts with (e.g. "3-D [T, H, D]"),
    contiguous in its last dim (other strides are free)."""
    _check_is_tensor(name, tensor)
    dims = int(shape_text.split("-D", 1)[0])
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {shape_text}, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be {dtype_text}, got {tensor.dtype}")
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dim (stride 1), got strides {tensor.stride()}"
        )


def check_index_tensor(name: str, index, shape_text: str) -> None:
    """An int32/int64 tensor of the rank ``shape_text`` starts with (e.g. "1-D [T]")."""
    _check_is_tensor(name, index)
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")
    dims = int(shape_text.split("-D", 1)[0])
    if index.dim() != dims:
        raise ValueError(f"{name} must be {shape_text}, got shape {tuple(index.shape)}")


def check_head_dim(head_dim: int, where: str) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {head_dim} ({where}) is not supported: expected a multiple of 8 "
            "from 16 to 256"
        )


def check_gqa_heads(query_heads: int, kv_heads: int, query_name: str, kv_name: str) -> None:
    if kv_heads == 0 or query_heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({query_name}={query_heads}) must be a multiple of key/value heads "
            f"({kv_name}={kv_heads})"
        )


def check_scale(scale, *, allow_none: bool = True) -> None:
    if scale is None and allow_none:
        return
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        suffix = " or None" if allow_none else ""
        raise ValueError(f"scale must be a finite float{suffix}, got {scale!r}")
