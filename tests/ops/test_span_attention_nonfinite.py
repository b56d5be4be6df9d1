"""span_attention with NaN and inf inputs and with raw intervals, against a per-row golden.

The contract (docs/ARCHITECTURE.md, "Bad input and non-finite values"): the
result is the float math of attention restricted to each row's allowed keys.
A NaN or inf in q, k or v reaches exactly the rows whose allowed keys include
it, masked-out keys never reach a row, and empty rows stay exact 0 with lse
-inf, forward and backward, on every backend. Raw intervals are read clamped
to [0, Tk], in 64 bits. The golden (tests/cases.per_row_attention) computes
each row over its allowed keys only, in float64; NaN positions must match
exactly and finite ones meet the tolerance rule.
"""

from __future__ import annotations

import math

import pytest
import torch

import metalm_fast.ops.span_attention  # noqa: F401  (registers torch.ops.metalm.span_attention_fwd)
from metalm_fast.ops._backend import unavailable_reason
from tests.cases import assert_matches_golden, clamp_intervals, per_row_attention

# NaN and inf arithmetic is the point here; numpy (the Triton interpreter) warns on it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["cpu", "triton", "reference"]
HEADS, KV_HEADS, HEAD_DIM = 2, 1, 32


def _require(backend: str) -> None:
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")


def run_op(backend, q, k, v, kv_start, kv_end, monotone, grad_out, grad_lse):
    """out, lse and (dq, dk, dv) through the op layer (autograd), raw intervals as given."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = torch.ops.metalm.span_attention_fwd(
        *leaves, kv_start, kv_end, scale, monotone, backend
    )
    kept = torch.where(lse == -math.inf, 0.0, lse.double())
    loss = (out.double() * grad_out.double()).sum() + (kept * grad_lse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), [x.grad for x in leaves]


def check_against_per_row_golden(
    backend, q, k, v, kv_start, kv_end, monotone=False, seed=0, baseline_factor=2.0
):
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(q.shape, generator=generator)
    grad_lse = torch.randn(q.shape[1], q.shape[0], generator=generator)
    out, lse, grads = run_op(backend, q, k, v, kv_start, kv_end, monotone, grad_out, grad_lse)
    scale = 1.0 / math.sqrt(q.shape[-1])
    as64 = [x.double() for x in (q, k, v)]
    gold = per_row_attention(*as64, kv_start, kv_end, scale, grad_out, grad_lse)
    # The baseline of the tolerance rule is the repo's reference in the test dtype
    # (dense, through the op layer, the same raw intervals).
    base_out, base_lse, base_grads = run_op(
        "reference", q, k, v, kv_start, kv_end, monotone, grad_out, grad_lse
    )
    base = (base_out, base_lse, base_grads)
    assert_matches_golden(out, gold[0], base[0], "out", baseline_factor)
    assert_matches_golden(lse, gold[1], base[1], "lse", baseline_factor)
    for name, grad, golden, baseline in zip(("dq", "dk", "dv"), grads, gold[2], base[2]):
        assert_matches_golden(grad, golden, baseline, name, baseline_factor)
    start, end = clamp_intervals(kv_start, kv_end, k.shape[0])
    empty = end <= start
    assert torch.all(out[empty] == 0), "empty rows must be exactly 0"
    assert torch.all(lse[:, empty] == -math.inf), "empty rows must have lse -inf"
    assert torch.all(grads[0][empty] == 0), "empty rows must get zero dq"
    return out, lse, grads


def packed_intervals():
    """Three packed documents over 40 tokens, with empty rows and unattended keys.

    Rows 0-11: causal. Rows 12-29: semi-causal, a bidirectional span [16, 20).
    Rows 30-39: bidirectional over [30, 38) except rows 35 and 36 (empty), so
    keys 38 and 39 are attended by no row.
    """
    start, end = [], []
    for t in range(12):
        start.append(0)
        end.append(t + 1)
    for t in range(12, 30):
        start.append(12)
        end.append(20 if 16 <= t < 20 else t + 1)
    for t in range(30, 40):
        start.append(30)
        end.append(30 if t in (35, 36) else 38)
    return torch.tensor(start, dtype=torch.int32), torch.tensor(end, dtype=torch.int32)


def _qkv(total, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(total, HEADS, HEAD_DIM, generator=generator)
    k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator)
    v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator)
    return q, k, v


# (tensor, attended position, masked position): q at row 14 and at row 35 (empty);
# k and v at key 13 (attended by rows 13-29 only) and at keys 38 / 39 (by no row).
PLACEMENTS = {
    "q": ((14, 0, 3), (35, 1, 5)),
    "k": ((13, 0, 3), (38, 0, 7)),
    "v": ((13, 0, 3), (39, 0, 7)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_non_finite_reaches_only_rows_that_attend_it(backend, tensor, value):
    _require(backend)
    kv_start, kv_end = packed_intervals()
    q, k, v = _qkv(40, seed=1)
    target = {"q": q, "k": k, "v": v}[tensor]
    for position in PLACEMENTS[tensor]:
        target[position] = value
    out, _, grads = check_against_per_row_golden(backend, q, k, v, kv_start, kv_end)
    # The contract made concrete: the other documents stay finite, forward and backward.
    untouched = list(range(0, 12)) + list(range(30, 40))
    assert torch.isfinite(out[untouched]).all()
    assert torch.isfinite(grads[0][untouched]).all()
    assert torch.isfinite(grads[1][untouched]).all() and torch.isfinite(grads[2][untouched]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_key_is_not_an_empty_row(backend):
    # The old cpu behaviour: a row attending a NaN key came out 0 with lse -inf.
    _require(backend)
    kv_start, kv_end = packed_intervals()
    q, k, v = _qkv(40, seed=2)
    k[0, 0, 0] = math.nan  # attended by every row of the first document
    out, lse, _ = check_against_per_row_golden(backend, q, k, v, kv_start, kv_end)
    assert torch.isnan(out[:12]).all() and torch.isnan(lse[:, :12]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_intervals_are_clamped_in_64_bits(backend):
    # Out of range, start > end, 2**32 + 3 (3 if narrowed to int32), non-monotone
    # rows flagged monotone: read as clamped to [0, Tk], never out of bounds.
    _require(backend)
    q, k, v = _qkv(12, seed=3)
    kv_start = torch.tensor([-5, 0, 2, 9, 4, 2**32, 0, 3, -(2**33), 6, 1, 0], dtype=torch.int64)
    kv_end = torch.tensor([3, 2**32 + 3, 50, 4, 4, 2**32 + 1, 1, 12, 5, 12, 2, -1])
    out, _, _ = check_against_per_row_golden(backend, q, k, v, kv_start, kv_end, monotone=True)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_at_all_gives_empty_rows(backend):
    # Tk = 0 (the model tests reach it through empty encoder batches): every row is
    # empty; the reference's row max once failed on the empty reduction.
    _require(backend)
    q = torch.randn(5, HEADS, HEAD_DIM)
    k = v = torch.randn(0, KV_HEADS, HEAD_DIM)
    zeros = torch.zeros(5, dtype=torch.int32)
    out, lse, _ = check_against_per_row_golden(backend, q, k, v, zeros, zeros + 3)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())
