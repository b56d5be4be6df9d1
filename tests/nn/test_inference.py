"""Helpers of the inference fast paths: equal row chunks, F.linear into a buffer, hooks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalm_fast.nn.inference import chunk_rows, forward_hooked, linear_into


@pytest.mark.parametrize(
    "tokens, most, rows",
    [(1024, 1024, 1024), (1025, 1024, 513), (4950, 1024, 990), (21600, 1024, 982)],
)
def test_chunk_rows_are_equal_and_at_most(tokens, most, rows):
    assert chunk_rows(tokens, most) == rows
    chunks = -(-tokens // rows)
    last = tokens - (chunks - 1) * rows
    assert rows <= most and rows // 2 < last <= rows  # no short remainder


@pytest.mark.parametrize("bias", [True, False])
def test_linear_into_is_f_linear_bit_for_bit(bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=generator)
    weight = torch.randn(80, 48, generator=generator)
    b = torch.randn(80, generator=generator) if bias else None
    out = torch.full((300, 80), float("nan"))
    linear_into(x, weight, b, out)
    assert torch.equal(out, F.linear(x, weight, b))


def test_forward_hooked_sees_module_and_global_hooks():
    layer = nn.Linear(4, 4)
    assert not forward_hooked(layer, None)
    handle = layer.register_forward_pre_hook(lambda module, args: None)
    assert forward_hooked(None, layer)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert forward_hooked(layer)
    finally:
        handle.remove()
    assert not forward_hooked(layer)


def test_linear_into_serves_where_the_call_is_f_linear():
    from metalm_fast.nn import DecodeLinear
    from metalm_fast.nn.inference import linear_into_serves

    plain, decode = nn.Linear(16, 8), DecodeLinear(16, 8)
    rows, many = torch.randn(8, 16), torch.randn(40, 16)
    assert not linear_into_serves(plain, many)  # autograd on
    with torch.no_grad():
        assert linear_into_serves(plain, rows) and linear_into_serves(decode, many)
        assert linear_into_serves(decode, rows) == (not decode.uses_kernel(rows))
        assert not linear_into_serves(plain, many.double())  # F.linear would raise
        assert not linear_into_serves(type("Sub", (nn.Linear,), {})(16, 8), many)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not linear_into_serves(plain, many)
        handle = plain.register_forward_hook(lambda module, args, out: None)
        assert not linear_into_serves(plain, many)
        handle.remove()
