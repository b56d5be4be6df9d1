"""Reference span attention: dense masked attention in plain PyTorch, any dtype."""

from __future__ import annotations

import math

import torch

from metalm_fast.masks import SpanMask

__all__ = ["span_attention", "span_attention_backward"]


def _masked_scores(q, keys, allowed, scale):
    """scale * q . k as [Hq, Tq, Tk], where a non-finite q or k entry reaches allowed pairs only.

    With finite q and k this is one einsum. Otherwise masked pairs multiply
    zeros in place of both rows (also in the backward: a masked-out NaN key
    must not reach dq through 0 * NaN), at the cost of a [Hq, Tq, Tk, D] tensor.
    """
    if bool(torch.isfinite(q).all()) and bool(torch.isfinite(keys).all()):
        return torch.einsum("qhd,khd->hqk", q, keys) * scale
    pair = allowed[..., None]  # [1, Tq, Tk, 1]
    q_b = torch.where(pair, q.transpose(0, 1)[:, :, None], torch.zeros((), dtype=q.dtype))
    k_b = torch.where(pair, keys.transpose(0, 1)[:, None], torch.zeros((), dtype=q.dtype))
    return (q_b * k_b).sum(-1) * scale


def _masked_contract(coeff, x, allowed):
    """out[i, h] = sum_p coeff[h, i, p] x[p, h] over allowed (i, p) only -> [I, H, D].

    coeff is [H, I, P] and already 0 where not allowed; x is [P, H, D]. With a
    finite x this is one einsum. Otherwise 0 * NaN would carry a non-finite row
    of x into every output row, so masked terms multiply zeros in place of x.
    """
    if bool(torch.isfinite(x).all()):
        return torch.einsum("hip,phd->ihd", coeff, x)
    x_b = torch.where(
        allowed[..., None], x.transpose(0, 1)[:, None], torch.zeros((), dtype=x.dtype)
    )
    return (coeff[..., None] * x_b).sum(2).transpose(0, 1)


def _dense_allowed(mask: SpanMask, device) -> torch.Tensor:
    return mask.to_dense().to(device)[None]  # [1, Tq, Tk]


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SpanMask,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention over packed tokens, computed in ``q.dtype``.

    The float math of attention restricted to each row's allowed keys::

        m = max_j s_j,  l = sum_j exp(s_j - m),  out = sum_j exp(s_j - m) v_j / l,
        lse = m + log(l)

    so a NaN or inf in q, k or v reaches exactly the rows whose allowed keys
    include it (a row with a NaN score, a +inf score or only -inf scores is
    NaN), masked-out keys never reach a row, and an empty row is exactly 0 with
    lse -inf.

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
    allowed = _dense_allowed(mask, q.device)
    empty_row = ~allowed.any(dim=-1, keepdim=True)  # [1, Tq, 1]
    scores = _masked_scores(q, keys, allowed, scale)  # [Hq, Tq, Tk]
    scores = torch.where(allowed, scores, -math.inf)
    # m is a shift the result does not depend on: detached, so the gradient is
    # exactly softmax's. Empty rows shift by 0 (their m is -inf).
    if scores.shape[-1]:
        row_max = scores.amax(dim=-1, keepdim=True).detach()
    else:  # no keys at all (Tk = 0): every row is empty; amax has nothing to reduce
        row_max = scores.new_zeros((*scores.shape[:-1], 1))
    row_max = torch.where(empty_row, torch.zeros_like(row_max), row_max)
    # Masked entries are exactly 0 (never exp of a masked score: its backward is 0 * 0).
    probs = torch.where(allowed, torch.exp(scores - row_max), torch.zeros_like(scores))
    row_sum = probs.sum(dim=-1, keepdim=True)
    # l = 1 on empty rows, so neither the forward nor its backward divides by 0.
    safe_sum = torch.where(empty_row, torch.ones_like(row_sum), row_sum)
    # Divided after the product: masked coefficients stay exact zeros even when l is NaN.
    out = _masked_contract(probs, values, allowed) / safe_sum.squeeze(-1).transpose(0, 1)[..., None]
    lse = torch.where(empty_row, -math.inf, row_max + torch.log(safe_sum))
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
    allowed = _dense_allowed(mask, q.device)
    scores = _masked_scores(q, keys, allowed, scale)
    # lse is -inf only on empty rows, whose probabilities are masked anyway.
    finite_lse = torch.where(lse == -math.inf, torch.zeros_like(lse), lse)[..., None]
    probs = torch.where(allowed, torch.exp(scores - finite_lse), torch.zeros_like(scores))
    delta = (grad_out * out).sum(-1).transpose(0, 1)  # [Hq, Tq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(delta.dtype)
    allowed_t = allowed.transpose(1, 2)
    grad_values = _masked_contract(probs.transpose(1, 2), grad_out, allowed_t)  # P^T dO
    grad_probs = _masked_scores(grad_out, values, allowed, 1.0)  # dO V^T
    zero = torch.zeros_like(scores)
    grad_scores = torch.where(allowed, probs * (grad_probs - delta[..., None]), zero)
    grad_q = _masked_contract(grad_scores, keys, allowed) * scale
    grad_keys = _masked_contract(grad_scores.transpose(1, 2), q, allowed_t) * scale
    tokens, kv_heads = k.shape[0], k.shape[1]
    grad_k = grad_keys.reshape(tokens, kv_heads, group, head_dim).sum(2)
    grad_v = grad_values.reshape(tokens, kv_heads, group, head_dim).sum(2)
    return grad_q, grad_k, grad_v
