"""Rotary position embedding over packed positions.

Packed sequences restart their positions at every document boundary, so the
positions are not ``arange(T)``: :func:`packed_positions` turns ``cu_seqlens``
into per-token positions, and :class:`RotaryEmbedding` rotates query and key
head vectors by those positions (the rotate-half convention of GPT-NeoX / LLaMA).
"""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.ops.rotary import apply_rotary

__all__ = ["RotaryEmbedding", "packed_positions"]


def packed_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [T]: each token's position inside its own sequence.

    >>> packed_positions(torch.tensor([0, 3, 5])).tolist()
    [0, 1, 2, 0, 1]
    """
    cu = cu_seqlens.to(torch.int64)
    positions = torch.arange(int(cu[-1]), device=cu.device)
    sequence = torch.searchsorted(cu, positions, right=True) - 1
    return positions - cu[sequence]


class RotaryEmbedding(nn.Module):
    """Rotate [T, H, D] head vectors by per-token positions.

    ``x[..., :D/2]`` and ``x[..., D/2:]`` are the two coordinates of D/2
    planes; plane ``i`` turns by ``position * base**(-2i/D)``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, 1, D/2] in ``dtype`` (float32 or wider: angles need the precision)."""
        inv_freq = (
            self.inv_freq.to(dtype)
            if dtype == torch.float32
            else (
                self.base
                ** (
                    -torch.arange(0, self.head_dim, 2, dtype=dtype, device=positions.device)
                    / self.head_dim
                )
            )
        )
        angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # [T, D/2]
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, H, D], positions int [T] -> rotated x [T, H, D] (dtype of x)."""
        return self.rotate_pair(x, None, positions)[0]

    def rotate_pair(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        positions: torch.Tensor,
        memo: dict | None = None,
    ):
        """Rotate q [T, Hq, D] and k [T, Hkv, D] with one cos/sin computation.

        ``memo``: a dict tied to ``positions`` (a CacheStep's ``memo`` for its
        ``positions``), where the tables are kept for every layer that rotates by the
        same positions, head dim and base.
        """
        tables = self.tables(positions, torch.promote_types(q.dtype, torch.float32), memo)
        return apply_rotary(q, *tables), None if k is None else apply_rotary(k, *tables)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, memo: dict | None = None):
        """apply_rotary's tables for ``positions``: ``[cos, cos]`` and ``[-sin, sin]``,
        [T, 1, D] each in ``dtype``, kept in ``memo`` (see :meth:`rotate_pair`)."""
        key = ("rotary", self.head_dim, self.base, dtype, positions.device)
        tables = None if memo is None else memo.get(key)
        if tables is None:
            cos, sin = self.cos_sin(positions, dtype)
            tables = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
            if memo is not None:
                memo[key] = tables
        return tables
