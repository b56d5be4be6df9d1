"""fused_linear_cross_entropy: the LM head and its loss without a [T, V] logits tensor.

``loss = cross_entropy(hidden @ weight.T (+ bias), labels)`` computed in row
chunks (Liger-Kernel's design): for each chunk of scored rows the forward makes
the chunk's logits, turns them into row losses and, in the same pass, into
``grad_logits`` (in place, on the chunk buffer), then immediately spends them:
``grad_hidden[chunk] = grad_logits @ weight`` and
``grad_weight += grad_logits.T @ hidden[chunk]`` (and ``grad_bias``). The
forward therefore returns the loss *and* the gradients; backward only scales
them by ``grad_output``. Peak memory is one chunk of logits (two under a
softcap on the cpu backend, which keeps the tanh values for the chain rule)
instead of ``T x V`` logits and their gradient, plus the fp32 grad_weight.

Chunking: the scored rows are split into the fewest equal chunks of at most
``max(CHUNK_ROWS_MIN, budget // (V * itemsize))`` rows of accumulation-dtype
logits, with ``budget`` = ``CHUNK_BYTES`` (16 MiB) on the CPU and
``CHUNK_BYTES_CUDA`` (128 MiB) on CUDA, so the buffer stays near a fixed byte
budget whatever the vocabulary, and no chunk is too short for an efficient
matmul (:func:`rows_per_chunk`). One logits buffer serves every chunk. Chunks
run in a fixed order with plain matmuls, no atomics: bit-identical on repeat.

Precision: fp16/bf16 inputs accumulate in fp32: logits, grad_logits, the loss
and grad_weight (cast once at the end) are fp32; float64 stays float64. On CUDA
the half matmuls run in their own dtype with fp32 output (``out_dtype``); on the
CPU (and the Triton interpreter) they run on fp32 copies (the weight widened
once per call, a V x D fp32 copy). The per-row loss is combined from its row
statistics in float64 and rounded once; the mean sums the row losses in float64.

Ignored rows (``labels == ignore_index``) are dropped before any matmul: they
cost nothing and never touch the loss or a gradient, even when their hidden
state is NaN. Non-finite values otherwise follow the float math: a NaN or inf
in ``hidden[t]`` (or a NaN/+inf logit of row ``t``) makes ``loss[t]`` NaN and
``grad_hidden[t]`` NaN, and leaves every other row's loss and ``grad_hidden``
exact; ``grad_weight`` and ``grad_bias`` sum over rows, so one such row makes
them non-finite (NaN), as eager autograd does. A softcap maps an infinite
logit to +-softcap, so there such a row stays finite, as in eager.

Layers, as for the other ops: ``metalm::fused_linear_cross_entropy_fwd`` is a
custom op with a fake implementation (torch.compile traces it whole: the
data-dependent row selection and the label check stay inside it), autograd is
registered on it, and the public :func:`fused_linear_cross_entropy` validates
on the host and picks a backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from metalm_fast import reference
from metalm_fast.checks import integer
from metalm_fast.ops._backend import resolve_backend
from metalm_fast.ops._validation import check_float_tensor, check_index_tensor

__all__ = ["CHUNK_BYTES", "fused_linear_cross_entropy", "rows_per_chunk"]

#: Byte budget of one chunk of logits (accumulation dtype) on the CPU: 16 MiB is
#: 512 rows at V = 8192 in fp32, so the chunk's softmax passes stay in the last-level
#: cache (measured 7% faster fwd+bwd than 64 MiB at T=7500, D=256, V=8192, one thread).
CHUNK_BYTES = 16 * 2**20
#: Fewest rows per chunk (unless fewer are scored), whatever the budget says: below
#: 256 the [rows, D] x [D, V] matmuls lose efficiency (128 rows measured 6% slower
#: than 256 at V=64000, D=1024), so at V >= 16k a CPU chunk is 256 rows, > 16 MiB.
CHUNK_ROWS_MIN = 256
#: The floor never makes a chunk larger than this: at a huge vocabulary memory wins
#: (256 rows at V = 10**6 would be 1 GB of fp32 logits).
CHUNK_BYTES_MAX = 256 * 2**20
#: Budget on CUDA: 256 rows at V = 128k in fp32, tall enough for cuBLAS.
CHUNK_BYTES_CUDA = 128 * 2**20

_SUPPORTED = ("triton", "cpu", "reference")
_REDUCTIONS = ("mean", "sum")
_HALF = (torch.float16, torch.bfloat16)


def rows_per_chunk(
    vocab: int,
    rows: int,
    itemsize: int = 4,
    budget: int | None = None,
    min_rows: int | None = None,
) -> int:
    """Rows per chunk: ``rows`` split into the fewest equal chunks whose
    ``chunk x vocab`` logits of ``itemsize`` bytes fit ``budget``, or of
    ``min_rows`` rows where fewer fit, as long as those fit ``CHUNK_BYTES_MAX``
    (defaults: ``CHUNK_BYTES``, ``CHUNK_ROWS_MIN``; always at least 1 row).

    Equal chunks, so the last is no sliver: a matmul of one or two rows takes
    BLAS's vector path, which sums the vocabulary sequentially (measured 3x the
    rounding error of a blocked matmul).

    >>> rows_per_chunk(8192, 4096)  # 16 MiB: 512 rows of 8192 fp32 logits
    512
    >>> rows_per_chunk(8192, 1100)  # 3 chunks of 367, not 512 + 512 + 76
    367
    >>> rows_per_chunk(128256, 4096)  # 32 rows would fit 16 MiB; the floor is 256
    256
    >>> rows_per_chunk(32003, 100, budget=2**20, min_rows=1)  # 8.19 rows fit: 13 chunks
    8
    >>> rows_per_chunk(10**6, 4096)  # the floor capped: 67 rows = 256 MiB of logits
    67
    >>> rows_per_chunk(10**9, 5)
    1
    """
    budget = CHUNK_BYTES if budget is None else budget
    min_rows = CHUNK_ROWS_MIN if min_rows is None else min_rows
    row_bytes = max(1, vocab * itemsize)
    floor = min(min_rows, CHUNK_BYTES_MAX // row_bytes)
    most = max(1, floor, budget // row_bytes)
    chunks = max(1, -(-rows // most))
    return max(1, -(-rows // chunks))


class _Params(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    grad_scale: float


# ----------------------------------------------------------------------------- row-wise math
def _row_loss(m, sums, x_label, sum_x, vocab: int, params: _Params):
    """log(s) + (1 - eps)(m - x_y) + eps (m - mean x) + z lse^2 from the row statistics,
    in float64: [rows, 1] values, so this is free, and the loss is rounded once instead
    of once per term (fp32 sums of the four terms measured 1-2 ulp off)."""
    m, x_label = m.double(), x_label.double()
    log_sums = sums.double().log()
    loss = log_sums + (1.0 - params.label_smoothing) * (m - x_label)
    if params.z_loss:
        loss += params.z_loss * (m + log_sums) ** 2
    if params.label_smoothing:  # 0 * sum_x would turn a -inf logit into NaN
        loss += params.label_smoothing * (m - sum_x.double() / vocab)
    return loss


def _rows_torch(logits, labels, bias, params: _Params, loss_out, write_grad: bool):
    """Row losses into ``loss_out``; returns grad_logits (the chunk buffer itself,
    overwritten, unless a softcap needs the tanh values kept beside it) or None."""
    if bias is not None:
        logits.add_(bias)
    vocab, eps, cap = logits.shape[1], params.label_smoothing, params.softcap
    targets = labels[:, None]
    if cap is None:
        x = logits
        m = x.amax(1, keepdim=True)
        x_label = x.gather(1, targets)
        sum_x = x.sum(1, keepdim=True) if eps else None
        exps = x.sub_(m).exp_()  # the buffer now holds exp(x - m)
    else:
        tanh = logits.div_(cap).tanh_()  # x = cap * tanh; tanh is monotone, so max commutes
        m = tanh.amax(1, keepdim=True).mul_(cap)
        x_label = tanh.gather(1, targets).mul_(cap)
        sum_x = tanh.sum(1, keepdim=True).mul_(cap) if eps else None
        exps = torch.mul(tanh, cap).sub_(m).exp_()  # the chain term still needs tanh
    sums = exps.sum(1, keepdim=True)
    lse = m + sums.log()
    loss_out.copy_(_row_loss(m, sums, x_label, sum_x, vocab, params).squeeze(1))
    if not write_grad:
        return None
    scale = params.grad_scale
    exps.mul_((1.0 + 2.0 * params.z_loss * lse) * scale / sums)  # = scale * p * (1 + 2 z lse)
    if eps:
        exps.sub_(scale * eps / vocab)
    exps.scatter_add_(1, targets, exps.new_full(targets.shape, -(1.0 - eps) * scale))
    if cap is not None:
        tanh.mul_(tanh)
        exps.addcmul_(exps, tanh, value=-1.0)  # * (1 - tanh^2), the softcap chain
    return exps


def _rows_triton(logits, labels, bias, params: _Params, loss_out, write_grad: bool):
    from metalm_fast.kernels.fused_linear_cross_entropy import cross_entropy_rows_

    cross_entropy_rows_(
        logits,
        labels,
        bias,
        loss_out,
        label_smoothing=params.label_smoothing,
        z_loss=params.z_loss,
        softcap=params.softcap,
        grad_scale=params.grad_scale,
        write_grad=write_grad,
    )
    return logits if write_grad else None


# ----------------------------------------------------------------------------- matmuls
class _Matmuls:
    """The three matmuls of a chunk, with fp32 accumulation for half inputs.

    On CUDA a half weight is used as is (cuBLAS with fp32 output); elsewhere the
    operands are widened, the weight once per call (CPU half matmuls have no fp32
    output option).
    """

    def __init__(self, weight: torch.Tensor, accumulate: torch.dtype):
        self.dtype, self.accumulate = weight.dtype, accumulate
        self.native = weight.device.type == "cuda" and weight.dtype in _HALF
        self.weight = weight if self.native else weight.to(accumulate)

    def operand(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.native else rows.to(self.accumulate)

    def logits(self, rows: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """[n, V] logits of ``rows``, written into ``buffer[:n]`` on the CPU: one
        buffer for every chunk, so no fresh chunk-sized allocation (and its page
        faults) per chunk. CUDA's caching allocator reuses its blocks anyway, and
        ``mm`` with ``out_dtype`` takes no ``out``."""
        if self.native:
            return torch.mm(rows, self.weight.T, out_dtype=torch.float32)
        return torch.mm(rows, self.weight.T, out=buffer[: rows.shape[0]])

    def grad_hidden(self, grad: torch.Tensor) -> torch.Tensor:
        if self.native:
            return torch.mm(grad.to(self.dtype), self.weight)
        return torch.mm(grad, self.weight)

    def add_grad_weight(self, grad_weight, grad, rows) -> None:
        if self.native:
            grad_weight.add_(torch.mm(grad.to(self.dtype).T, rows, out_dtype=torch.float32))
        else:
            grad_weight.addmm_(grad.T, rows)


# ----------------------------------------------------------------------------- the chunk loop
def _check_labels(labels, vocab: int, ignore_index: int) -> torch.Tensor:
    """labels in int64 (before any narrowing); every scored one must lie in [0, V)."""
    wide = labels.to(torch.int64)
    bad = (wide != ignore_index) & ((wide < 0) | (wide >= vocab))
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"labels[{t}] = {int(wide[t])} is outside [0, {vocab}) (the rows of weight) "
            f"and is not ignore_index ({ignore_index})"
        )
    return wide


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_chunked(hidden, weight, labels, bias, params: _Params, reduction, needs, rows_fn):
    """(row losses [n], scored rows, the loss's scale, grad_hidden, grad_weight (acc),
    grad_bias (acc)); ``params.grad_scale`` is set here, from the scored row count."""
    need_hidden, need_weight, need_bias = needs
    tokens, vocab = hidden.shape[0], weight.shape[0]
    accumulate = _accumulate_dtype(hidden.dtype)
    wide = _check_labels(labels, vocab, params.ignore_index)
    # With the label check, the host synchronisations of a call: which rows are scored.
    kept = torch.nonzero(wide != params.ignore_index).flatten()
    count = kept.numel()
    every_row = count == tokens
    scored = hidden if every_row else hidden.index_select(0, kept)
    targets = wide if every_row else wide.index_select(0, kept)
    params = params._replace(grad_scale=1.0 if reduction == "sum" else 1.0 / max(count, 1))
    matmuls = _Matmuls(weight, accumulate)
    bias_wide = None if bias is None else bias.to(accumulate)
    new = dict(device=hidden.device, dtype=accumulate)
    grad_hidden = hidden.new_zeros(hidden.shape) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, **new) if need_weight else torch.empty(0, **new)
    grad_bias = torch.zeros(vocab, **new) if need_bias else torch.empty(0, **new)
    row_loss = torch.empty(count, **new)
    budget = CHUNK_BYTES_CUDA if hidden.device.type == "cuda" else CHUNK_BYTES
    step = rows_per_chunk(vocab, count, torch.finfo(accumulate).bits // 8, budget)
    write_grad = any(needs)
    buffer = torch.empty((0 if matmuls.native else min(step, count), vocab), **new)
    for start in range(0, count, step):
        stop = min(start + step, count)
        rows = matmuls.operand(scored[start:stop])
        logits = matmuls.logits(rows, buffer)
        grad = rows_fn(
            logits, targets[start:stop], bias_wide, params, row_loss[start:stop], write_grad
        )
        if need_hidden:
            part = matmuls.grad_hidden(grad)
            if every_row:
                grad_hidden[start:stop] = part
            else:
                grad_hidden.index_copy_(0, kept[start:stop], part.to(hidden.dtype))
        if need_weight:
            matmuls.add_grad_weight(grad_weight, grad, rows)
        if need_bias:
            grad_bias += grad.sum(0)
    return row_loss, kept, params.grad_scale, grad_hidden, grad_weight, grad_bias


def _forward_reference(hidden, weight, labels, bias, params: _Params, reduction: str, needs):
    _check_labels(labels, weight.shape[0], params.ignore_index)
    options = dict(
        bias=bias,
        ignore_index=params.ignore_index,
        reduction=reduction,
        label_smoothing=params.label_smoothing,
        z_loss=params.z_loss,
        softcap=params.softcap,
    )
    loss, per_token = reference.fused_linear_cross_entropy(
        hidden, weight, labels, return_per_token=True, **options
    )
    empty = hidden.new_empty(0)
    grads = (empty, empty, empty)
    if any(needs):
        grads = reference.fused_linear_cross_entropy_grads(hidden, weight, labels, **options)
        grads = tuple(g if need else empty for g, need in zip(grads, needs))
    return loss, per_token, grads


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("metalm::fused_linear_cross_entropy_fwd", mutates_args=())
def _fused_linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss [] and per_token [T] (fp32; fp64 for fp64), then grad_hidden [T, D],
    grad_weight [V, D], grad_bias [V] for the final loss (each [0] when not needed)."""
    # The op chooses its own precision (fp32 accumulation); an autocast region around the
    # call (bf16 training) must not recast the matmuls inside it.
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward(
            hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss,
            softcap, (need_hidden, need_weight, need_bias), backend,
        )  # fmt: skip


def _forward(
    hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
    needs, backend,
):  # fmt: skip
    """The op's forward (see ``_fused_linear_cross_entropy_fwd``)."""
    need_bias = needs[2]
    accumulate = _accumulate_dtype(hidden.dtype)
    if backend == "reference":
        params = _Params(ignore_index, label_smoothing, z_loss, softcap, 0.0)
        loss, per_token, grads = _forward_reference(
            hidden, weight, labels, bias, params, reduction, needs
        )
        outputs = (loss.to(accumulate), per_token.to(accumulate), *grads)
        return tuple(t.contiguous() for t in outputs)
    params = _Params(ignore_index, label_smoothing, z_loss, softcap, 0.0)
    rows_fn = _rows_triton if backend == "triton" else _rows_torch
    row_loss, kept, grad_scale, grad_hidden, grad_weight, grad_bias = _forward_chunked(
        hidden, weight, labels, bias, params, reduction, needs, rows_fn
    )
    # Row losses summed in float64: a fixed order, one rounding.
    loss = (row_loss.double().sum() * grad_scale).to(accumulate)
    per_token = row_loss.new_zeros(hidden.shape[0]).index_copy_(0, kept, row_loss)
    grad_bias = grad_bias.to(bias.dtype) if need_bias else grad_bias
    return loss, per_token, grad_hidden, grad_weight.to(weight.dtype), grad_bias


@_fused_linear_cross_entropy_fwd.register_fake
def _(
    hidden,
    weight,
    labels,
    bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    need_hidden,
    need_weight,
    need_bias,
    backend,
):
    accumulate = _accumulate_dtype(hidden.dtype)
    loss = hidden.new_empty((), dtype=accumulate)
    per_token = hidden.new_empty(hidden.shape[0], dtype=accumulate)
    grad_hidden = hidden.new_empty(hidden.shape if need_hidden else (0,))
    grad_weight = weight.new_empty(weight.shape if need_weight else (0,))
    grad_bias = hidden.new_empty(0) if not need_bias else bias.new_empty(bias.shape)
    return loss, per_token, grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    need_hidden, need_weight, need_bias = inputs[9:12]
    _, per_token, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(per_token, grad_hidden, grad_weight, grad_bias)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.needs = (need_hidden, need_weight, need_bias)


def _backward(ctx, grad_loss, *_):
    """The forward made the gradients of the loss; scale them by grad_output."""
    scaled = [
        grad * grad_loss.to(grad.dtype) if need else None
        for grad, need in zip(ctx.saved_tensors, ctx.needs)
    ]
    grad_hidden, grad_weight, grad_bias = scaled
    return (grad_hidden, grad_weight, None, grad_bias) + (None,) * 9


_fused_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- validation
def _check_number(name: str, value, low: float, high: float, closed_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    if not low <= value <= high or (not closed_high and value == high):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def _check_tensors(hidden, weight, labels, bias) -> None:
    check_float_tensor("hidden", hidden, "2-D [T, D]")
    check_float_tensor("weight", weight, "2-D [V, D]")
    check_index_tensor("labels", labels, "1-D [T]")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight is [V, {weight.shape[1]}] but hidden is [T, {hidden.shape[1]}] (D must match)"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but hidden has {hidden.shape[0]} rows"
        )
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        check_float_tensor("bias", bias, "1-D [V]")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows"
            )
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {listed}")


def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap, return_per_token):
    ignore_index = integer(ignore_index, "ignore_index")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_number("z_loss", z_loss, 0.0, math.inf, closed_high=False)
    if softcap is not None:
        softcap = _check_number("softcap", softcap, 0.0, math.inf, closed_high=False)
        if softcap == 0.0:
            raise ValueError("softcap must be > 0 (or None for no cap), got 0.0")
    if not isinstance(return_per_token, bool):
        raise TypeError(f"return_per_token must be a bool, got {type(return_per_token).__name__}")
    return ignore_index, label_smoothing, z_loss, softcap


# ----------------------------------------------------------------------------- public API
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
    backend: str = "auto",
):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, in row chunks.

    Per scored row ``t`` (``labels[t] != ignore_index``)::

        z   = hidden[t] @ weight.T + bias
        x   = softcap * tanh(z / softcap)            (softcap given; else x = z)
        lse = logsumexp(x)
        loss[t] = F.cross_entropy(x, labels[t], label_smoothing=eps) + z_loss * lse**2

    and the loss is their mean over scored rows ("mean"; 0 with no scored row,
    never NaN) or their sum ("sum"). No ``[T, V]`` tensor is ever made: see the
    module docstring for the chunking, precision and non-finite rules.

    Parameters
    ----------
    hidden : [T, D] float16, bfloat16, float32 (or float64 off triton), last dim contiguous.
    weight : [V, D], hidden's dtype and device (a tied embedding table works as is:
        its gradient adds to the embedding's).
    labels : int32/int64 [T]: a class in ``[0, V)`` or ``ignore_index``; anything
        else is a ValueError (checked in int64).
    bias : [V] or None, hidden's dtype.
    ignore_index : the label of unscored rows (MetaLM's IGNORE_INDEX, -100).
    reduction : "mean" or "sum".
    label_smoothing : in [0, 1], as ``F.cross_entropy`` defines it.
    z_loss : >= 0, weight of ``lse**2`` per scored row.
    softcap : > 0 or None: logits are capped to ``softcap * tanh(logits / softcap)`` first.
    return_per_token : also return the per-token losses.
    backend : {"auto", "triton", "cpu", "reference"}; "auto" is triton on CUDA and
        cpu on CPU tensors.

    Returns
    -------
    loss : 0-d float32 (float64 for float64 inputs), differentiable in ``hidden``,
        ``weight`` and ``bias`` (first order; the gradients are made by the forward).
    per_token : [T] float32 (float64 for float64), 0 at ignored rows, not
        differentiable; only with ``return_per_token``.

    Example
    -------
    >>> import torch
    >>> from metalm_fast import fused_linear_cross_entropy
    >>> hidden = torch.randn(6, 16, requires_grad=True)
    >>> weight = torch.randn(100, 16, requires_grad=True)
    >>> labels = torch.tensor([3, 7, -100, 0, 99, -100])
    >>> loss, per_token = fused_linear_cross_entropy(hidden, weight, labels,
    ...                                               return_per_token=True)
    >>> loss.backward()
    >>> per_token.shape, float(per_token[2]), hidden.grad[2].abs().max().item()
    (torch.Size([6]), 0.0, 0.0)
    >>> eager = torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
    >>> torch.allclose(loss, eager, atol=1e-5)
    True
    """
    _check_tensors(hidden, weight, labels, bias)
    ignore_index, label_smoothing, z_loss, softcap = _check_options(
        ignore_index, reduction, label_smoothing, z_loss, softcap, return_per_token
    )
    resolved = resolve_backend("fused_linear_cross_entropy", backend, hidden.device, _SUPPORTED)
    if resolved == "triton" and hidden.dtype == torch.float64:
        raise TypeError("the triton backend supports float16, bfloat16 and float32, got float64")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    loss, per_token, *_ = _fused_linear_cross_entropy_fwd(
        hidden,
        weight,
        labels,
        bias,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        *needs,
        resolved,
    )
    return (loss, per_token) if return_per_token else loss
