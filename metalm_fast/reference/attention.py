"""Reference span attention: dense masked attention in plain PyTorch, any dtype."""

from __future__ import annotations

import math

import torch

from metalm_fast.masks import SpanMask

__all__ = ["span_attention", "span_attention_backward"]


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SpanMask,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention over packed tokens, computed in ``q.dtype``.

    Parameters
    ----------
    q : [Tq, Hq, D];  k, v : [Tk, Hkv, D] with Hq a multiple of Hkv (query head
        ``h`` uses key/value head ``h // (Hq // Hkv)``).
    mask : SpanMask over (Tq, Tk).
    scale : softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    out : [Tq, Hq, D] in ``q.dtype``
    lse : [Hq, Tq], natural-log log-sum-exp of the scaled scores over attended
        keys, in ``q.dtype``; ``-inf`` for a query with no keys.
    """
    num_queries, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    keys = k.repeat_interleave(group, dim=1)  # [Tk, Hq, D]
    values = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale  # [Hq, Tq, Tk]
    allowed = mask.to_dense().to(q.device)[None]  # [1, Tq, Tk]
    empty_row = ~allowed.any(dim=-1, keepdim=True)  # [1, Tq, 1]
    # Empty rows take zeros before the log-sum-exp so its backward never sees
    # exp(-inf - -inf); their lse is replaced by -inf afterwards.
    neg_inf = torch.full_like(scores, -math.inf)
    safe_scores = torch.where(allowed, scores, neg_inf)
    safe_scores = torch.where(empty_row, torch.zeros_like(scores), safe_scores)
    lse = torch.logsumexp(safe_scores, dim=-1, keepdim=True)  # [Hq, Tq, 1]
    # exp of the -inf-filled scores: masked entries are exactly 0 and their
    # backward is 0 * 0, never 0 * inf (a masked score far above lse would
    # overflow exp in fp16).
    probs = torch.where(allowed, torch.exp(safe_scores - lse), torch.zeros_like(scores))
    out = torch.einsum("hqk,khd->qhd", probs, values)
    lse = torch.where(empty_row, torch.full_like(lse, -math.inf), lse)
    return out, lse.squeeze(-1)


def span_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SpanMask,
    *,
    grad_lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The explicit backward of :func:`span_attention`, dense, in ``q.dtype``.

    With ``P`` the attention probabilities, ``O`` the output and ``dO``,
    ``dLSE`` the incoming gradients::

        delta = rowsum(dO * O) - dLSE
        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
        dQ = scale * dS K,   dK = scale * dS^T Q

    summed over the query heads that share a key/value head. Kernels implement
    exactly this; autograd through :func:`span_attention` gives the same result.
    """
    num_queries, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out, lse = span_attention(q, k, v, mask, scale=scale)
    keys = k.repeat_interleave(group, dim=1)
    values = v.repeat_interleave(group, dim=1)
    allowed = mask.to_dense().to(q.device)[None]
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None]
    probs = torch.where(allowed, torch.exp(scores - finite_lse), torch.zeros_like(scores))
    delta = (grad_out * out).sum(-1).transpose(0, 1)  # [Hq, Tq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(delta.dtype)
    grad_values = torch.einsum("hqk,qhd->khd", probs, grad_out)
    grad_probs = torch.einsum("qhd,khd->hqk", grad_out, values)
    grad_scores = probs * (grad_probs - delta[..., None])
    grad_q = torch.einsum("hqk,khd->qhd", grad_scores, keys) * scale
    grad_keys = torch.einsum("hqk,qhd->khd", grad_scores, q) * scale
    tokens, kv_heads = k.shape[0], k.shape[1]
    grad_k = grad_keys.reshape(tokens, kv_heads, group, head_dim).sum(2)
    grad_v = grad_values.reshape(tokens, kv_heads, group, head_dim).sum(2)
    return grad_q, grad_k, grad_v
