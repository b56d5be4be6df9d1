"""Generation through the paged KV cache: cached == recomputed, sampling, eos, arguments."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from metalm_fast.models import PRESETS, generation
from metalm_fast.models.generation import generate, new_cache, prefill, release_cache
from tests.models.test_vision import IMAGE, tiny_model, vision_language_batch
from tests.tolerance import assert_within_tolerance

NEW_TOKENS = 10


def prompts(images=True, spans=True):
    """Three prompts of 5, 17 and 33 tokens. With images: prompt 1 ends with an image
    (its first new token is predicted from the image's last row) and prompt 2 holds one
    at offset 2. With spans: a text span in prompt 2 (absolute [44, 52))."""
    return vision_language_batch(
        lengths=(5, 17, 33),
        images_at=((1, 1), (2, 2)) if images else (),
        spans=((44, 52),) if spans else (),
        seed=3,
    )


def model_for_generation(variant="two_stack", backend="auto", seed=0):
    """The tiny preset, with weights perturbed so greedy decoding does not just repeat
    the last token (what a freshly initialised, tied-embedding model does)."""
    model = tiny_model(variant, backend, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
@pytest.mark.parametrize("variant", ["two_stack", "single_stack"])
def test_cached_greedy_matches_recomputing(variant, images):
    batch = prompts(images=images)
    model = model_for_generation(variant)
    cached = model.generate(batch, max_new_tokens=NEW_TOKENS, block_size=4)
    recomputed = model.generate(batch, max_new_tokens=NEW_TOKENS, use_cache=False)
    assert cached == recomputed
    assert [len(tokens) for tokens in cached] == [NEW_TOKENS] * 3
    assert len({tuple(tokens) for tokens in cached}) == 3  # the prompts are told apart
    assert any(len(set(tokens)) > 2 for tokens in cached)  # not a repeated token


def test_images_and_spans_change_the_continuation():
    model = model_for_generation()
    with_images = model.generate(prompts(), max_new_tokens=NEW_TOKENS)
    batch = prompts()
    batch.images = torch.rand(batch.images.shape, generator=torch.Generator().manual_seed(9))
    other_images = model.generate(batch, max_new_tokens=NEW_TOKENS)
    assert with_images[0] == other_images[0]  # prompt 0 holds no image
    assert with_images[1:] != other_images[1:]


def _sample(model, batch, seed, use_cache, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return model.generate(
        batch,
        max_new_tokens=NEW_TOKENS,
        do_sample=True,
        generator=generator,
        use_cache=use_cache,
        **kwargs,
    )


@pytest.mark.parametrize(("top_p", "temperature"), [(0.9, 0.8), (1.0, 1.3)])
def test_seeded_sampling_is_reproducible_and_matches_recomputing(top_p, temperature):
    model, batch = model_for_generation(), prompts()
    first = _sample(model, batch, 7, True, top_p=top_p, temperature=temperature)
    assert first == _sample(model, batch, 7, True, top_p=top_p, temperature=temperature)
    assert first == _sample(model, batch, 7, False, top_p=top_p, temperature=temperature)
    assert first != _sample(model, batch, 8, True, top_p=top_p, temperature=temperature)


def test_tiny_top_p_is_greedy():
    model, batch = model_for_generation("single_stack"), prompts()
    greedy = model.generate(batch, max_new_tokens=NEW_TOKENS)
    assert _sample(model, batch, 1, True, top_p=1e-6, temperature=0.7) == greedy


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_a_sequence_and_the_others_continue(use_cache):
    model, batch = model_for_generation(), prompts()
    full = model.generate(batch, max_new_tokens=NEW_TOKENS)
    eos = next(tokens[2] for tokens in full if tokens[2] not in tokens[:2])

    def cut(tokens):
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    expected = [cut(tokens) for tokens in full]
    assert any(len(tokens) < NEW_TOKENS for tokens in expected)
    assert any(len(tokens) == NEW_TOKENS for tokens in expected)
    assert (
        model.generate(batch, max_new_tokens=NEW_TOKENS, eos_id=eos, use_cache=use_cache)
        == expected
    )


def test_one_new_token_and_zero():
    model, batch = model_for_generation(), prompts()
    one = model.generate(batch, max_new_tokens=1)
    assert one == [tokens[:1] for tokens in model.generate(batch, max_new_tokens=3)]
    assert model.generate(batch, max_new_tokens=0) == [[], [], []]
    assert generate(model, batch, max_new_tokens=0, use_cache=False) == [[], [], []]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 2, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 2, "top_p": float("nan")}, "top_p"),
        ({"max_new_tokens": 2, "do_sample": True, "temperature": 0.0}, "temperature"),
        ({"max_new_tokens": 2, "do_sample": True, "temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 2, "block_size": 0}, "block_size"),
        ({"max_new_tokens": 2, "eos_id": -1}, "eos_id"),
    ],
)
def test_bad_values_name_themselves(kwargs, name):
    model, batch = model_for_generation(), prompts()
    with pytest.raises(ValueError, match=name):
        model.generate(batch, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_new_tokens": 2.0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"max_new_tokens": "8"}, "max_new_tokens"),
        ({"max_new_tokens": 2, "block_size": 4.0}, "block_size"),
        ({"max_new_tokens": 2, "block_size": True}, "block_size"),
        ({"max_new_tokens": 2, "eos_id": 1.0}, "eos_id"),
        ({"max_new_tokens": 2, "top_p": True}, "top_p"),
        ({"max_new_tokens": 2, "do_sample": True, "temperature": "1"}, "temperature"),
    ],
)
def test_bad_types_name_themselves(kwargs, name):
    model, batch = model_for_generation(), prompts()
    with pytest.raises(TypeError, match=name):
        model.generate(batch, **kwargs)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_a_request_past_memory_fails_fast_naming_max_new_tokens(use_cache, monkeypatch):
    """10**9 new tokens need a pool of ~2 TB (cached) or sequences past int32 lengths
    (uncached): refused before anything is allocated, the model's kept pool untouched."""
    model, batch = model_for_generation(), prompts()
    model.generate(batch, max_new_tokens=2)
    kept = generation._POOLS[model]
    allocations = []
    monkeypatch.setattr(generation, "PagedKVCache", lambda *a, **k: allocations.append(a))
    start = time.perf_counter()
    too_many = 10**9 if use_cache else 2**31
    with pytest.raises(generation.RequestTooLargeError, match="max_new_tokens=") as error:
        generate(model, batch, max_new_tokens=too_many, use_cache=use_cache)
    assert time.perf_counter() - start < 0.5
    assert isinstance(error.value, ValueError) and not allocations
    if use_cache:
        needed = generation.pool_bytes(model, [5, 17, 33], 10**9)
        assert f"{needed:,} bytes" in str(error.value)
    assert generation._POOLS[model] is kept
    release_cache(model)


def test_the_memory_bound_is_the_device_memory(monkeypatch):
    """A request just above the bound is refused, just below it runs (its pool is
    never allocated here: the bound is lowered to the few KB the request needs)."""
    model, batch = model_for_generation(), prompts()
    release_cache(model)
    needed = generation.pool_bytes(model, [5, 17, 33], 3)
    monkeypatch.setattr(generation, "_memory_bound", lambda device, model: (needed - 1, "test"))
    with pytest.raises(generation.RequestTooLargeError, match=f"{needed:,} bytes"):
        model.generate(batch, max_new_tokens=3)
    monkeypatch.setattr(generation, "_memory_bound", lambda device, model: (needed, "test"))
    assert [len(new) for new in model.generate(batch, max_new_tokens=3)] == [3, 3, 3]
    release_cache(model)


def test_pool_bytes_is_what_the_pool_allocates():
    model = model_for_generation()
    cache = new_cache(model, [5, 17, 33], 10, block_size=4)
    assert generation.pool_bytes(model, [5, 17, 33], 10, 4) == (
        cache.kv.numel() * cache.kv.element_size()
    )


def test_greedy_ignores_temperature():
    model, batch = model_for_generation(), prompts()
    assert model.generate(batch, max_new_tokens=2, temperature=0.0) == model.generate(
        batch, max_new_tokens=2
    )


@pytest.mark.parametrize("variant", ["two_stack", "single_stack"])
def test_prefill_logits_match_model_logits(variant):
    """The cached prefill (cpu kernels) against model.logits: golden float64 reference,
    baseline float32 reference (the docs/ARCHITECTURE.md rule)."""
    batch = prompts()
    fast = model_for_generation(variant, "cpu")
    baseline = model_for_generation(variant, "reference")
    golden = model_for_generation(variant, "reference").double()
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    cache = new_cache(fast, lengths, max_new_tokens=4, block_size=4)
    seq_ids = [cache.allocate() for _ in lengths]
    with torch.no_grad():
        logits = prefill(fast, batch, cache, seq_ids, last_only=False)
        other = new_cache(fast, lengths, max_new_tokens=4, block_size=4)
        last = prefill(fast, batch, other, [other.allocate() for _ in lengths])
        base, gold = baseline.logits(batch), golden.logits(batch)
    assert_within_tolerance(logits, gold, base, "prefill logits")
    # last_only prunes the last layer to the prompts' last rows: same logits there, and
    # every layer's keys and values still reach the cache, bit for bit.
    torch.testing.assert_close(last, logits[batch.cu_seqlens[1:] - 1])
    assert torch.equal(cache.kv, other.kv)
    assert cache.seq_len(seq_ids[2]) == 33


def test_placeholder_prompts_hold_images():
    batch = prompts()
    assert int((batch.input_ids == IMAGE).sum()) == 2 * PRESETS["tiny"].tokens_per_image
    assert batch.images.shape[0] == 2


def test_the_pool_is_kept_between_calls_and_shows_no_stale_data():
    """Consecutive generate() calls with different batch sizes reuse one pool (reset
    between calls; replaced when too small) and give the tokens of fresh runs, even
    with the kept pool's stale contents poisoned with NaN."""
    model = model_for_generation()
    small = vision_language_batch(lengths=(9, 4), images_at=((0, 1),), spans=(), seed=5)
    batches = {"three": prompts(), "two": small}

    def fresh(name):
        release_cache(model)
        return model.generate(batches[name], max_new_tokens=NEW_TOKENS, block_size=4)

    expected = {name: fresh(name) for name in ("two", "three")}
    release_cache(model)
    assert model.generate(small, max_new_tokens=NEW_TOKENS, block_size=4) == expected["two"]
    pool = generation._POOLS[model]
    for name, grows in (("three", True), ("two", False), ("three", False)):
        with torch.inference_mode():
            pool.kv.fill_(float("nan"))  # whatever an earlier call left is never read
        got = model.generate(batches[name], max_new_tokens=NEW_TOKENS, block_size=4)
        assert got == expected[name]
        kept = generation._POOLS[model]
        assert (kept is not pool) == grows and kept.num_sequences == 0
        assert kept.num_free_blocks == kept.num_blocks  # every page went back
        pool = kept
    model.generate(small, max_new_tokens=2, block_size=8)  # another page size: a new pool
    assert generation._POOLS[model].block_size == 8
    release_cache(model)
    assert model not in generation._POOLS
