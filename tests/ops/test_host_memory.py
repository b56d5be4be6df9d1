"""zeros_on_huge_pages: zeroed, contiguous, 2 MiB-aligned where the pool is large."""

import sys

import pytest
import torch

from metalm_fast.ops.host_memory import HUGE_PAGE_BYTES, zeros_on_huge_pages


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_tensor_is_zero_aligned_and_writable(dtype):
    shape = (3, 2, 197, 16, 4, 32)  # a KV pool shape, over 2 huge pages in every dtype here
    pool = zeros_on_huge_pages(shape, dtype)
    assert pool.shape == shape and pool.dtype == dtype and pool.is_contiguous()
    assert not pool.any()
    if sys.platform.startswith("linux"):
        assert pool.data_ptr() % HUGE_PAGE_BYTES == 0
    pool[1, 0, 5] = 1
    assert pool.sum().item() == 16 * 4 * 32  # that page only: the view is the whole tensor


def test_small_tensor_is_plain_zeros():
    small = zeros_on_huge_pages((4, 8), torch.float32)
    assert small.shape == (4, 8) and not small.any()


def test_fresh_tensors_are_zero_after_reuse():
    # Memory handed back by one pool and reused by the next must be zeroed again.
    shape = (1, 2, 64, 16, 8, 64)
    first = zeros_on_huge_pages(shape, torch.float32)
    first.fill_(float("nan"))
    del first
    second = zeros_on_huge_pages(shape, torch.float32)
    assert not second.isnan().any() and not second.any()
