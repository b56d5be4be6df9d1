"""span_attention through the public API: numerics per backend, autograd, errors, torch.library.

Kernel-level suites live beside the kernels' own tests (tests/kernels for
Triton under the interpreter, tests/ops/test_span_attention_cpu_ext.py for
csrc/cpu); this file checks what a user sees: the custom op, autograd through
out *and* lse, backend selection and every validation error.
"""

import math

import pytest
import torch

from metalm_fast import SpanMask, reference, span_attention
from metalm_fast.ops._backend import unavailable_reason
from tests.cases import MASK_KINDS, make_mask, make_qkv
from tests.tolerance import assert_within_tolerance

BACKENDS = ["reference", "cpu", "triton"]


def _require(backend: str) -> None:
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")


def _forward_backward(fn, q, k, v, grad_out, grad_lse):
    """Run ``fn`` -> (out, lse), backprop grad_out into out and grad_lse into finite lse."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    loss = (out.double() * grad_out.double()).sum()
    loss = loss + (torch.where(finite, lse.double(), 0.0) * grad_lse.double()).sum()
    loss.backward()
    return out, lse, [x.grad for x in leaves]


def _check_against_golden(backend, mask, q, k, v, seed=0):
    generator = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(q.shape, generator=generator)
    grad_lse = torch.randn(q.shape[1], q.shape[0], generator=generator)

    def kernel(q_, k_, v_):
        return span_attention(q_, k_, v_, mask, return_lse=True, backend=backend)

    def oracle(q_, k_, v_):
        return reference.span_attention(q_, k_, v_, mask)

    out, lse, grads = _forward_backward(kernel, q, k, v, grad_out, grad_lse)
    as64 = [x.double() for x in (q, k, v)]
    gold_out, gold_lse, gold_grads = _forward_backward(oracle, *as64, grad_out, grad_lse)
    base_out, base_lse, base_grads = _forward_backward(oracle, q, k, v, grad_out, grad_lse)
    assert out.dtype == q.dtype
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_within_tolerance(out, gold_out, base_out, "out")
    assert_within_tolerance(lse, gold_lse, base_lse.float(), "lse")
    for name, grad, gold, base in zip(("dq", "dk", "dv"), grads, gold_grads, base_grads):
        assert grad.dtype == q.dtype
        assert_within_tolerance(grad, gold, base, name)
    empty = mask.kv_end <= mask.kv_start
    assert torch.all(out[empty] == 0), "empty-interval rows must be exactly 0"
    assert torch.all(lse[:, empty] == -math.inf)
    assert torch.all(grads[0][empty] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_mask_kind_fp32_gqa(backend, kind):
    _require(backend)
    mask = make_mask(kind, [37, 0, 60], seed=3)
    q, k, v = make_qkv(mask.num_queries, 4, 2, 32, torch.float32, fused=False)
    _check_against_golden(backend, mask, q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_fused_qkv(backend, dtype):
    _require(backend)
    mask = make_mask("semi_causal", [97, 2], seed=1)
    q, k, v = make_qkv(mask.num_queries, 2, 1, 80, dtype, fused=True)
    assert not q.is_contiguous()
    _check_against_golden(backend, mask, q, k, v)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64(backend):
    """In float64 the baseline *is* the golden, so the tolerance rule degenerates to
    ~2 ulp; float64 is held to torch.testing's float64 tolerances instead."""
    _require(backend)
    mask = make_mask("intervals", [50], seed=5)
    q, k, v = make_qkv(50, 2, 2, 64, torch.float64, fused=False)
    grad_out, grad_lse = torch.randn(q.shape, dtype=torch.float64), torch.randn(2, 50)

    def kernel(q_, k_, v_):
        return span_attention(q_, k_, v_, mask, return_lse=True, backend=backend)

    def oracle(q_, k_, v_):
        return reference.span_attention(q_, k_, v_, mask)

    results = _forward_backward(kernel, q, k, v, grad_out, grad_lse)
    golden = _forward_backward(oracle, q, k, v, grad_out, grad_lse)
    torch.testing.assert_close(results[0], golden[0])
    torch.testing.assert_close(results[1], golden[1])
    for grad, gold in zip(results[2], golden[2]):
        torch.testing.assert_close(grad, gold)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_bit_identical_on_repeat(backend):
    _require(backend)
    mask = make_mask("semi_causal", [113, 20], seed=2)
    q, k, v = make_qkv(mask.num_queries, 4, 2, 64, torch.float32, fused=True)
    grad_out = torch.randn(q.shape)

    def grads():
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        (span_attention(*leaves, mask, backend=backend) * grad_out).sum().backward()
        return [x.grad for x in leaves]

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_all_queries_empty_gives_zeros_and_no_nan():
    mask = SpanMask.from_intervals([3, 0, 5], [3, 0, 5], num_keys=6)
    q = torch.randn(3, 2, 16, requires_grad=True)
    k = torch.randn(6, 2, 16, requires_grad=True)
    v = torch.randn(6, 2, 16, requires_grad=True)
    out, lse = span_attention(q, k, v, mask, return_lse=True, backend="reference")
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_tq_differs_from_tk(backend):
    """Latent queries over a longer key sequence (the resampler's case), GQA."""
    _require(backend)
    mask = SpanMask.from_intervals([0, 0, 4, 9], [4, 9, 9, 9], num_keys=9)
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(4, 4, 32, generator=generator)
    k, v = torch.randn(9, 1, 32, generator=generator), torch.randn(9, 1, 32, generator=generator)
    _check_against_golden(backend, mask, q, k, v)


# ----------------------------------------------------------------------------- errors
def _inputs():
    mask = SpanMask.causal(torch.tensor([0, 6]))
    return torch.randn(6, 4, 32), torch.randn(6, 2, 32), torch.randn(6, 2, 32), mask


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), ValueError, "q must be 3-D"),
        (lambda q, k, v, m: (q, k[None], v, m), ValueError, "k must be 3-D"),
        (lambda q, k, v, m: (q.long(), k, v, m), TypeError, "q must be float16"),
        (lambda q, k, v, m: (q, k.half(), v, m), TypeError, "same dtype"),
        (lambda q, k, v, m: (q, k, v[..., :16], m), ValueError, "k and v must have the same shape"),
        (lambda q, k, v, m: (q[..., :16], k, v, m), ValueError, "same head dim"),
        (lambda q, k, v, m: (q[:, :3], k, v, m), ValueError, "multiple of key/value heads"),
        (
            lambda q, k, v, m: (
                q[..., :12].contiguous(),
                k[..., :12].contiguous(),
                v[..., :12].contiguous(),
                m,
            ),
            ValueError,
            "head dim 12",
        ),
        (
            lambda q, k, v, m: (q.transpose(0, 2).contiguous().transpose(0, 2), k, v, m),
            ValueError,
            "q must be contiguous in its last dim",
        ),
        (
            lambda q, k, v, m: (q, k, v, SpanMask.causal(torch.tensor([0, 5]))),
            ValueError,
            "mask has 5 queries",
        ),
        (lambda q, k, v, m: (q, k, v, m.kv_start), TypeError, "mask must be a SpanMask"),
        (lambda q, k, v, m: ([1.0], k, v, m), TypeError, "q must be a torch.Tensor"),
        (
            lambda q, k, v, m: (q, k, v, SpanMask.from_intervals(m.kv_start, m.kv_end, 7)),
            ValueError,
            "mask.num_keys",
        ),
        (lambda q, k, v, m: (q, k.to("meta"), v, m), ValueError, "one device"),
    ],
)
def test_validation_errors_name_the_argument(mutate, error, match):
    q, k, v, mask = mutate(*_inputs())
    with pytest.raises(error, match=match):
        span_attention(q, k, v, mask, backend="reference")


def test_mask_device_mismatch():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="mask is on"):
        span_attention(q.to("meta"), k.to("meta"), v.to("meta"), mask, backend="reference")


@pytest.mark.parametrize(
    "backend, match",
    [("cuda", "has no 'cuda' backend"), ("tpu", "backend must be one of")],
)
def test_backend_errors(backend, match):
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=match):
        span_attention(q, k, v, mask, backend=backend)


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        span_attention(q, k, v, mask, backend="triton")


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("METALM_FAST_BACKEND", "reference")
    q, k, v, mask = _inputs()
    out = span_attention(q, k, v, mask)
    assert torch.equal(out, span_attention(q, k, v, mask, backend="reference"))


def test_bad_scale():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="scale must be a finite float"):
        span_attention(q, k, v, mask, scale=float("nan"), backend="reference")


# ----------------------------------------------------------------------------- torch.library
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    _require(backend)
    mask = make_mask("semi_causal", [9, 12])
    q, k, v = make_qkv(mask.num_queries, 2, 1, 16, torch.float32, fused=False)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    args = (q, k, v, mask.kv_start, mask.kv_end, 0.25, mask.monotone, backend)
    torch.library.opcheck(torch.ops.metalm.span_attention_fwd.default, args)
