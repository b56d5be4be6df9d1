"""kv_cache_append: bit-exact on every backend, errors that name the argument."""

from __future__ import annotations

import pytest
import torch

from metalm_fast import PagedKVCache, kv_cache_append
from tests.paged_cases import paged_layout, random_caches, require_backend, slots_of

BACKENDS = ["reference", "cpu", "triton"]
CPU_OP = "_kv_cache_append_cpu"


def _dense_expected(k_cache, v_cache, k_new, v_new, slots):
    """The append done on a flat [num_slots, Hkv, D] copy: the dense reference."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_flat = k_cache.clone().reshape(num_slots, *k_cache.shape[2:])
    v_flat = v_cache.clone().reshape(num_slots, *v_cache.shape[2:])
    for t, slot in enumerate(slots.tolist()):
        if 0 <= slot < num_slots:
            k_flat[slot], v_flat[slot] = k_new[t], v_new[t]
    return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def _crossing_appends(block_size: int, seed: int = 0):
    """Three sequences that already hold some tokens each get new ones, crossing pages."""
    context = [block_size - 1, 2 * block_size + 3, 0]
    new = [3, block_size + 2, 2 * block_size + 1]
    num_blocks, table = paged_layout([c + n for c, n in zip(context, new)], block_size, seed=seed)
    slots = []
    for b, (c, n) in enumerate(zip(context, new)):
        slots += slots_of(table, block_size, b, c, n)
    return num_blocks, torch.tensor(slots)


def _new_rows(tokens, kv_heads, head_dim, dtype, fused, seed=0):
    generator = torch.Generator().manual_seed(seed + 7)
    if fused:  # k and v sliced out of one qkv projection: strided rows
        qkv = torch.randn(tokens, 3 * kv_heads, head_dim, generator=generator).to(dtype)
        return qkv[:, kv_heads : 2 * kv_heads], qkv[:, 2 * kv_heads :]
    return (
        torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype),
        torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 8, 16, 128])
def test_append_bit_exact_crossing_pages(backend, block_size):
    require_backend(backend, CPU_OP)
    num_blocks, slots = _crossing_appends(block_size)
    k_cache, v_cache = random_caches(num_blocks, block_size, 2, 32, torch.float32)
    k_new, v_new = _new_rows(slots.numel(), 2, 32, torch.float32, fused=block_size == 8)
    expected = _dense_expected(k_cache, v_cache, k_new, v_new, slots)
    kv_cache_append(k_cache, v_cache, k_new, v_new, slots, validate=True, backend=backend)
    # Bit-exact, and every slot the append did not target is unchanged.
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_append_dtypes_bit_exact_with_skips(backend, dtype):
    require_backend(backend, CPU_OP)
    k_cache, v_cache = random_caches(6, 16, 4, 80, dtype)
    # -1 skips; 96 is past the pool (6 * 16): skipped without validate, never written.
    slots = torch.tensor([5, -1, 95, 96, 17, 10_000, 0], dtype=torch.int32)
    k_new, v_new = _new_rows(slots.numel(), 4, 80, dtype, fused=True)
    expected = _dense_expected(k_cache, v_cache, k_new, v_new, slots)
    kv_cache_append(k_cache, v_cache, k_new, v_new, slots, backend=backend)
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_append_float64_and_empty(backend):
    require_backend(backend, CPU_OP)
    k_cache, v_cache = random_caches(3, 4, 1, 16, torch.float64)
    before = k_cache.clone(), v_cache.clone()
    empty = torch.empty(0, 1, 16, dtype=torch.float64)
    kv_cache_append(
        k_cache, v_cache, empty, empty, torch.empty(0, dtype=torch.int64), backend=backend
    )
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    k_new, v_new = _new_rows(2, 1, 16, torch.float64, fused=False)
    kv_cache_append(k_cache, v_cache, k_new, v_new, torch.tensor([11, 2]), backend=backend)
    assert torch.equal(k_cache[2, 3], k_new[0]) and torch.equal(v_cache[0, 2], v_new[1])


def test_append_into_a_layer_view_of_the_pool():
    """The PagedKVCache pool is [L, 2, ...]; appending to one layer leaves the others."""
    cache = PagedKVCache(3, num_blocks=4, block_size=8, num_kv_heads=2, head_dim=16)
    seq = cache.allocate()
    slots = cache.extend(seq, 10)
    k_new, v_new = _new_rows(10, 2, 16, torch.float32, fused=True)
    cache.append(1, k_new, v_new, slots)
    assert torch.equal(cache.key_cache(1).reshape(-1, 2, 16)[:10], k_new)
    assert torch.equal(cache.value_cache(1).reshape(-1, 2, 16)[:10], v_new)
    assert not cache.kv[0].any() and not cache.kv[2].any()


# ----------------------------------------------------------------------------- errors
def _append_args(dtype=torch.float32):
    k_cache, v_cache = random_caches(4, 8, 2, 16, dtype)
    k_new, v_new = _new_rows(3, 2, 16, dtype, fused=False)
    return k_cache, v_cache, k_new, v_new, torch.tensor([0, 1, 2])


def test_append_slot_outside_pool_raises_with_validate():
    k_cache, v_cache, k_new, v_new, _ = _append_args()
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 32 is outside the pool"):
        kv_cache_append(k_cache, v_cache, k_new, v_new, torch.tensor([3, 32, -1]), validate=True)


def test_append_repeated_slot_raises_with_validate():
    k_cache, v_cache, k_new, v_new, _ = _append_args()
    with pytest.raises(ValueError, match="slot 4 more than once"):
        kv_cache_append(k_cache, v_cache, k_new, v_new, torch.tensor([4, 4, -1]), validate=True)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "k_new": a["k_new"].half()}, TypeError, "k_new dtype"),
        (lambda a: {**a, "v_new": a["v_new"][:, :1]}, ValueError, "v_new has"),
        (lambda a: {**a, "k_new": a["k_new"][..., :8]}, ValueError, r"k_new has \[Hkv, D\]"),
        (lambda a: {**a, "v_cache": a["v_cache"][:2]}, ValueError, "k_cache and v_cache"),
        (lambda a: {**a, "k_cache": a["k_cache"][0]}, ValueError, "k_cache must be 4-D"),
        (lambda a: {**a, "slot_mapping": a["slot_mapping"].float()}, TypeError, "slot_mapping"),
        (lambda a: {**a, "slot_mapping": a["slot_mapping"][:2]}, ValueError, "slot_mapping"),
        (
            lambda a: {**a, "k_new": a["k_new"].transpose(1, 2).contiguous().transpose(1, 2)},
            ValueError,
            "k_new must be contiguous in its last dim",
        ),
    ],
)
def test_append_errors_name_the_argument(change, error, match):
    names = ("k_cache", "v_cache", "k_new", "v_new", "slot_mapping")
    args = change(dict(zip(names, _append_args())))
    with pytest.raises(error, match=match):
        kv_cache_append(*(args[name] for name in names))


def test_append_triton_rejects_float64():
    require_backend("triton", CPU_OP)
    args = _append_args(torch.float64)
    with pytest.raises(TypeError, match="triton backend supports"):
        kv_cache_append(*args, backend="triton")
