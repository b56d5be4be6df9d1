"""The paged Triton kernels under the interpreter: forced splits, head blocks, configs."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from metalm_fast.kernels import kv_cache_append as append_kernels  # noqa: E402
from metalm_fast.kernels import paged_decode_attention as decode_kernels  # noqa: E402

from metalm_fast import reference  # noqa: E402
from tests.paged_cases import paged_layout, random_caches  # noqa: E402
from tests.tolerance import assert_within_tolerance  # noqa: E402


def _decode_problem(lengths, block_size, heads, kv_heads, head_dim, dtype=torch.float32):
    num_blocks, table = paged_layout(lengths, block_size, seed=len(lengths))
    k_cache, v_cache = random_caches(num_blocks, block_size, kv_heads, head_dim, dtype)
    q = torch.randn(len(lengths), heads, head_dim, generator=torch.Generator().manual_seed(9))
    return q.to(dtype), k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32)


def _check_decode(problem, num_splits, scale=0.2):
    q, k_cache, v_cache, table, seq_lens = problem
    out = decode_kernels.paged_decode_attention_forward(
        q, k_cache, v_cache, table, seq_lens, scale, num_splits=num_splits
    )
    golden = reference.paged_decode_attention(
        q.double(), k_cache.double(), v_cache.double(), table, seq_lens, scale=scale
    )
    baseline = reference.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, scale=scale)
    assert_within_tolerance(out, golden, baseline, f"out (num_splits={num_splits})")
    assert torch.all(out[seq_lens == 0] == 0)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_forced_splits_with_empty_ones(num_splits):
    """Lengths 0, 1 and 3 leave most splits of their row empty: the merge ignores them."""
    _check_decode(_decode_problem([200, 0, 1, 3, 130], 16, 4, 2, 32), num_splits)


def test_query_heads_beyond_one_head_block():
    """Hq / Hkv = 20 > BLOCK_H = 16: two head blocks per kv head, the second half empty."""
    _check_decode(_decode_problem([70, 9], 8, 40, 2, 16), num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_split(dtype):
    # bf16 dots run through tests/conftest.py's interpreter patch.
    _check_decode(_decode_problem([90, 17], 16, 4, 1, 64, dtype), num_splits=3)


def test_choose_splits():
    # Many sequences already fill the device: no split.
    assert decode_kernels.choose_splits(64, 8, 4096, 64, 264)[0] == 1
    # One long sequence: split, at least MIN_SPLIT_KEYS keys each, a multiple of BLOCK_N.
    splits, keys = decode_kernels.choose_splits(1, 4, 32768, 64, 264)
    assert splits > 1 and keys % 64 == 0 and keys >= decode_kernels.MIN_SPLIT_KEYS
    assert splits * keys >= 32768
    # Short sequences are never split, whatever the device.
    assert decode_kernels.choose_splits(1, 1, 200, 64, 264) == (1, 256)
    assert decode_kernels.choose_splits(1, 1, 10**6, 64, 10**6)[0] <= decode_kernels.MAX_SPLITS


def test_launchers_use_only_shipped_configs():
    """Every (dtype, head dim) the launcher can meet maps to a config in shipped_configs()."""
    shipped = {
        (
            c.pass_name,
            c.signature["q_ptr" if c.pass_name == "split" else "out_ptr"],
            tuple(sorted(c.constexprs.items())),
        )
        for c in decode_kernels.shipped_configs()
    }
    for dtype, name in decode_kernels._DTYPE_NAMES.items():
        for head_dim in range(16, 257, 8):
            block_d = decode_kernels._block_d(head_dim)
            tiles = decode_kernels._tiles(block_d, dtype)
            split = {
                "BLOCK_H": decode_kernels.BLOCK_H,
                "BLOCK_N": tiles.block_n,
                "BLOCK_D": block_d,
                "DOT_PRECISION": decode_kernels._dot_precision(dtype),
            }
            merge = {"BLOCK_S": decode_kernels.MAX_SPLITS, "BLOCK_D": block_d}
            assert ("split", "*" + name, tuple(sorted(split.items()))) in shipped
            assert ("merge", "*" + name, tuple(sorted(merge.items()))) in shipped
    assert {c.arch for c in append_kernels.shipped_configs()} == {80, 90}


def test_append_kernel_masks_every_bad_slot():
    k_cache, v_cache = random_caches(3, 4, 2, 80, torch.float16)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    k_new = torch.randn(20, 2, 80).half()
    v_new = torch.randn(20, 2, 80).half()
    slots = torch.full((20,), -1, dtype=torch.int64)
    slots[3], slots[17], slots[5] = 11, 0, 12  # 12 is past the pool of 3 * 4 slots
    append_kernels.kv_cache_append_forward(k_cache, v_cache, k_new, v_new, slots)
    expected_k[2, 3], expected_v[2, 3] = k_new[3], v_new[3]
    expected_k[0, 0], expected_v[0, 0] = k_new[17], v_new[17]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
