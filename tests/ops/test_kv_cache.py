"""kv_cache_append (bit-exact on every backend) and the PagedKVCache allocator."""

from __future__ import annotations

import pytest
import torch

from metalm_fast import PagedKVCache, kv_cache_append
from metalm_fast.ops.kv_cache import KVCacheFullError
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
    return (torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype),
            torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype))


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
    kv_cache_append(k_cache, v_cache, empty, empty, torch.empty(0, dtype=torch.int64),
                    backend=backend)
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
        (lambda a: {**a, "k_new": a["k_new"].transpose(1, 2).contiguous().transpose(1, 2)},
         ValueError, "k_new must be contiguous in its last dim"),
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


# ----------------------------------------------------------------------------- allocator
def test_allocator_pages_slots_and_free():
    cache = PagedKVCache(1, num_blocks=6, block_size=4, num_kv_heads=1, head_dim=16)
    first = cache.allocate(5)  # pages 0, 1
    second = cache.allocate()
    assert cache.extend(second, 3).tolist() == [8, 9, 10]  # page 2
    # first: positions 5..8 (page 1, then a new page 3); second: 3..4 (page 2, new page 4).
    assert cache.extend([first, second], [4, 2]).tolist() == [5, 6, 7, 12, 11, 16]
    assert cache.block_table([first, second]).tolist() == [[0, 1, 3], [2, 4, 0]]
    assert cache.block_table([first]).dtype == torch.int32
    assert cache.seq_lens([first, second]).tolist() == [9, 5]
    assert cache.slot_mapping([first], 2).tolist() == [7, 12]
    assert cache.num_free_blocks == 1
    cache.free(first)
    assert cache.num_free_blocks == 4
    third = cache.allocate(12)  # reuses the freed pages, lowest first
    assert cache.block_table([third]).tolist() == [[0, 1, 3]]
    with pytest.raises(ValueError, match="not allocated"):
        cache.extend(first, 1)


def test_pool_exhaustion_raises_and_changes_nothing():
    cache = PagedKVCache(1, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=16)
    first, second = cache.allocate(6), cache.allocate(1)
    state = (cache.num_free_blocks, cache.block_table([first, second]).tolist(),
             cache.seq_lens([first, second]).tolist())
    # first needs 1 more page (ok alone), second 2 more: 3 > 1 free, so neither grows.
    with pytest.raises(KVCacheFullError, match="pool exhausted.*needs 3 more pages"):
        cache.extend([first, second], [3, 8])
    with pytest.raises(KVCacheFullError):
        cache.allocate(100)
    with pytest.raises(KVCacheFullError):
        cache.step([first, second], [3, 8])
    assert state == (cache.num_free_blocks, cache.block_table([first, second]).tolist(),
                     cache.seq_lens([first, second]).tolist())
    assert cache.extend([first, second], [2, 3]).numel() == 5  # what fits still fits


def test_reserve_takes_pages_together_and_keeps_the_length():
    cache = PagedKVCache(1, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=16)
    first, second = cache.allocate(), cache.allocate()
    cache.reserve(first, 10)  # pages 0, 1, 2
    cache.reserve(second, 5)  # pages 3, 4
    assert cache.seq_lens([first, second]).tolist() == [0, 0]
    assert cache.num_free_blocks == 3
    # Growing within the reservation takes no page; tokens land on the reserved ones in turn.
    for _ in range(5):
        cache.step([first, second], 1)
    assert cache.num_free_blocks == 3
    assert cache.block_table([first, second]).tolist() == [[0, 1, 2], [3, 4, 0]]
    assert cache.slot_mapping([first, second], 1).tolist() == [4, 16]
    # Past it, pages come one at a time again; reserving less than held changes nothing.
    assert cache.extend(second, 4).tolist() == [17, 18, 19, 20]
    cache.reserve(first, 1)
    assert cache.num_free_blocks == 2
    with pytest.raises(KVCacheFullError, match="needs 3 more pages"):
        cache.reserve(first, 24)
    assert cache.num_free_blocks == 2 and cache.seq_len(first) == 5
    cache.free(first)
    assert cache.num_free_blocks == 5  # the reserved, unfilled page 2 returns too
    with pytest.raises(ValueError, match="not allocated"):
        cache.reserve(first, 1)
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0"):
        cache.reserve(second, -1)


def test_step_describes_the_batch():
    cache = PagedKVCache(2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16)
    a, b = cache.allocate(3), cache.allocate(0)
    step = cache.step([a, b], [2, 5])
    assert step.query_lens == (2, 5) and step.context_lens == (3, 0) and not step.is_decode
    assert step.positions.tolist() == [3, 4, 0, 1, 2, 3, 4]
    assert step.cu_seqlens.tolist() == [0, 2, 7]
    assert step.seq_lens.tolist() == [5, 5]
    assert step.slot_mapping.tolist() == [3, 4, 8, 9, 10, 11, 12]  # pages a: 0, 1; b: 2, 3
    assert cache.step([a, b], 1).is_decode


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: PagedKVCache(1, 0, 4, 1, 16), "num_blocks must be a positive int"),
        (lambda c: PagedKVCache(1, 4, 4, 1, 16, dtype=torch.int32), "dtype"),
        (lambda c: c.extend([0, 0], 1), "must not repeat"),
        (lambda c: c.extend([0], [1, 2]), "num_tokens has 2 entries"),
        (lambda c: c.allocate(-1), "num_tokens must be an int >= 0"),
        (lambda c: c.key_cache(3), "layer must be an int"),
        (lambda c: c.slot_mapping([0], 9), "holds only"),
    ],
)
def test_allocator_errors(call, match):
    cache = PagedKVCache(2, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=16)
    cache.allocate(2)
    with pytest.raises((ValueError, TypeError), match=match):
        call(cache)
