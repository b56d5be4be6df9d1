"""pytest-benchmark cases for CPU span attention: the cpu backend against its peers.

Run with ``python -m pytest benchmarks/test_bench_span_attention.py`` (add
``--benchmark-only``; ``--benchmark-group-by=param:case`` puts each case's
implementations side by side). Sizes are small (T=1024, documents of 256) so
the file runs in about a minute plus FlexAttention's compile; the full-size
comparison with the acceptance criteria is benchmarks/bench_span_attention.py.
Skipped cleanly without pytest-benchmark or without the compiled extension.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.common import (  # noqa: E402
    PracticalLimit,
    flex_mask_mod,
    fwd_bwd,
    make_cases,
    make_qkv,
    to_bhtd,
)
from metalm_fast import span_attention  # noqa: E402
from metalm_fast.ops._backend import unavailable_reason  # noqa: E402

TOTAL, DOC_LEN, HEADS, HEAD_DIM = 1024, 256, 8, 64
CASES = ("encoder", "decoder", "semi_causal")

_reason = unavailable_reason("cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"cpu backend unavailable: {_reason}")


@functools.cache
def _case(name: str):
    return {case.name: case for case in make_cases(TOTAL, DOC_LEN)}[name]


@functools.cache
def _flex(name: str):
    """Compiled flex_attention and its block mask for one case (compiled once per case)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = _case(name).mask
    block_mask = create_block_mask(flex_mask_mod(mask), None, None, TOTAL, TOTAL, device="cpu")
    torch._dynamo.reset()
    return torch.compile(flex_attention, dynamic=False), block_mask


def _inputs():
    return make_qkv(TOTAL, HEADS, HEAD_DIM)


@pytest.mark.parametrize("case", CASES)
def test_forward_cpu(benchmark, case):
    mask = _case(case).mask
    q, k, v = _inputs()
    with torch.no_grad():
        benchmark(span_attention, q, k, v, mask, backend="cpu")


@pytest.mark.parametrize("case", CASES)
def test_forward_sdpa_dense(benchmark, case):
    mask = _case(case).mask
    q, k, v = (to_bhtd(x) for x in _inputs())
    dense = mask.to_dense()[None, None]
    with torch.no_grad():
        benchmark(torch.nn.functional.scaled_dot_product_attention, q, k, v, attn_mask=dense)


@pytest.mark.parametrize("case", CASES)
def test_forward_sdpa_practical(benchmark, case):
    practical = PracticalLimit(_case(case), *_inputs())
    with torch.no_grad():
        benchmark(practical.forward)


@pytest.mark.parametrize("case", CASES)
def test_forward_flex_compiled(benchmark, case):
    flex, block_mask = _flex(case)
    q, k, v = (to_bhtd(x) for x in _inputs())
    with torch.no_grad():
        flex(q, k, v, block_mask=block_mask)  # compile outside the timing
        benchmark(flex, q, k, v, block_mask=block_mask)


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_cpu(benchmark, case):
    mask = _case(case).mask
    leaves = [x.requires_grad_(True) for x in _inputs()]
    benchmark(fwd_bwd(lambda: span_attention(*leaves, mask, backend="cpu"), leaves))


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_sdpa_dense(benchmark, case):
    mask = _case(case).mask
    leaves = [to_bhtd(x).requires_grad_(True) for x in _inputs()]
    dense = mask.to_dense()[None, None]
    step = fwd_bwd(
        lambda: torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=dense), leaves
    )
    benchmark(step)


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_sdpa_practical(benchmark, case):
    practical = PracticalLimit(_case(case), *_inputs(), requires_grad=True)
    benchmark(fwd_bwd(practical.forward, practical.leaves()))
