"""DecodeLinear: an ``nn.Linear`` whose few-row calls run the decode_linear kernel."""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.ops.decode_linear import decode_linear, uses_kernel

__all__ = ["DecodeLinear"]


class DecodeLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state_dict and init) computed by :func:`decode_linear`.

    ``forward(x [..., K]) -> [..., N]``. A decode step's projections (at most
    ``DECODE_ROWS`` rows, fp32 on CPU, no gradient) run the cpu kernel, which
    streams the weight at memory speed; everything else (prefill, training,
    other dtypes and devices) is ``F.linear``, exactly as ``nn.Linear`` computes it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs decode_linear's cpu kernel (else ``F.linear``)."""
        return uses_kernel(x, self.weight, self.bias)
