"""MLP: the feed-forward module of a transformer block (an activation, or SwiGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalm_fast.nn.inference import (
    INFERENCE_CHUNK_ROWS,
    chunk_rows,
    linear_into,
    linear_into_serves,
)
from metalm_fast.nn.linear import DecodeLinear

__all__ = ["MLP"]


#: In place (inference) and out of place (autograd) forms of each ungated activation.
_ACTIVATIONS = {
    "gelu": (torch.ops.aten.gelu_, F.gelu),
    "gelu_tanh": (
        lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
        lambda x: F.gelu(x, approximate="tanh"),
    ),
    # CLIP's x * sigmoid(1.702 x), as transformers computes it.
    "quick_gelu": (
        lambda x: x.mul_(torch.sigmoid(1.702 * x)),
        lambda x: x * torch.sigmoid(1.702 * x),
    ),
    "relu": (torch.relu_, torch.relu),
    "silu": (lambda x: F.silu(x, inplace=True), F.silu),
}
KINDS = (*_ACTIVATIONS, "swiglu")


class MLP(nn.Module):
    """``down(act(up x))`` with act one of gelu, gelu_tanh (GPT-2's gelu_new),
    quick_gelu (CLIP), relu, silu; or SwiGLU, ``down(silu(gate x) * value x)`` with
    ``gate | value`` one fused projection. ``bias``: in both projections.

    ``forward(x [T, dim]) -> [T, dim]``. Without autograd (inference), rows go
    through in equal chunks of at most :attr:`INFERENCE_CHUNK_ROWS` and the
    activation runs in place: a chunk's [rows, hidden] activation stays in cache
    and its memory is reused, where a whole prefill's would be a fresh [T, hidden]
    tensor faulted in page by page. Rows are independent, so the result is the
    same as one pass, up to the rounding of the matmul kernel chosen for each row
    count.

    Example
    -------
    >>> import torch
    >>> mlp = MLP(16, 32, "swiglu")
    >>> mlp(torch.randn(5, 16)).shape
    torch.Size([5, 16])
    """

    INFERENCE_CHUNK_ROWS = INFERENCE_CHUNK_ROWS

    def __init__(self, dim: int, hidden: int, kind: str = "gelu", *, bias: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"mlp kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.kind = kind
        self.up = DecodeLinear(dim, 2 * hidden if kind == "swiglu" else hidden, bias=bias)
        self.down = DecodeLinear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down(self._hidden(x, in_place=False))
        if x.dim() != 2 or x.shape[0] <= self.INFERENCE_CHUNK_ROWS:
            return self.down(self._hidden(x, in_place=True))
        # Each chunk's down projection is written into its rows of out.
        tokens = x.shape[0]
        rows = chunk_rows(tokens, self.INFERENCE_CHUNK_ROWS)
        out = x.new_empty(tokens, self.down.out_features)
        for start in range(0, tokens, rows):
            self._down_into(
                self._hidden(x[start : start + rows], in_place=True), out[start : start + rows]
            )
        return out

    def _hidden(self, x: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """The activation of the up projection; ``in_place``: it overwrites the projection
        (no autograd only)."""
        hidden = self.up(x)
        if self.kind == "swiglu":
            gate, value = hidden.chunk(2, dim=-1)
            return F.silu(gate, inplace=in_place) * value
        in_place_form, form = _ACTIVATIONS[self.kind]
        return in_place_form(hidden) if in_place else form(hidden)

    def _down_into(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """out = self.down(hidden), written in place where that is F.linear's own addmm
        (copying each chunk's result would be one more pass over the output)."""
        down = self.down
        if linear_into_serves(down, hidden):
            linear_into(hidden, down.weight, down.bias, out)
        else:
            out.copy_(down(hidden))
