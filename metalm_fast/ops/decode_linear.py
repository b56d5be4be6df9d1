"""decode_linear: ``y = x @ weight.T + bias`` for the few rows of a decode step.

In a decode step every linear layer multiplies a handful of rows (the decode
batch, M = 1..32) by its weight, so the work is reading the weight once: 2 * M
FLOPs per weight element. torch's ``F.linear`` (MKL sgemm on the AMD CPUs
this was measured on) streams the weight well below memory speed for so few
rows, slower still when the KV cache streamed through the caches since the last
step, which is the real case (figures: benchmarks/results). The ``cpu`` kernel
(csrc/cpu/decode_linear.cpp) reads the nn.Linear weight in place, row block by
row block with software prefetch, and keeps the FMA units busy with register
tiles of dot products.

Layers: the ``metalm::decode_linear`` custom op with a fake implementation
(``torch.compile`` traces it) and the public function, which validates on the
host and dispatches by row count, dtype, device and autograd (:func:`uses_kernel`,
the one home of that rule).
Eager calls go straight to the compiled op: the custom op's Python wrapper
costs microseconds, a noticeable share of a small layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metalm_fast.ops._backend import compiled_op

__all__ = [
    "DECODE_ROWS",
    "decode_linear",
    "input_uses_kernel",
    "kernel_available",
    "uses_kernel",
    "weight_uses_kernel",
]

# The kernel runs for at most this many rows: a decode batch. Above it the work is
# a real GEMM and MKL's packed sgemm is the faster kernel (prefill, training).
DECODE_ROWS = 32

_CPU_OP = "_decode_linear_cpu"
_FP32 = torch.float32
_cpu_kernel = None  # torch.ops.metalm._decode_linear_cpu.default once registered (it stays)


def kernel_available() -> bool:
    """True when ``metalm_fast._C`` holds the cpu kernel."""
    global _cpu_kernel
    if _cpu_kernel is None:
        _cpu_kernel = compiled_op(_CPU_OP)
    return _cpu_kernel is not None


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("metalm::decode_linear", mutates_args=())
def _decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y [M, N] fp32, contiguous, from x [M, K], weight [N, K], bias [N] or None."""
    return torch.ops.metalm._decode_linear_cpu(x, weight, bias)


@_decode_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


# ----------------------------------------------------------------------------- validation
# Both run on every call of a decode step's layers: plain attribute tests, no
# generators or device objects (a few microseconds would be a tenth of a small layer).
def _check_inputs(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must be [..., K] with K = weight.shape[1] = {weight.shape[1]}, "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"bias must be [N] with N = weight.shape[0] = {weight.shape[0]}, "
            f"got shape {tuple(bias.shape)}"
        )
    for name, tensor in (("x", x), ("bias", bias)):
        if tensor is None:
            continue
        # Under autocast F.linear casts its operands itself, so x (say bf16 from the
        # previous autocast op) may differ from an fp32 weight, as nn.Linear allows.
        # The autocast query runs only on a mismatch: a decode step never pays for it.
        mismatched = tensor.dtype != weight.dtype
        if tensor.device != weight.device or (
            mismatched and not torch.is_autocast_enabled(weight.device.type)
        ):
            raise TypeError(
                f"{name} must have weight's dtype and device ({weight.dtype} on "
                f"{weight.device}), got {tensor.dtype} on {tensor.device}"
            )


# The dispatch rule of decode_linear (its Notes), in two halves: the fused decode
# step (metalm_fast.nn.fused_decode) asks the input half once for the rows every
# projection of a block sees and the weight half once per projection.
def input_uses_kernel(x: torch.Tensor) -> bool:
    """The input half of :func:`uses_kernel`: x float32 on the CPU with at most
    ``DECODE_ROWS`` rows, no gradient needed for x, CPU autocast off, and the kernel
    built. Only x's dtype, device, row count and ``requires_grad`` are read, so any
    tensor with those of a projection's input gives that input's answer."""
    if not (x.dtype == _FP32 and x.is_cpu):
        return False
    if x.numel() > DECODE_ROWS * x.shape[-1]:  # more than DECODE_ROWS rows
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu"):  # nn.Linear's semantics: F.linear in the autocast dtype
        return False
    return kernel_available()


def weight_uses_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The parameter half of :func:`uses_kernel`: weight (last dim contiguous) and bias
    float32 on the CPU, no gradient needed for either."""
    if not (weight.dtype == _FP32 and weight.is_cpu):
        return False
    if bias is not None and not (bias.dtype == _FP32 and bias.is_cpu):
        return False
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        return False
    if torch.is_grad_enabled() and (
        weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    return True


def uses_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`decode_linear` runs the cpu kernel for these arguments (else
    ``F.linear``): the rule of its Notes, and the only place it is written."""
    return weight_uses_kernel(weight, bias) and input_uses_kernel(x)


# ----------------------------------------------------------------------------- public API
def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ weight.T + bias``, fast for the few rows of a decode step on CPU.

    Parameters
    ----------
    x : [..., K]; leading dims are flattened into M rows.
    weight : [N, K], an ``nn.Linear`` weight, read in place (never packed or
        copied); rows may be strided, the last dim must be contiguous for the
        kernel.
    bias : [N] or None.

    Returns
    -------
    y : [..., N] in x's dtype, contiguous.

    Notes
    -----
    Dispatch, by the arguments alone (as FlashAttention picks kernels by shape;
    :func:`uses_kernel` answers it for a call):
    the cpu kernel runs when x has at most ``DECODE_ROWS`` (32) rows, x, weight
    and bias are float32 CPU tensors, the
    weight's last dim is contiguous, no gradient is needed (``torch.is_grad_enabled()``
    is False or none of them requires grad), CPU autocast is off and
    ``metalm_fast._C`` holds the kernel; everything else is
    :func:`torch.nn.functional.linear`, which is exact there and the faster
    kernel for many rows (prefill, training, other dtypes and devices,
    autograd, autocast). The kernel accumulates in fp32;
    it differs from ``F.linear`` only by rounding.

    Example
    -------
    >>> import torch
    >>> from metalm_fast.ops.decode_linear import decode_linear
    >>> layer = torch.nn.Linear(256, 768)
    >>> x = torch.randn(8, 256)
    >>> with torch.no_grad():
    ...     y = decode_linear(x, layer.weight, layer.bias)
    >>> y.shape
    torch.Size([8, 768])
    """
    _check_inputs(x, weight, bias)
    if not uses_kernel(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    if torch.compiler.is_compiling():
        y = _decode_linear(rows, weight, bias)
    else:
        y = _cpu_kernel(rows, weight, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
