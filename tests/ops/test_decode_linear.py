"""decode_linear against F.linear in float64 (the tolerance rule, baseline F.linear
in float32), over odd shapes, strided rows, leading dims, bad inputs and its dispatch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metalm_fast.ops._backend import compiled_op_available
from metalm_fast.ops.decode_linear import (
    DECODE_ROWS,
    _decode_linear,
    decode_linear,
    input_uses_kernel,
    kernel_available,
    uses_kernel,
    weight_uses_kernel,
)
from tests.tolerance import assert_within_tolerance

CPU_OP = "_decode_linear_cpu"
DECODER_SHAPES = [(768, 256), (256, 256), (1024, 256), (256, 1024), (8192, 256)]  # (N, K)


def require_kernel() -> None:
    """Skip unless the built metalm_fast._C (or a dev build) registered the kernel."""
    if not compiled_op_available(CPU_OP):
        pytest.skip(f"metalm_fast._C has no {CPU_OP}: rebuild it (pip install -e .)")


def _inputs(m: int, n: int, k: int, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    weight = torch.randn(n, k, generator=generator) / k**0.5
    return x, weight, torch.randn(n, generator=generator) if bias else None


def _check(x, weight, bias) -> torch.Tensor:
    """The kernel (any row count) against float64 F.linear, and decode_linear under no_grad
    equal to the kernel up to DECODE_ROWS rows, to F.linear above."""
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()
    kernel = getattr(torch.ops.metalm, CPU_OP)(rows, weight, bias)
    kernel = kernel.view(*x.shape[:-1], weight.shape[0])
    golden = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    baseline = F.linear(x, weight, bias)
    assert kernel.dtype == torch.float32 and kernel.is_contiguous()
    assert_within_tolerance(kernel, golden, baseline, "y")
    with torch.no_grad():
        out = decode_linear(x, weight, bias)
    expected = kernel if rows.shape[0] <= DECODE_ROWS else baseline
    assert torch.equal(out, expected), "decode_linear did not dispatch by its rule"
    return out


@pytest.mark.parametrize("m", [0, 1, 3, 8, 17, 32, 33])
@pytest.mark.parametrize("n", [1, 5, 257])
@pytest.mark.parametrize("k", [1, 7, 33, 255, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_odd_shapes(m, n, k, bias):
    """Rows around the 4-row x tiles, N around the 4-row weight blocks, K around 16-float
    chunks (a tail of 1..15 floats, or K below one chunk)."""
    require_kernel()
    _check(*_inputs(m, n, k, bias, seed=m * 1000 + n * 10 + k))


@pytest.mark.parametrize("n, k", DECODER_SHAPES)
@pytest.mark.parametrize("m", [8, 32])
def test_decoder_shapes(n, k, m):
    """The small preset decoder's layers: qkv, out, MLP up and down, LM head."""
    require_kernel()
    _check(*_inputs(m, n, k, bias=True, seed=n + k + m))


def test_empty_k_gives_the_bias():
    require_kernel()
    x, weight, bias = _inputs(3, 5, 0, bias=True)
    out = _check(x, weight, bias)
    assert torch.equal(out, bias.expand(3, 5))


def test_strided_rows():
    """x sliced out of a wider activation (row stride K + 9), every other row of a batch,
    and weight rows sliced out of a fused [N, K + 3] buffer: read in place."""
    require_kernel()
    generator = torch.Generator().manual_seed(7)
    wide = torch.randn(17, 264, generator=generator)
    fused_weight = torch.randn(257, 258, generator=generator)
    bias = torch.randn(257, generator=generator)
    _check(wide[:, :255], fused_weight[:, :255], bias)
    _check(wide[::2, :255], fused_weight[:, 3:], bias)
    assert wide[::2, :255].stride(0) == 2 * 264


def test_non_contiguous_last_dim():
    """x transposed (last-dim stride > 1) is copied to rows first; the result is the same."""
    require_kernel()
    x_t = torch.randn(33, 6, generator=torch.Generator().manual_seed(3))
    weight = torch.randn(5, 33)
    _check(x_t.t(), weight, None)


def test_leading_dims():
    """x [2, 3, K] -> y [2, 3, N]."""
    require_kernel()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 255, generator=generator)
    weight = torch.randn(257, 255, generator=generator)
    bias = torch.randn(257, generator=generator)
    out = _check(x, weight, bias)
    assert out.shape == (2, 3, 257)


def test_threads_do_not_change_the_result():
    """The LM head at M = 32 is split over threads; each output's sum does not depend on it."""
    require_kernel()
    x, weight, bias = _inputs(32, 8192, 256, bias=True, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = decode_linear(x, weight, bias)
        torch.set_num_threads(max(2, threads))
        parallel = decode_linear(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, parallel)


def test_linear_module_under_inference():
    """nn.Linear's parameters require grad; under inference_mode/no_grad the kernel runs."""
    require_kernel()
    layer = torch.nn.Linear(256, 768)
    x = torch.randn(8, 256)
    with torch.inference_mode():
        out = decode_linear(x, layer.weight, layer.bias)
        kernel = getattr(torch.ops.metalm, CPU_OP)(x, layer.weight, layer.bias)
        assert torch.equal(out, kernel)
        assert_within_tolerance(
            out,
            F.linear(x.double(), layer.weight.double(), layer.bias.double()),
            F.linear(x, layer.weight, layer.bias),
            "y",
        )


def test_fake_implementation():
    """The custom op's fake implementation matches the kernel (torch.compile traces it)."""
    require_kernel()
    x, weight, bias = _inputs(3, 5, 7, bias=True)
    torch.library.opcheck(_decode_linear, (x, weight, bias))
    torch.library.opcheck(_decode_linear, (x, weight, None))


# ----------------------------------------------------------------------------- dispatch
def test_autograd_uses_f_linear():
    """With grad enabled and a tensor requiring grad, decode_linear is F.linear: the
    same values, bit for bit, and the same gradients."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(8, 33, generator=generator, requires_grad=True)
    weight = torch.randn(5, 33, generator=generator, requires_grad=True)
    bias = torch.randn(5, generator=generator, requires_grad=True)
    out = decode_linear(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert out.requires_grad and torch.equal(out, expected)
    grad_out = torch.randn(8, 5, generator=generator)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), grad_out)
    for name, grad, expected_grad in zip(("x", "weight", "bias"), grads, expected_grads):
        assert torch.equal(grad, expected_grad), f"grad of {name} differs from F.linear's"


def test_cpu_autocast_uses_f_linear():
    """Under CPU autocast decode_linear is nn.Linear's F.linear, in the autocast dtype."""
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(4, 40, generator=generator)
    weight = torch.randn(7, 40, generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = decode_linear(x, weight), F.linear(x, weight)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_use_f_linear(dtype):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 40, generator=generator).to(dtype)
    weight = torch.randn(7, 40, generator=generator).to(dtype)
    bias = torch.randn(7, generator=generator).to(dtype)
    assert torch.equal(decode_linear(x, weight, bias), F.linear(x, weight, bias))


def test_mixed_dtypes_raise_naming_the_argument():
    """A float64 bias (or x) with a float32 weight: a TypeError that names it (F.linear
    would raise about 'mat1 and mat2' instead)."""
    x, weight, _ = _inputs(2, 3, 4, bias=False)
    with pytest.raises(
        TypeError,
        match=r"^bias must have weight's dtype and device \(torch"
        r"\.float32 on cpu\), got torch\.float64 on cpu",
    ):
        decode_linear(x, weight, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="^x must have weight's dtype"):
        decode_linear(x.double(), weight)


def test_autocast_accepts_a_bf16_input_for_an_fp32_weight_as_nn_linear_does():
    """Under CPU autocast the previous op hands a bf16 x to an fp32 layer: the answer is
    exactly autocast's F.linear (bf16), non-finite entries included; outside autocast
    the same call is the TypeError above."""
    x, weight, bias = _inputs(4, 6, 5, bias=True)
    x = x.bfloat16()
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = decode_linear(x, weight, bias), F.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite])
    assert out[1].isnan().all() and out[0].isfinite().all()
    with pytest.raises(TypeError, match="^x must have weight's dtype"):
        decode_linear(x, weight, bias)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "x_shape, weight_shape, bias_shape, match",
    [
        ((3, 7), (5, 8), None, r"^x must be \[\.\.\., K\] with K = weight.shape\[1\] = 8"),
        ((7,), (5, 7, 1), None, r"^weight must be 2-D \[N, K\]"),
        ((3, 7), (5,), None, r"^weight must be 2-D \[N, K\]"),
        ((3, 7), (5, 7), (4,), r"^bias must be \[N\] with N = weight.shape\[0\] = 5"),
        ((3, 7), (5, 7), (1, 5), r"^bias must be \[N\]"),
        ((), (5, 7), None, r"^x must be \[\.\.\., K\]"),
    ],
)
def test_bad_shapes_raise_value_errors(x_shape, weight_shape, bias_shape, match):
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=match):
        decode_linear(torch.zeros(x_shape), torch.zeros(weight_shape), bias)


def test_non_tensors_raise_type_errors():
    with pytest.raises(TypeError, match="^weight must be a torch.Tensor"):
        decode_linear(torch.zeros(2, 3), [[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="^bias must be a torch.Tensor or None"):
        decode_linear(torch.zeros(2, 3), torch.zeros(4, 3), 0.0)


@pytest.mark.parametrize(
    "x, weight, bias, match",
    [
        (torch.zeros(2, 3, 4), torch.zeros(5, 4), None, r"x must be 2-D \[M, K\]"),
        (torch.zeros(2, 4), torch.zeros(5), None, r"weight must be 2-D \[N, K\]"),
        (torch.zeros(2, 4), torch.zeros(5, 3), None, r"x.size\(1\) \(4\) must equal weight"),
        (torch.zeros(2, 4).double(), torch.zeros(5, 4), None, "x and weight must be float32"),
        (torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(4), r"bias must be \[N\] = \[5\]"),
        (torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(5).double(), "bias must be a float32"),
        (torch.zeros(4, 2).t(), torch.zeros(5, 4), None, "x needs a contiguous last dim"),
        (torch.zeros(2, 4), torch.zeros(4, 5).t(), None, "weight needs a contiguous last dim"),
    ],
)
def test_kernel_checks_name_the_argument(x, weight, bias, match):
    require_kernel()
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.metalm, CPU_OP)(x, weight, bias)


def test_uses_kernel_is_its_two_halves():
    """The fused decode step asks the rule in halves; together they are the whole rule."""
    generator = torch.Generator().manual_seed(10)
    weight = torch.randn(6, 16, generator=generator)
    cases = [
        (torch.randn(4, 16, generator=generator), weight, None),
        (torch.randn(40, 16, generator=generator), weight, torch.zeros(6)),
        (torch.randn(4, 16, generator=generator).double(), weight.double(), None),
        (torch.randn(4, 16, generator=generator), torch.randn(16, 6).t(), None),
        (torch.randn(4, 16, generator=generator, requires_grad=True), weight, None),
        (torch.randn(4, 16, generator=generator), weight.requires_grad_(True), None),
    ]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for x, w, b in cases:
                assert uses_kernel(x, w, b) == (weight_uses_kernel(w, b) and input_uses_kernel(x))
    with torch.no_grad():
        assert uses_kernel(*cases[0]) == kernel_available()
        assert not uses_kernel(*cases[1]) and not uses_kernel(*cases[3])
