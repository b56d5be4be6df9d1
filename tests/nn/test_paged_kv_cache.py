"""The PagedKVCache allocator: pages, slots, steps, all-or-nothing growth, reset."""

from __future__ import annotations

import pytest
import torch

from metalm_fast import PagedKVCache
from metalm_fast.nn.paged_kv_cache import KVCacheFullError


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
    state = (
        cache.num_free_blocks,
        cache.block_table([first, second]).tolist(),
        cache.seq_lens([first, second]).tolist(),
    )
    # first needs 1 more page (ok alone), second 2 more: 3 > 1 free, so neither grows.
    with pytest.raises(KVCacheFullError, match="pool exhausted.*needs 3 more pages"):
        cache.extend([first, second], [3, 8])
    with pytest.raises(KVCacheFullError):
        cache.allocate(100)
    with pytest.raises(KVCacheFullError):
        cache.step([first, second], [3, 8])
    assert state == (
        cache.num_free_blocks,
        cache.block_table([first, second]).tolist(),
        cache.seq_lens([first, second]).tolist(),
    )
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


def test_reset_frees_every_page_in_fresh_order():
    cache = PagedKVCache(1, num_blocks=6, block_size=4, num_kv_heads=1, head_dim=16)
    fresh = PagedKVCache(1, num_blocks=6, block_size=4, num_kv_heads=1, head_dim=16)
    old = [cache.allocate(5), cache.allocate(3)]
    cache.free(old[0])
    cache.allocate(9)
    cache.step([old[1]], 1)  # fills the step's block-table memo
    cache.reset()
    assert cache.num_free_blocks == 6 and cache.num_sequences == 0
    with pytest.raises(ValueError, match="not allocated"):
        cache.seq_len(old[1])  # ids from before the reset are never valid again
    ids = [cache.allocate(), cache.allocate()]
    fresh_ids = [fresh.allocate(), fresh.allocate()]
    assert ids[0] not in old and ids[1] not in old
    step, fresh_step = cache.step(ids, [6, 2]), fresh.step(fresh_ids, [6, 2])
    assert torch.equal(step.slot_mapping, fresh_step.slot_mapping)
    assert torch.equal(step.block_table, fresh_step.block_table)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c, s: c.free(True), "seq_ids must be an int, got bool"),
        (lambda c, s: c.free(1.0), "seq_ids must be an int, got float"),
        (lambda c, s: c.seq_len(True), "seq_ids must be an int"),
        (lambda c, s: c.extend([s[0], True], 1), "seq_ids must be an int"),
        (lambda c, s: c.extend(s[1], 1.0), "num_tokens must be an int, got float"),
        (lambda c, s: c.extend(s[1], True), "num_tokens must be an int, got bool"),
        (lambda c, s: c.step([s[0]], [True]), "num_tokens must be an int"),
        (lambda c, s: c.allocate(2.0), "num_tokens must be an int"),
        (lambda c, s: c.allocate(False), "num_tokens must be an int"),
        (lambda c, s: c.reserve(s[1], 8.0), "num_tokens must be an int"),
        (lambda c, s: c.reserve(True, 8), "seq_ids must be an int"),
        (lambda c, s: c.block_table([1.0]), "seq_ids must be an int"),
        (lambda c, s: c.seq_lens([True]), "seq_ids must be an int"),
        (lambda c, s: c.slot_mapping([s[1]], [True]), "num_tokens must be an int"),
        (lambda c, s: c.key_cache(True), "layer must be an int, got bool"),
        (lambda c, s: c.value_cache(1.0), "layer must be an int, got float"),
        (lambda c, s: PagedKVCache(True, 4, 4, 1, 16), "num_layers must be an int"),
        (lambda c, s: PagedKVCache(1, 4.0, 4, 1, 16), "num_blocks must be an int"),
    ],
)
def test_bools_and_floats_are_type_errors(call, match):
    """True == 1 and 1.0 == 1: accepted as ints they would free or extend sequence 1."""
    cache = PagedKVCache(2, num_blocks=6, block_size=4, num_kv_heads=1, head_dim=16)
    seqs = [cache.allocate(2), cache.allocate(3)]  # ids 0 and 1
    with pytest.raises(TypeError, match=match):
        call(cache, seqs)
    assert cache.num_sequences == 2 and cache.seq_len(1) == 3 and cache.num_free_blocks == 4


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    cache = PagedKVCache(np.int64(1), num_blocks=4, block_size=4, num_kv_heads=1, head_dim=16)
    seq = cache.allocate(np.int32(3))
    cache.extend(np.int64(seq), np.int64(2))
    assert cache.seq_len(np.int64(seq)) == 5
    cache.free(np.int64(seq))
    assert cache.num_free_blocks == 4


def test_pool_must_fit_int32_lengths():
    with pytest.raises(ValueError, match=r"must be at most 2\*\*31 - 1"):
        PagedKVCache(1, num_blocks=2**21, block_size=2**10, num_kv_heads=1, head_dim=16)
