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


def _cpu_scalar(value: float) -> torch.Tensor:
    """A float64 CPU scalar (a meta device context would make ``base ** t`` meta)."""
    return torch.tensor(float(value), dtype=torch.float64, device="cpu")


class RotaryEmbedding(nn.Module):
    """Rotate [T, H, D] head vectors by per-token positions.

    The first ``rotary_dim`` dims of each head (all by default; GPT-NeoX rotates a
    fraction) are the two coordinates of ``rotary_dim / 2`` planes,
    ``x[..., :R/2]`` and ``x[..., R/2:R]``; plane ``i`` turns by
    ``position * inv_freq[i]``, ``inv_freq[i] = base**(-2i/R)`` unless
    ``inv_freq`` (float64, from a rope scaling) is given. The other dims pass through.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        *,
        rotary_dim: int | None = None,
        inv_freq: torch.Tensor | None = None,
    ):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(
                f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}"
            )
        if inv_freq is None:  # on the CPU even under a meta device context: the key reads it
            planes = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu")
            inv_freq = _cpu_scalar(base).pow(-planes / rotary_dim)
        if tuple(inv_freq.shape) != (rotary_dim // 2,):
            raise ValueError(f"inv_freq must be [{rotary_dim // 2}], got {tuple(inv_freq.shape)}")
        self.head_dim, self.rotary_dim, self.base = head_dim, rotary_dim, base
        inv_freq = inv_freq.to(device="cpu", dtype=torch.float64)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer("inv_freq64", inv_freq, persistent=False)
        # Layers sharing one step's tables must rotate alike: the key names the frequencies.
        self._memo_key = ("rotary", rotary_dim, tuple(inv_freq.tolist()))

    @property
    def partial(self) -> bool:
        """Whether some dims of each head are not rotated."""
        return self.rotary_dim < self.head_dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, 1, R/2] in ``dtype`` (float32 or wider: angles need the precision)."""
        source = self.inv_freq if dtype == torch.float32 else self.inv_freq64
        inv_freq = source.to(device=positions.device, dtype=dtype)
        angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # [T, R/2]
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
        return self._rotate(q, tables), None if k is None else self._rotate(k, tables)

    def _rotate(self, x: torch.Tensor, tables) -> torch.Tensor:
        if not self.partial:
            return apply_rotary(x, *tables)
        rotated = apply_rotary(x[..., : self.rotary_dim], *tables)
        return torch.cat((rotated, x[..., self.rotary_dim :]), dim=-1)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, memo: dict | None = None):
        """apply_rotary's tables for ``positions``: ``[cos, cos]`` and ``[-sin, sin]``,
        [T, 1, R] each in ``dtype``, kept in ``memo`` (see :meth:`rotate_pair`)."""
        key = (*self._memo_key, dtype, positions.device)
        tables = None if memo is None else memo.get(key)
        if tables is None:
            cos, sin = self.cos_sin(positions, dtype)
            tables = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
            if memo is not None:
                memo[key] = tables
        return tables
