"""Reference fused_linear_cross_entropy: eager F.linear + F.cross_entropy + the extra terms.

The oracle of ``metalm_fast.ops.fused_linear_cross_entropy``, in any dtype: the
whole ``[rows, V]`` logits matrix exists here, which is exactly what the op
avoids. Ignored rows are dropped before the matmul, so (as in the op) an
ignored row never reaches the loss or any gradient, even when its hidden
state is NaN; a plain eager ``F.cross_entropy`` would still propagate a NaN
from an ignored row into the gradients through log_softmax's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_grads"]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_per_token: bool = False,
):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, eagerly.

    Per scored row ``t`` (``labels[t] != ignore_index``), with
    ``x = softcap * tanh(logits / softcap)`` (or the logits themselves)::

        loss[t] = F.cross_entropy(x, label, label_smoothing=...) + z_loss * logsumexp(x)**2

    "mean" divides the sum by the number of scored rows, "sum" does not; with no
    scored row the loss is 0 (and its gradients zeros), never NaN. Labels are
    assumed in ``[0, V)`` (the op checks them). Differentiable by autograd.

    Parameters
    ----------
    hidden : [T, D]; weight : [V, D]; labels : int [T]; bias : [V] or None.

    Returns
    -------
    loss : 0-d, in the inputs' dtype; with ``return_per_token`` also
        ``per_token [T]`` in that dtype, 0 at ignored rows.

    Example
    -------
    >>> import torch
    >>> from metalm_fast import reference
    >>> hidden, weight = torch.zeros(3, 4), torch.zeros(10, 4)
    >>> labels = torch.tensor([1, -100, 7])
    >>> loss = reference.fused_linear_cross_entropy(hidden, weight, labels)
    >>> round(float(loss), 4)  # uniform logits: log(10)
    2.3026
    """
    rows, logits, targets = _scored_logits(hidden, weight, labels, bias, ignore_index, softcap)
    row_loss = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        row_loss = row_loss + z_loss * torch.logsumexp(logits, dim=-1) ** 2
    total = row_loss.sum()
    loss = total if reduction == "sum" else total / max(rows.numel(), 1)
    if not return_per_token:
        return loss
    per_token = row_loss.new_zeros(labels.shape[0]).index_copy(0, rows, row_loss.detach())
    return loss, per_token


def _scored_logits(hidden, weight, labels, bias, ignore_index, softcap):
    """(scored row numbers, their [n, V] logits after the cap, their int64 labels)."""
    rows = torch.nonzero(labels != ignore_index).flatten()
    logits = F.linear(hidden.index_select(0, rows), weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return rows, logits, labels.index_select(0, rows).long()


def fused_linear_cross_entropy_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    """The gradients of :func:`fused_linear_cross_entropy` by the explicit formula, eagerly.

    With ``p = softmax(x)``, ``lse = logsumexp(x)`` and ``eps`` the smoothing,
    ``dloss/dlogits = scale * (p (1 + 2 z_loss lse) - eps / V - (1 - eps) onehot)``
    times ``1 - tanh^2`` under a softcap (``scale`` = 1, or 1 / scored rows for
    "mean"); then ``grad_hidden = g @ weight`` (0 at ignored rows),
    ``grad_weight = g.T @ hidden``, ``grad_bias = g.sum(0)``. The op's reference
    backend (its forward returns the gradients, and autograd cannot run inside a
    custom op); the tests hold it to autograd through :func:`fused_linear_cross_entropy`.

    Returns
    -------
    (grad_hidden [T, D], grad_weight [V, D], grad_bias [V] or None), in the inputs' dtype.

    Example
    -------
    >>> import torch
    >>> from metalm_fast import reference
    >>> hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    >>> labels = torch.tensor([1, -100, 7])
    >>> grad_hidden, grad_weight, _ = reference.fused_linear_cross_entropy_grads(
    ...     hidden, weight, labels)
    >>> grad_hidden[1].abs().max().item()  # an ignored row gets no gradient
    0.0
    """
    rows, logits, targets = _scored_logits(hidden, weight, labels, bias, ignore_index, softcap)
    vocab = weight.shape[0]
    scale = 1.0 if reduction == "sum" else 1.0 / max(rows.numel(), 1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    grad = torch.softmax(logits, dim=-1) * (1 + 2 * z_loss * lse) - label_smoothing / vocab
    onehot = F.one_hot(targets, vocab).to(grad.dtype)
    grad = grad - (1 - label_smoothing) * onehot
    if softcap is not None:
        grad = grad * (1 - (logits / softcap) ** 2)
    grad = grad * scale
    scored_hidden = hidden.index_select(0, rows)
    grad_hidden = torch.zeros_like(hidden).index_copy(0, rows, grad @ weight)
    grad_weight = grad.T @ scored_hidden
    grad_bias = None if bias is None else grad.sum(0)
    return grad_hidden, grad_weight, grad_bias
