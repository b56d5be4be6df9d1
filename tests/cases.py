"""Mask and tensor builders shared by the attention tests."""

from __future__ import annotations

import torch

from metalm_fast import SpanMask

MASK_KINDS = ("causal", "bidirectional", "semi_causal", "prefix_lm", "sliding_window", "intervals")


def make_mask(kind: str, seqlens: list[int], seed: int = 0) -> SpanMask:
    """A mask of ``kind`` over packed sequences of ``seqlens`` (zeros allowed)."""
    generator = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + seqlens).cumsum(0)
    total = int(cu[-1])
    if kind == "causal":
        return SpanMask.causal(cu)
    if kind == "bidirectional":
        return SpanMask.bidirectional(cu)
    if kind == "sliding_window":
        return SpanMask.sliding_window(cu, 7)
    if kind == "prefix_lm":
        prefix = [int(torch.randint(0, n + 1, (1,), generator=generator)) for n in seqlens]
        return SpanMask.prefix_lm(cu, prefix)
    if kind == "semi_causal":
        starts, ends = [], []
        for begin, length in zip(cu[:-1].tolist(), seqlens):
            if length >= 3:  # one span in the middle third of each long-enough sequence
                starts.append(begin + length // 3)
                ends.append(begin + max(length // 3 + 1, 2 * length // 3))
        return SpanMask.semi_causal(cu, starts, ends)
    if kind == "intervals":
        # Arbitrary intervals, some empty, not monotone.
        start = torch.randint(0, max(total, 1), (total,), generator=generator)
        length = torch.randint(0, max(total, 1), (total,), generator=generator)
        end = torch.minimum(start + length, torch.tensor(total))
        empty = torch.rand(total, generator=generator) < 0.2
        end = torch.where(empty, start, end)
        return SpanMask.from_intervals(start, end, total)
    raise ValueError(kind)


def make_qkv(
    total: int, heads: int, kv_heads: int, head_dim: int, dtype, *, fused: bool, seed: int = 0
):
    """q [T, Hq, D], k and v [T, Hkv, D]; with ``fused`` they are slices of one tensor."""
    generator = torch.Generator().manual_seed(seed)
    if fused:
        qkv = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
        q = qkv[:, :heads]
        k = qkv[:, heads : heads + kv_heads]
        v = qkv[:, heads + kv_heads :]
        return q, k, v
    q = torch.randn(total, heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=generator).to(dtype)
    return q, k, v


# ----------------------------------------------------------------------------- non-finite golden
def clamp_intervals(kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int):
    """The kernels' reading of raw intervals: 0 <= start <= end <= Tk, in int64."""
    start = kv_start.to(torch.int64).clamp(0, num_keys)
    end = torch.maximum(kv_end.to(torch.int64).clamp(max=num_keys), start)
    return start, end


def per_row_attention(q, k, v, kv_start, kv_end, scale, grad_out, grad_lse):
    """Span attention row by row over each row's allowed keys only, with autograd.

    Computed in the dtype of q, k, v (float64 for the golden) with plain torch:
    for row t and head h, s = scale * k[a:b] q[t, h], m = max(s) (NaN if any is),
    p = exp(s - m), out = p v[a:b] / sum(p), lse = m + log(sum(p)): the float
    math of the contract, NaN and inf included. An empty row is exact 0 with
    lse -inf. Returns out [Tq, Hq, D], lse [Hq, Tq] and (dq, dk, dv) of
    sum(out * grad_out) + sum(lse * grad_lse) over non-empty rows.
    """
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    num_queries, heads, head_dim = q.shape
    group = heads // k.shape[1]
    start, end = clamp_intervals(kv_start, kv_end, k.shape[0])
    outs, lses = [], []
    loss = q.new_zeros(())
    for t in range(num_queries):
        a, b = int(start[t]), int(end[t])
        row_out, row_lse = [], []
        for h in range(heads):
            if a >= b:
                row_out.append(q.new_zeros(head_dim))
                row_lse.append(q.new_full((), float("-inf")))
                continue
            keys, values = k[a:b, h // group], v[a:b, h // group]
            scores = (keys @ q[t, h]) * scale
            shift = scores.max().detach()  # the result does not depend on it
            probs = torch.exp(scores - shift)
            total = probs.sum()
            out = (probs @ values) / total
            lse = shift + torch.log(total)
            loss = loss + (out * grad_out[t, h].to(out.dtype)).sum()
            loss = loss + lse * grad_lse[h, t].to(lse.dtype)
            row_out.append(out)
            row_lse.append(lse)
        outs.append(torch.stack(row_out))
        lses.append(torch.stack(row_lse))
    if loss.requires_grad:  # else every row is empty
        loss.backward()
    out = torch.stack(outs).detach() if outs else q.new_zeros(q.shape).detach()
    lse = torch.stack(lses, dim=1).detach() if lses else q.new_zeros(heads, 0).detach()
    grads = tuple(x.grad if x.grad is not None else torch.zeros_like(x) for x in (q, k, v))
    return out, lse, grads


def assert_matches_golden(actual, golden, baseline, name: str, baseline_factor=2.0) -> None:
    """Same NaN positions exactly; elsewhere the tolerance rule (infinities must match)."""
    from tests.tolerance import assert_within_tolerance

    actual = actual.detach().cpu()
    nan = torch.isnan(golden)
    assert torch.equal(torch.isnan(actual), nan), (
        f"{name}: NaN at {torch.isnan(actual).sum()} positions, golden at {nan.sum()} "
        f"(first difference at {(torch.isnan(actual) != nan).nonzero()[:3].tolist()})"
    )

    def finite_part(x):
        return torch.where(nan, torch.zeros((), dtype=x.dtype), x.detach().cpu())

    assert_within_tolerance(
        finite_part(actual),
        finite_part(golden),
        finite_part(baseline),
        name,
        baseline_factor=baseline_factor,
    )
