"""span_attention: the op layer of fused span-masked attention.

Three thin layers, as in flash-attention:

1. ``metalm::span_attention_fwd`` / ``metalm::span_attention_bwd`` are
   torch.library custom ops with fake (meta) implementations, so
   ``torch.compile(fullgraph=True)`` traces through them;
2. autograd is registered on the forward op; it saves ``out`` and ``lse`` and
   calls the backward op (recomputing probabilities from ``lse``, never storing
   a Tq x Tk matrix);
3. :func:`span_attention` validates inputs on the host, resolves the backend
   and calls the forward op.

Backends: ``triton`` (kernels/span_attention.py), ``cpu`` (csrc/cpu, fp32 and
fp64 natively; fp16/bf16 are computed in fp32 and rounded once at the end) and
``reference`` (metalm_fast.reference, dense, for testing).
"""

from __future__ import annotations

import math

import torch

from metalm_fast import reference
from metalm_fast.masks import SpanMask
from metalm_fast.ops._backend import cpu_extension, resolve_backend
from metalm_fast.ops._validation import (
    SUPPORTED_HEAD_DIMS,
    check_float_tensor,
    check_gqa_heads,
    check_head_dim,
    check_scale,
)

__all__ = ["span_attention", "SUPPORTED_HEAD_DIMS"]

_SUPPORTED = ("triton", "cpu", "reference")


# ----------------------------------------------------------------------------- intervals
def _clamped(kv_start, kv_end, num_keys):
    """Intervals clamped to 0 <= start <= end <= Tk, in int64 (no device sync).

    The clamp runs in 64 bits before any narrowing, so a kv_end of 2**32 + 3 is
    past the end (Tk), never 3. A start past its end becomes an empty interval.
    """
    start = kv_start.to(torch.int64).clamp(0, num_keys)
    end = torch.maximum(kv_end.to(torch.int64).clamp(max=num_keys), start)
    return start, end


def _kernel_intervals(kv_start, kv_end, num_keys):
    """int32 contiguous intervals for the Triton kernels, which clamp int32 themselves.

    int32 (every SpanMask) passes through untouched; any wider or other integer
    type is clamped in int64 first (see _clamped), then narrowed.
    """
    if kv_start.dtype == torch.int32 and kv_end.dtype == torch.int32:
        return kv_start.contiguous(), kv_end.contiguous()
    start, end = _clamped(kv_start, kv_end, num_keys)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


# ----------------------------------------------------------------------------- backends
def _forward_triton(q, k, v, kv_start, kv_end, scale, monotone):
    from metalm_fast.kernels.span_attention import span_attention_forward

    kv_start, kv_end = _kernel_intervals(kv_start, kv_end, k.shape[0])
    return span_attention_forward(q, k, v, kv_start, kv_end, scale, monotone)


def _backward_triton(grad_out, q, k, v, lse, delta, kv_start, kv_end, scale, monotone):
    from metalm_fast.kernels.span_attention import span_attention_backward

    kv_start, kv_end = _kernel_intervals(kv_start, kv_end, k.shape[0])
    return span_attention_backward(grad_out, q, k, v, lse, delta, kv_start, kv_end, scale, monotone)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for every kernel dtype; float64 inputs (cpu and reference only) keep float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The C++ kernels are templated on float and double; half types accumulate in fp32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _forward_cpu(q, k, v, kv_start, kv_end, scale):
    cpu_extension()
    compute = _cpu_compute_dtype(q.dtype)
    out, lse = torch.ops.metalm._span_attention_fwd_cpu(
        q.to(compute), k.to(compute), v.to(compute), kv_start, kv_end, scale
    )
    return out.to(q.dtype), lse


def _backward_cpu(grad_out, q, k, v, lse, delta, kv_start, kv_end, scale):
    cpu_extension()
    compute = _cpu_compute_dtype(q.dtype)
    dq, dk, dv = torch.ops.metalm._span_attention_bwd_cpu(
        grad_out.to(compute),
        q.to(compute),
        k.to(compute),
        v.to(compute),
        lse,
        delta,
        kv_start,
        kv_end,
        scale,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _mask_of(kv_start, kv_end, num_keys, monotone) -> SpanMask:
    # Raw intervals are clamped as the kernels clamp them, so the reference
    # computes what they compute; monotone is not used by the dense reference
    # (and may be false: the op takes it on trust), so it is not claimed.
    del monotone
    start, end = _clamped(kv_start, kv_end, num_keys)
    return SpanMask(start.to(torch.int32), end.to(torch.int32), num_keys, False)


def _forward_reference(q, k, v, kv_start, kv_end, scale, monotone):
    out, lse = reference.span_attention(
        q, k, v, _mask_of(kv_start, kv_end, k.shape[0], monotone), scale=scale
    )
    return out, lse.to(_lse_dtype(q.dtype))


def _backward_reference(grad_out, q, k, v, grad_lse, kv_start, kv_end, scale, monotone):
    mask = _mask_of(kv_start, kv_end, k.shape[0], monotone)
    return reference.span_attention_backward(
        grad_out.to(q.dtype), q, k, v, mask, grad_lse=grad_lse, scale=scale
    )


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("metalm::span_attention_fwd", mutates_args=())
def _span_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float,
    monotone: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [Tq, Hq, D] (q.dtype), lse [Hq, Tq] float32 (float64 for float64 q), contiguous."""
    if backend == "triton":
        out, lse = _forward_triton(q, k, v, kv_start, kv_end, scale, monotone)
    elif backend == "cpu":
        out, lse = _forward_cpu(q, k, v, kv_start, kv_end, scale)
    else:
        out, lse = _forward_reference(q, k, v, kv_start, kv_end, scale, monotone)
    return out.contiguous(), lse.contiguous()


@_span_attention_fwd.register_fake
def _(q, k, v, kv_start, kv_end, scale, monotone, backend):
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("metalm::span_attention_bwd", mutates_args=())
def _span_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float,
    monotone: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (shapes and dtypes of q, k, v), contiguous."""
    if backend == "reference":
        grads = _backward_reference(grad_out, q, k, v, grad_lse, kv_start, kv_end, scale, monotone)
        return tuple(g.contiguous() for g in grads)
    # delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] - dLSE[h, t]: with it,
    # dS = P * (dP - delta) covers gradients reaching both out and lse.
    # The backward kernels subtract delta from dP, and on rows with few keys the two
    # nearly cancel: the CPU kernels (held to the fp32 tolerance rule against their
    # own fp32 dP) get delta summed in float64 and rounded once. On GPU that would
    # be two float64 copies of [T, H, D] on the hot path; fp32 sums serve, as in
    # FlashAttention.
    accumulate = torch.float64 if backend == "cpu" else lse.dtype
    products = grad_out.to(accumulate) * out.to(accumulate)
    delta = (products.sum(-1).transpose(0, 1) - grad_lse.to(accumulate)).to(lse.dtype)
    delta = delta.contiguous()
    if backend == "triton":
        grads = _backward_triton(grad_out, q, k, v, lse, delta, kv_start, kv_end, scale, monotone)
    else:
        grads = _backward_cpu(grad_out, q, k, v, lse, delta, kv_start, kv_end, scale)
    return tuple(g.contiguous() for g in grads)


@_span_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, kv_start, kv_end, scale, monotone, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end, scale, monotone, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end)
    ctx.scale, ctx.monotone, ctx.backend = scale, monotone, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_start, kv_end = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    # lse is -inf exactly on empty rows; no gradient can flow into them.
    grad_lse = torch.where(lse == -math.inf, torch.zeros_like(grad_lse), grad_lse)
    dq, dk, dv = _span_attention_bwd(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        grad_lse,
        kv_start,
        kv_end,
        ctx.scale,
        ctx.monotone,
        ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None


_span_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, mask, scale, backend) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, tensor, "3-D [tokens, heads, head_dim]")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}"
        )
    head_dim = q.shape[-1]
    check_head_dim(head_dim, "q.shape[-1]")
    check_gqa_heads(q.shape[1], k.shape[1], "q.shape[1]", "k.shape[1]")
    if q.dtype == torch.float64 and backend == "triton":
        raise TypeError(
            "the triton backend supports float16, bfloat16 and float32, got float64 (q)"
        )
    if not isinstance(mask, SpanMask):
        raise TypeError(f"mask must be a SpanMask, got {type(mask).__name__}")
    if mask.num_queries != q.shape[0]:
        raise ValueError(
            f"mask has {mask.num_queries} queries but q has {q.shape[0]} tokens (mask, q.shape[0])"
        )
    if mask.num_keys != k.shape[0]:
        raise ValueError(
            f"mask has {mask.num_keys} keys but k has {k.shape[0]} tokens "
            "(mask.num_keys, k.shape[0])"
        )
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}; use mask.to(q.device)")
    check_scale(scale)


# ----------------------------------------------------------------------------- public API
def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SpanMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Fused attention over packed tokens with an interval mask.

    Query ``t`` attends key ``j`` exactly when
    ``mask.kv_start[t] <= j < mask.kv_end[t]``::

        out[t, h] = sum_j softmax_j(scale * q[t, h] . k[j, g(h)]) v[j, g(h)],
        g(h) = h // (Hq // Hkv)

    Parameters
    ----------
    q : Tensor [Tq, Hq, D]
    k, v : Tensor [Tk, Hkv, D]; Hq must be a multiple of Hkv (GQA / MQA).
        float16, bfloat16 or float32 (float64 on the cpu and reference
        backends), one dtype and device for all three. Only the last dim must
        be contiguous, so q, k, v may be slices of one fused qkv tensor.
        D is a multiple of 8 from 16 to 256.
    mask : SpanMask with ``num_queries == Tq`` and ``num_keys == Tk``.
    scale : float, optional
        Softmax scale; default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the log-sum-exp (differentiable).
    backend : {"auto", "triton", "cpu", "reference"}
        "auto" (or ``METALM_FAST_BACKEND``) picks triton on CUDA and cpu on CPU.

    Returns
    -------
    out : Tensor [Tq, Hq, D], dtype of q.
    lse : Tensor [Hq, Tq] float32 (float64 for float64 inputs), natural log (only
        with ``return_lse``).
        A query whose interval is empty gets ``out = 0``, ``lse = -inf`` and
        zero gradients.

    Notes
    -----
    Non-finite inputs: the result is the float math of attention restricted to
    each row's allowed keys (``m = max_j s_j``, ``out = sum_j exp(s_j - m) v_j
    / sum_j exp(s_j - m)``, ``lse = m + log sum_j exp(s_j - m)``). A NaN or inf
    in q, k or v affects exactly the rows whose allowed keys include it (a row
    with a NaN score, a +inf score, or only -inf scores comes out NaN, in out,
    lse and gradients; an inf in v gives inf where that math does); masked-out
    keys never contaminate a row; empty rows stay exactly 0 with lse -inf.
    Every backend (cpu, triton, reference) follows this, forward and backward.

    Differentiable in q, k and v. The backward pass is deterministic
    (bit-identical on repeat) on every backend. Index contents are validated
    when the SpanMask is built, so this call does no device synchronisation.

    Example
    -------
    >>> import torch
    >>> from metalm_fast import SpanMask, span_attention
    >>> cu = torch.tensor([0, 5, 12])
    >>> mask = SpanMask.semi_causal(cu, span_starts=[6], span_ends=[9])
    >>> q, k, v = (torch.randn(12, 4, 32) for _ in range(3))
    >>> span_attention(q, k, v, mask).shape
    torch.Size([12, 4, 32])
    """
    _check_inputs(q, k, v, mask, scale, backend)
    resolved = resolve_backend("span_attention", backend, q.device, _SUPPORTED)
    if q.dtype == torch.float64 and resolved == "triton":
        raise TypeError(
            "the triton backend supports float16, bfloat16 and float32, got float64 (q)"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = _span_attention_fwd(
        q, k, v, mask.kv_start, mask.kv_end, float(scale), bool(mask.monotone), resolved
    )
    return (out, lse) if return_lse else out
