"""embed_scatter: token embeddings with encoder features scattered in, in one pass.

``out[t] = weight[token_ids[t]] * scale`` where ``feature_index[t] < 0``, and
``out[t] = features[feature_index[t]]`` otherwise. HF-style code does this in
three passes (lookup, ``masked_scatter`` through a [T, Dm] boolean mask, scale);
here every output row is written once, from the one row it comes from.

Layers, as for span_attention: ``metalm::embed_scatter_fwd`` / ``_bwd`` custom
ops with fake implementations, autograd registered on the forward, and the
public :func:`embed_scatter` that validates on the host and picks a backend.

The weight gradient accumulates repeated ids in fp32 (fp64 for float64) with a
deterministic segmented reduction (no float atomics): bit-identical on repeat.

Out-of-range rows, one contract for every backend: an id outside ``[0, V)`` at a
token position, or a feature row ``>= F``, is never read. ``validate=True``
raises ValueError on the host before any kernel runs. Without it the call
still fails rather than answering: cpu and reference tensors raise RuntimeError
naming the position (the cpu kernel checks each row as it copies it; the
others are checked on the host first, which costs nothing for host tensors).
On a GPU the triton and cuda backends queue a device-side assertion instead
(``torch._assert_async``: no synchronisation, the error surfaces at the next
one, as an out-of-range ``nn.Embedding`` does there). All comparisons are in
int64, so no id aliases another.
"""

from __future__ import annotations

import torch

from metalm_fast import reference
from metalm_fast.checks import integer
from metalm_fast.ops._backend import cpu_extension, cuda_extension, resolve_backend
from metalm_fast.ops._validation import (
    check_float_tensor,
    check_index_tensor,
    check_scale,
)
from metalm_fast.reference.embedding import check_rows_in_range

#: Positions and table rows are grouped with int32 order/offsets and launched as
#: grid.x (both < 2**31); checked on the shapes, so it costs no sync.
_ROW_LIMIT = 2**31

__all__ = ["embed_scatter"]

_SUPPORTED = ("triton", "cuda", "cpu", "reference")


# ----------------------------------------------------------------------------- backends
def _check_rows_read(token_ids, feature_index, num_embeddings: int, num_features: int) -> None:
    """The out-of-range contract (module docstring) for backends whose kernels skip a
    bad row instead of raising: exact and synchronous on the host, asynchronous
    on a GPU (a host check there would cost the sync validate=False avoids)."""
    if token_ids.device.type == "cpu":
        check_rows_in_range(token_ids, feature_index, num_embeddings, num_features)
        return
    ids, rows = token_ids.to(torch.int64), feature_index.to(torch.int64)
    bad = torch.where(rows < 0, (ids < 0) | (ids >= num_embeddings), rows >= num_features)
    torch._assert_async(
        ~bad.any(),
        f"embed_scatter: a token id outside [0, {num_embeddings}) or a feature row "
        f">= {num_features} (run with validate=True to find it)",
    )


def _forward_reference(token_ids, weight, features, feature_index, scale):
    return reference.embed_scatter(token_ids, weight, features, feature_index, scale=scale)


def _backward_reference(
    grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx
):
    """index_add in the accumulation dtype: the slow, obviously right backward."""
    check_rows_in_range(token_ids, feature_index, num_embeddings, num_features)
    accumulate = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    is_token = feature_index < 0
    ids = token_ids[is_token].long()
    grad_weight = torch.zeros(
        num_embeddings, grad_out.shape[1], dtype=accumulate, device=grad_out.device
    )
    grad_weight.index_add_(0, ids, grad_out[is_token].to(accumulate) * scale)
    if padding_idx >= 0:
        grad_weight[padding_idx] = 0
    grad_features = torch.zeros(
        num_features, grad_out.shape[1], dtype=accumulate, device=grad_out.device
    )
    grad_features.index_add_(0, feature_index[~is_token].long(), grad_out[~is_token].to(accumulate))
    return grad_weight.to(grad_out.dtype), grad_features.to(grad_out.dtype)


def _forward_triton(token_ids, weight, features, feature_index, scale):
    from metalm_fast.kernels.embed_scatter import embed_scatter_forward

    _check_rows_read(token_ids, feature_index, weight.shape[0], features.shape[0])
    return embed_scatter_forward(token_ids, weight, features, feature_index, scale)


def _backward_triton(
    grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx
):
    from metalm_fast.kernels.embed_scatter import embed_scatter_backward

    _check_rows_read(token_ids, feature_index, num_embeddings, num_features)
    return embed_scatter_backward(
        grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx
    )


def _forward_cuda(token_ids, weight, features, feature_index, scale):
    cuda_extension()
    _check_rows_read(token_ids, feature_index, weight.shape[0], features.shape[0])
    return torch.ops.metalm._embed_scatter_fwd_cuda(
        token_ids, weight, features, feature_index, scale
    )


def _backward_cuda(
    grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx
):
    cuda_extension()
    _check_rows_read(token_ids, feature_index, num_embeddings, num_features)
    return torch.ops.metalm._embed_scatter_bwd_cuda(
        grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx
    )


def _forward_cpu(token_ids, weight, features, feature_index, scale):
    cpu_extension()
    return torch.ops.metalm._embed_scatter_fwd_cpu(
        token_ids, weight, features, feature_index, scale
    )


def _backward_cpu(
    grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx
):
    cpu_extension()
    return torch.ops.metalm._embed_scatter_bwd_cpu(
        grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx
    )


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("metalm::embed_scatter_fwd", mutates_args=())
def _embed_scatter_fwd(
    token_ids: torch.Tensor,
    weight: torch.Tensor,
    features: torch.Tensor,
    feature_index: torch.Tensor,
    scale: float,
    padding_idx: int,
    backend: str,
) -> torch.Tensor:
    """out [T, Dm] in weight.dtype, contiguous. padding_idx only matters for backward."""
    if backend == "triton":
        out = _forward_triton(token_ids, weight, features, feature_index, scale)
    elif backend == "cuda":
        out = _forward_cuda(token_ids, weight, features, feature_index, scale)
    elif backend == "cpu":
        out = _forward_cpu(token_ids, weight, features, feature_index, scale)
    else:
        out = _forward_reference(token_ids, weight, features, feature_index, scale)
    return out.contiguous()


@_embed_scatter_fwd.register_fake
def _(token_ids, weight, features, feature_index, scale, padding_idx, backend):
    return weight.new_empty((token_ids.shape[0], weight.shape[1]))


@torch.library.custom_op("metalm::embed_scatter_bwd", mutates_args=())
def _embed_scatter_bwd(
    grad_out: torch.Tensor,
    token_ids: torch.Tensor,
    feature_index: torch.Tensor,
    num_embeddings: int,
    num_features: int,
    scale: float,
    padding_idx: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_weight [V, Dm], grad_features [F, Dm], in grad_out.dtype."""
    args = (grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx)
    if backend == "triton":
        grads = _backward_triton(*args)
    elif backend == "cuda":
        grads = _backward_cuda(*args)
    elif backend == "cpu":
        grads = _backward_cpu(*args)
    else:
        grads = _backward_reference(*args)
    return tuple(g.contiguous() for g in grads)


@_embed_scatter_bwd.register_fake
def _(
    grad_out, token_ids, feature_index, num_embeddings, num_features, scale, padding_idx, backend
):
    width = grad_out.shape[1]
    return grad_out.new_empty((num_embeddings, width)), grad_out.new_empty((num_features, width))


def _setup_context(ctx, inputs, output):
    token_ids, weight, features, feature_index, scale, padding_idx, backend = inputs
    ctx.save_for_backward(token_ids, feature_index)
    ctx.num_embeddings, ctx.num_features = weight.shape[0], features.shape[0]
    ctx.weight_dtype, ctx.features_dtype = weight.dtype, features.dtype
    ctx.scale, ctx.padding_idx, ctx.backend = scale, padding_idx, backend


def _backward(ctx, grad_out):
    token_ids, feature_index = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_weight, grad_features = _embed_scatter_bwd(
        grad_out,
        token_ids,
        feature_index,
        ctx.num_embeddings,
        ctx.num_features,
        ctx.scale,
        ctx.padding_idx,
        ctx.backend,
    )
    return (
        None,
        grad_weight.to(ctx.weight_dtype),
        grad_features.to(ctx.features_dtype),
        None,
        None,
        None,
        None,
    )


_embed_scatter_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- validation
def _check_index(name: str, index, tokens: int | None) -> None:
    check_index_tensor(name, index, "1-D [T]")
    if tokens is not None and index.shape[0] != tokens:
        raise ValueError(
            f"{name} has {index.shape[0]} entries but token_ids has {tokens} (one per token)"
        )


def _check_table(name: str, table, rows_name: str) -> None:
    check_float_tensor(name, table, f"2-D [{rows_name}, Dm]", dtype_text="a floating dtype")


def _check_inputs(token_ids, weight, features, feature_index, scale) -> None:
    _check_index("token_ids", token_ids, None)
    _check_index("feature_index", feature_index, token_ids.shape[0])
    _check_table("weight", weight, "V")
    _check_table("features", features, "F")
    if features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features width {features.shape[1]} must equal weight width {weight.shape[1]} (Dm)"
        )
    if features.dtype != weight.dtype:
        raise TypeError(
            f"features dtype {features.dtype} must equal weight dtype {weight.dtype} "
            "(cast the connector output first)"
        )
    devices = {t.device for t in (token_ids, weight, features, feature_index)}
    if len(devices) != 1:
        raise ValueError(
            "token_ids, weight, features and feature_index must be on one device, got "
            f"{token_ids.device}, {weight.device}, {features.device}, {feature_index.device}"
        )
    for name, size in (("token_ids", token_ids.shape[0]), ("weight", weight.shape[0])):
        if size >= _ROW_LIMIT:
            raise ValueError(f"{name} must have fewer than 2**31 rows, got {size}")
    if features.shape[0] >= _ROW_LIMIT:
        raise ValueError(f"features must have fewer than 2**31 rows, got {features.shape[0]}")
    check_scale(scale, allow_none=False)


def _padding_row(padding_idx, num_embeddings: int) -> int:
    """The weight row ``padding_idx`` names (negative counts from the end), or -1 for
    None. A bool or a float raises TypeError: True would name row 1."""
    if padding_idx is None:
        return -1
    row = integer(padding_idx, "padding_idx")
    if not -num_embeddings <= row < num_embeddings:
        raise ValueError(
            f"padding_idx must be an int in [-{num_embeddings}, {num_embeddings}), "
            f"got {padding_idx!r}"
        )
    return row + num_embeddings if row < 0 else row


def _check_index_contents(token_ids, weight, features, feature_index) -> None:
    """validate=True: index contents (one device sync)."""
    is_token = feature_index < 0
    ids = token_ids[is_token]
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= weight.shape[0]).any())):
        bad = int(ids[(ids < 0) | (ids >= weight.shape[0])][0])
        raise ValueError(
            f"token_ids contains {bad}, outside [0, {weight.shape[0]}) (the rows of weight)"
        )
    rows = feature_index[~is_token]
    if rows.numel() and bool((rows >= features.shape[0]).any()):
        bad = int(rows[rows >= features.shape[0]][0])
        raise ValueError(
            f"feature_index contains {bad}, outside [0, {features.shape[0]}) (the rows of features)"
        )


# ----------------------------------------------------------------------------- public API
def embed_scatter(
    token_ids: torch.Tensor,
    weight: torch.Tensor,
    features: torch.Tensor,
    feature_index: torch.Tensor,
    *,
    scale: float = 1.0,
    padding_idx: int | None = None,
    validate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Embed tokens and scatter encoder features into their positions, in one pass.

    ::

        out[t] = weight[token_ids[t]] * scale   where feature_index[t] < 0
               = features[feature_index[t]]     otherwise

    Parameters
    ----------
    token_ids : int32/int64 [T]. Ids at feature positions are never read.
    weight : [V, Dm] embedding table, floating (last dim contiguous).
    features : [F, Dm] connector outputs, same dtype as ``weight`` (F may be 0).
    feature_index : int32/int64 [T]: the feature row for each position, or < 0
        for a token position.
    scale : multiplies token embeddings (e.g. ``sqrt(Dm)``), not features.
    padding_idx : as in ``nn.Embedding``: that row's gradient is always zero.
    validate : check index contents (ids in [0, V) at token positions, feature
        rows < F) and raise ValueError; costs one device synchronisation.
        Without it an out-of-range row still fails (RuntimeError; on a GPU a
        device-side assertion), never reads another row: see the module docstring.
    backend : {"auto", "triton", "cuda", "cpu", "reference"}. "auto" picks triton
        on CUDA tensors and cpu on CPU tensors.

    Returns
    -------
    out : [T, Dm] in ``weight.dtype``. Differentiable in ``weight`` and
        ``features``: repeated ids accumulate in fp32, deterministically; rows no
        token uses get exact zeros; a feature row used at several positions
        receives the sum of their gradients.

    Example
    -------
    >>> import torch
    >>> from metalm_fast import embed_scatter
    >>> weight, features = torch.randn(100, 16), torch.randn(2, 16)
    >>> ids = torch.tensor([5, 0, 0, 7])
    >>> feature_index = torch.tensor([-1, 0, 1, -1])
    >>> embed_scatter(ids, weight, features, feature_index).shape
    torch.Size([4, 16])
    """
    _check_inputs(token_ids, weight, features, feature_index, scale)
    padding_row = _padding_row(padding_idx, weight.shape[0])
    if validate:
        _check_index_contents(token_ids, weight, features, feature_index)
    resolved = resolve_backend("embed_scatter", backend, weight.device, _SUPPORTED)
    return _embed_scatter_fwd(
        token_ids, weight, features, feature_index, float(scale), padding_row, resolved
    )
