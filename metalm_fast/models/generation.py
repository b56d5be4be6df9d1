"""Generation for MetaLM: prefill and decode through the paged KV cache.

``generate(model, prompts, max_new_tokens=...)`` continues every prompt of a
packed batch (the SemiCausalBatch attributes, one document per prompt; labels
are ignored) and returns the new tokens of each prompt.

With the cache (``use_cache=True``, the fast path):

1. one PagedKVCache for the decoder, with pages for prompt + max_new_tokens
   tokens per prompt, reserved up front so that each sequence's pages are
   consecutive in the pool (the CPU decode kernel streams those faster). The
   model keeps its pool between calls (as gpt-fast's ``setup_caches``):
   :func:`model_cache` resets it, or replaces it by a larger one when the
   prompts need more pages (or the model's dtype or device changed), so a
   generation does not allocate and zero-fill a fresh pool of tens to hundreds
   of MB; :func:`release_cache` drops it;
2. prefill: the prompts in one packed pass, the decoder input built exactly
   as in training (``MetaLM.decoder_inputs``: text-span rows from the text
   encoder, image rows from the vision encoder, scattered by embed_scatter;
   SpanMask.causal for two_stack, SpanMask.semi_causal over the prompt spans
   for single_stack). Every layer appends its keys and values to its pages;
   the last layer attends and runs its MLP for each prompt's last position
   only, the rows the LM head reads (TransformerStack's ``output_rows``);
3. decode: one token per unfinished sequence per step. A step is one
   ``cache.step`` shared by every layer, the token embeddings, the decoder
   (paged_decode_attention over each sequence's pages) and the LM head; only
   the sampled tokens come to the host. Finished sequences (eos or
   max_new_tokens) leave the decode batch and their pages go back to the pool.

Rotary positions are each token's position in its own sequence (prompt
0..L-1, then L, L+1, ...), as in training, so the cache reproduces the full
recomputation that ``use_cache=False`` runs (the reference: the whole forward
over prompt + tokens so far at every step, last position's logits).

Sampling: greedy (argmax) unless ``do_sample``; then temperature, then
nucleus (top-p) filtering, then one ``torch.multinomial`` draw per active
sequence from ``generator`` (seeded: reproducible, and the same draws for the
cached and uncached paths).
"""

from __future__ import annotations

import numbers
import os
import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from metalm_fast.checks import integer
from metalm_fast.nn.paged_kv_cache import PagedKVCache
from metalm_fast.ops.argmax_rows import argmax_rows

__all__ = [
    "MAX_ADDRESSABLE",
    "RequestTooLargeError",
    "append_tokens",
    "check_fits",
    "decode_step",
    "generate",
    "keep_cache",
    "model_cache",
    "new_cache",
    "pool_bytes",
    "prefill",
    "release_cache",
    "sample_next",
]

# Each model's KV pool between generate() calls, held weakly by the model: a pool
# lives as long as its model and never travels with it (state_dict, deepcopy, pickle).
# A call takes its pool out while it runs, so a concurrent generate() on the same
# model gets a pool of its own instead of sharing pages.
_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- arguments
#: The most tokens one sequence may reach (prompt + new tokens) and the most pages a
#: pool may have: the cache's block tables and sequence lengths are int32.
MAX_ADDRESSABLE = 2**31 - 1


class RequestTooLargeError(ValueError):
    """A generation asks for more than fits: its KV pool exceeds the memory of the
    model's device, or a sequence would grow past what the cache can address.
    ``max_new_tokens`` is the argument to lower; nothing was allocated.

    ``problem`` says what does not fit, without the argument's name, so that a
    command line can put its own flag in front.
    """

    def __init__(self, max_new_tokens: int, problem: str):
        self.max_new_tokens = max_new_tokens
        self.problem = problem
        super().__init__(
            f"max_new_tokens={max_new_tokens}: {problem}; lower max_new_tokens "
            "(or the number of prompts)"
        )


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def _check_arguments(max_new_tokens, do_sample, top_p, temperature, eos_id, block_size) -> None:
    integer(max_new_tokens, "max_new_tokens", minimum=0)
    integer(block_size, "block_size", minimum=1)
    if eos_id is not None:
        integer(eos_id, "eos_id", minimum=0)
    _check_real("top_p", top_p)
    if not 0.0 < top_p <= 1.0:  # NaN fails too
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    _check_real("temperature", temperature)
    if do_sample and not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")


def token_prompts(prompts, device=None) -> SimpleNamespace:
    """A prompt batch (the SemiCausalBatch attributes, no spans, no images) of token
    lists: ``[[int, ...], ...]`` -> input_ids [T] packed, cu_seqlens [B + 1]."""
    if not all(isinstance(p, (list, tuple)) for p in prompts):
        raise TypeError("prompts must be a prompt batch or a list of token-id lists")
    for index, prompt in enumerate(prompts):
        for token in prompt:
            integer(token, f"prompts[{index}] token")
    lengths = torch.tensor([0] + [len(p) for p in prompts], dtype=torch.int64)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return SimpleNamespace(
        input_ids=ids,
        cu_seqlens=lengths.cumsum(0).to(device),
        span_starts=empty,
        span_ends=empty,
        encoder_ids=empty,
        encoder_cu_seqlens=torch.zeros(1, dtype=torch.int64, device=device),
        feature_index=torch.full_like(ids, -1),
        images=None,
        image_index=None,
    )


def _prompt_lengths(prompts) -> list[int]:
    cu = prompts.cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(cu[:-1], cu[1:])]
    if not lengths:
        raise ValueError("prompts must hold at least one prompt (cu_seqlens has one entry)")
    for index, length in enumerate(lengths):
        if length < 1:
            raise ValueError(
                f"prompts: prompt {index} is empty (cu_seqlens); every prompt needs a token"
            )
    return lengths


def _check_window(model, prompt_lens: list[int], max_new_tokens: int) -> None:
    """Refuse a cached generation that a sliding window would change: a decode step
    attends its sequence's whole cached prefix, which is the window's answer only while
    the sequence is no longer than the window (the prefill honours the window's mask)."""
    window = getattr(model.decoder.architecture, "sliding_window", None)
    # The last new token is returned, never fed back: the longest decode step attends
    # L + N - 1 keys, and with N = 1 there is no decode step.
    longest = max(prompt_lens) + max_new_tokens - 1
    if window is not None and max_new_tokens > 1 and longest > window:
        raise ValueError(
            f"sliding_window={window}: a prompt of {max(prompt_lens)} tokens plus "
            f"max_new_tokens={max_new_tokens} makes decode steps attend {longest} tokens, "
            "past the window, which the paged decode path does not apply; use "
            "use_cache=False (recomputes under the window's mask) or a shorter request"
        )


# ----------------------------------------------------------------------------- sampling
def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """int64 [B]: the next token of each row of ``logits`` [B, V].

    Greedy: argmax (the lowest index among ties). Sampling: softmax of
    ``logits / temperature``; with ``top_p < 1`` only the smallest set of most
    likely tokens whose probability reaches ``top_p`` is kept (the most likely
    token always is), then one draw per row from ``generator``.
    """
    if not do_sample:
        return argmax_rows(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    # Stable sort: among equal probabilities the lower token id comes first, as for argmax.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


# ----------------------------------------------------------------------------- cached path
def _blocks_needed(prompt_lens: list[int], max_new_tokens: int, block_size: int) -> int:
    # integer ceiling: a float quotient loses pages once lengths pass 2**53
    blocks = sum(-(-(length + max_new_tokens) // block_size) for length in prompt_lens)
    return max(blocks, 1)


def pool_bytes(model, prompt_lens: list[int], max_new_tokens: int, block_size: int = 16) -> int:
    """Bytes of the KV pool a generation of ``prompt_lens`` + ``max_new_tokens`` needs:
    pages x (keys and values of every layer of a page)."""
    decoder = model.decoder
    page = 2 * len(decoder.blocks) * block_size * decoder.num_kv_heads * decoder.head_dim
    blocks = _blocks_needed(prompt_lens, max_new_tokens, block_size)
    return blocks * page * cache_dtype(model).itemsize


def _memory_bound(device: torch.device, model) -> tuple[int, str] | None:
    """The most bytes a new pool on ``device`` could take, and what that bound is;
    None where it is unknown.

    The pool ``model`` keeps is freed before a larger one is allocated, so it
    counts as available.
    """
    kept = _POOLS.get(model)
    on_device = kept is not None and kept.device == device
    kept_bytes = kept.kv.numel() * kept.kv.element_size() if on_device else 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached + kept_bytes, f"free on {device}"
    if device.type == "cpu":
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX host
            return None
        return physical, "of physical memory"
    return None


def _check_addressable(prompt_lens: list[int], max_new_tokens: int) -> None:
    longest = max(prompt_lens) + max_new_tokens
    if longest > MAX_ADDRESSABLE:
        raise RequestTooLargeError(
            max_new_tokens,
            f"a sequence would reach {longest:,} tokens (prompt + new), past the "
            f"{MAX_ADDRESSABLE:,} a sequence may hold (int32 lengths)",
        )


def check_fits(model, prompt_lens: list[int], max_new_tokens: int, block_size: int = 16) -> None:
    """Refuse, before anything is allocated, a generation that cannot fit.

    RequestTooLargeError (a ValueError naming ``max_new_tokens`` and the bytes
    needed) when a sequence would grow past :data:`MAX_ADDRESSABLE` tokens, the
    pool past that many pages, or the pool past the memory of the model's device
    (the physical memory on the CPU, what CUDA can still hand out on a GPU).
    """
    _check_addressable(prompt_lens, max_new_tokens)
    blocks = _blocks_needed(prompt_lens, max_new_tokens, block_size)
    if blocks > MAX_ADDRESSABLE:
        raise RequestTooLargeError(
            max_new_tokens,
            f"the KV pool would need {blocks:,} pages of {block_size} tokens, past the "
            f"{MAX_ADDRESSABLE:,} its int32 block tables address",
        )
    needed = pool_bytes(model, prompt_lens, max_new_tokens, block_size)
    bound = _memory_bound(model.embedding.weight.device, model)
    if bound is not None and needed > bound[0]:
        raise RequestTooLargeError(
            max_new_tokens,
            f"the KV pool for {len(prompt_lens)} prompt(s) would need {needed:,} bytes "
            f"({needed / 2**30:,.1f} GiB), more than the {bound[0]:,} bytes {bound[1]}",
        )


def cache_dtype(model) -> torch.dtype:
    """The dtype of the keys and values the decoder writes: autocast's dtype when
    autocast is on for the model's device (the qkv projection runs in it), else
    the weights' dtype."""
    weight = model.embedding.weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def new_cache(
    model, prompt_lens: list[int], max_new_tokens: int, block_size: int = 16
) -> PagedKVCache:
    """A fresh PagedKVCache for ``model.decoder`` with pages for every prompt +
    max_new_tokens; RequestTooLargeError when it cannot fit (:func:`check_fits`)."""
    check_fits(model, prompt_lens, max_new_tokens, block_size)
    decoder, weight = model.decoder, model.embedding.weight
    return PagedKVCache(
        len(decoder.blocks),
        _blocks_needed(prompt_lens, max_new_tokens, block_size),
        block_size,
        decoder.num_kv_heads,
        decoder.head_dim,
        dtype=cache_dtype(model),
        device=weight.device,
    )


def model_cache(
    model, prompt_lens: list[int], max_new_tokens: int, block_size: int = 16
) -> PagedKVCache:
    """The KV pool ``model`` keeps between generations, reset, with pages for every
    prompt + max_new_tokens.

    The pool of the model's last generation is reused when it has the decoder's
    layers, heads and head dim, the model's dtype and device, this ``block_size``
    and enough pages; otherwise it is dropped and a pool of exactly the pages
    needed takes its place. The caller owns the pool until it hands it back with
    :func:`keep_cache`; until then another call gets a pool of its own. A pool made
    by :func:`generate` holds inference tensors: use it under ``torch.inference_mode``.
    """
    cache = _POOLS.pop(model, None)
    needed = _blocks_needed(prompt_lens, max_new_tokens, block_size)
    decoder, weight = model.decoder, model.embedding.weight
    if cache is not None and (
        cache.num_blocks >= needed
        and cache.block_size == block_size
        and cache.num_layers == len(decoder.blocks)
        and cache.num_kv_heads == decoder.num_kv_heads
        and cache.head_dim == decoder.head_dim
        and cache.dtype == cache_dtype(model)
        and cache.device == weight.device
    ):
        cache.reset()
        return cache
    del cache  # its memory is free before the larger pool is allocated
    return new_cache(model, prompt_lens, max_new_tokens, block_size)


def keep_cache(model, cache: PagedKVCache) -> None:
    """Hand ``cache`` back as ``model``'s pool, for its next :func:`model_cache`."""
    _POOLS[model] = cache


def release_cache(model) -> None:
    """Drop the KV pool ``model`` keeps between generations (its memory is freed)."""
    _POOLS.pop(model, None)


def prefill(
    model, prompts, cache: PagedKVCache, seq_ids: list[int], *, last_only: bool = True
) -> torch.Tensor:
    """Run the prompts through the decoder in one packed pass, filling the cache.

    Returns the logits at each prompt's last position [B, V] (``last_only``),
    or at every prompt position [T, V].
    """
    hidden, mask = model.decoder_inputs(prompts)
    cu = prompts.cu_seqlens
    step = cache.step(seq_ids, (cu[1:] - cu[:-1]).tolist())
    # The last layer runs for the rows the LM head reads (see TransformerStack).
    last = (cu[1:].to(torch.int64) - 1).to(hidden.device) if last_only else None
    return model.lm_head(model.decoder(hidden, mask, cache=cache, step=step, output_rows=last))


def decode_step(
    model, tokens: torch.Tensor, cache: PagedKVCache, seq_ids: list[int]
) -> torch.Tensor:
    """Feed one token per sequence ([B] ids, in ``seq_ids`` order); logits [B, V]."""
    step = cache.step(seq_ids, 1)
    hidden = model.decoder(_embed_tokens(model.embedding, tokens), cache=cache, step=step)
    return model.lm_head(hidden)


def _embed_tokens(embedding, tokens: torch.Tensor) -> torch.Tensor:
    """Plain token rows, as embed_scatter gives them (bit for bit: a gather, then the scale),
    without its feature machinery: decoded tokens never carry encoder features."""
    rows = F.embedding(tokens, embedding.weight)
    return rows if embedding.scale == 1.0 else rows * embedding.scale


def _generate_cached(
    model, prompts, prompt_lens, max_new_tokens, block_size, eos_id, sample
) -> list[list[int]]:
    cache = model_cache(model, prompt_lens, max_new_tokens, block_size)
    try:
        return _generate_in(cache, model, prompts, prompt_lens, max_new_tokens, eos_id, sample)
    finally:
        keep_cache(model, cache)  # reset by the next call, whatever this one left


def _generate_in(
    cache, model, prompts, prompt_lens, max_new_tokens, eos_id, sample
) -> list[list[int]]:
    seq_ids = [cache.allocate() for _ in prompt_lens]
    for seq_id, length in zip(seq_ids, prompt_lens, strict=True):
        cache.reserve(seq_id, length + max_new_tokens)  # each sequence on consecutive pages
    outputs: list[list[int]] = [[] for _ in prompt_lens]
    tokens = sample(prefill(model, prompts, cache, seq_ids))
    active = list(range(len(prompt_lens)))
    while True:
        keep = []
        for row, token in enumerate(tokens.tolist()):  # the step's one host transfer
            prompt = active[row]
            outputs[prompt].append(token)
            if token == eos_id or len(outputs[prompt]) == max_new_tokens:
                cache.free(seq_ids[prompt])
            else:
                keep.append(row)
        if not keep:
            return outputs
        if len(keep) < len(active):
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
            active = [active[row] for row in keep]
        tokens = sample(decode_step(model, tokens, cache, [seq_ids[p] for p in active]))


# ----------------------------------------------------------------------------- uncached path
def append_tokens(prompts, new_tokens: list[list[int]]) -> SimpleNamespace:
    """The prompts with ``new_tokens[b]`` appended to prompt ``b``, as a batch.

    The appended tokens are plain tokens (feature_index and image_index -1);
    spans keep their tokens, shifted to their document's new offset; the
    encoders' inputs and the images are unchanged. Labels are not built.
    """
    cu = prompts.cu_seqlens.tolist()
    device = prompts.input_ids.device
    extra = [len(tokens) for tokens in new_tokens]
    shift = [0]
    for count in extra:
        shift.append(shift[-1] + count)
    pieces: dict[str, list[torch.Tensor]] = {
        "input_ids": [],
        "feature_index": [],
        "image_index": [],
    }
    image_index = getattr(prompts, "image_index", None)
    if image_index is None:
        image_index = torch.full_like(prompts.input_ids, -1)
    for b, tokens in enumerate(new_tokens):
        start, end = cu[b], cu[b + 1]
        appended = torch.tensor(tokens, dtype=prompts.input_ids.dtype, device=device)
        blank = torch.full((len(tokens),), -1, dtype=torch.int64, device=device)
        pieces["input_ids"] += [prompts.input_ids[start:end], appended]
        pieces["feature_index"] += [prompts.feature_index[start:end], blank]
        pieces["image_index"] += [image_index[start:end], blank]
    cu_new = torch.tensor(
        [c + s for c, s in zip(cu, shift)],
        dtype=prompts.cu_seqlens.dtype,
        device=prompts.cu_seqlens.device,
    )
    span_doc = (
        torch.searchsorted(
            prompts.cu_seqlens.to(torch.int64), prompts.span_starts.to(torch.int64), right=True
        )
        - 1
    )
    span_shift = torch.tensor(shift, dtype=torch.int64, device=prompts.span_starts.device)[
        span_doc.clamp(min=0)
    ]
    return SimpleNamespace(
        input_ids=torch.cat(pieces["input_ids"]),
        cu_seqlens=cu_new,
        span_starts=prompts.span_starts + span_shift,
        span_ends=prompts.span_ends + span_shift,
        encoder_ids=prompts.encoder_ids,
        encoder_cu_seqlens=prompts.encoder_cu_seqlens,
        feature_index=torch.cat(pieces["feature_index"]),
        images=getattr(prompts, "images", None),
        image_index=torch.cat(pieces["image_index"]),
    )


def _generate_uncached(
    model, prompts, prompt_lens, max_new_tokens, eos_id, sample
) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in prompt_lens]
    active = list(range(len(prompt_lens)))
    while active:
        batch = append_tokens(prompts, outputs)
        cu = batch.cu_seqlens.tolist()
        last = torch.tensor([cu[p + 1] - 1 for p in active], device=batch.input_ids.device)
        tokens = sample(model.logits(batch)[last])
        keep = []
        for prompt, token in zip(active, tokens.tolist()):
            outputs[prompt].append(token)
            if token != eos_id and len(outputs[prompt]) < max_new_tokens:
                keep.append(prompt)
        active = keep
    return outputs


# ----------------------------------------------------------------------------- public
@torch.no_grad()
def generate(
    model,
    prompts,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    block_size: int = 16,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Parameters
    ----------
    model : a MetaLM (``decoder_inputs``, ``embedding``, ``decoder``, ``lm_head``, ``logits``).
    prompts : a batch with the SemiCausalBatch attributes (input_ids, cu_seqlens
        [B + 1], span_starts/span_ends, encoder_ids, encoder_cu_seqlens,
        feature_index, images, image_index), one document per prompt, each
        non-empty; labels are ignored. Or text-only prompts as lists of token ids
        (:func:`token_prompts`).
    max_new_tokens : int >= 0; 0 returns empty lists. A request whose KV pool
        cannot fit (:func:`check_fits`) raises RequestTooLargeError, a ValueError
        naming max_new_tokens and the bytes needed, before anything is allocated.
    do_sample : greedy (False) or sampling (True).
    top_p : nucleus mass in (0, 1]; 1 keeps every token.
    temperature : > 0 when sampling; divides the logits before the softmax.
    eos_id : a sequence stops after this token (which is returned).
    generator : the random source of sampling (seed it to reproduce a run).
    block_size : tokens per KV-cache page.
    use_cache : paged KV cache (fast) or full recomputation every step (reference).

    Returns
    -------
    list of B lists of new token ids.

    Raises
    ------
    TypeError : an argument of the wrong type (a bool or float where an int goes),
        named.
    ValueError : an argument out of range, named; RequestTooLargeError when the
        request cannot fit; with ``use_cache`` and a decoder ``sliding_window``, a
        request whose decode steps would attend more tokens than the window.

    Example
    -------
    >>> import torch
    >>> from metalm_fast.models import PRESETS, MetaLM
    >>> from types import SimpleNamespace
    >>> model = MetaLM(PRESETS["tiny"])
    >>> ids = torch.tensor([5, 6, 7, 8, 9])
    >>> prompts = SimpleNamespace(
    ...     input_ids=ids, cu_seqlens=torch.tensor([0, 2, 5]),
    ...     span_starts=torch.zeros(0, dtype=torch.int64),
    ...     span_ends=torch.zeros(0, dtype=torch.int64),
    ...     encoder_ids=ids[:0], encoder_cu_seqlens=torch.tensor([0]),
    ...     feature_index=torch.full((5,), -1), images=None, image_index=None)
    >>> [len(new) for new in model.generate(prompts, max_new_tokens=3)]
    [3, 3]
    """
    _check_arguments(max_new_tokens, do_sample, top_p, temperature, eos_id, block_size)
    if isinstance(prompts, (list, tuple)):
        prompts = token_prompts(prompts, model.embedding.weight.device)
    prompt_lens = _prompt_lengths(prompts)
    if max_new_tokens == 0:
        return [[] for _ in prompt_lens]
    # Checked here, not only where the pool is allocated: a refused request keeps the
    # model's pool (model_cache drops it before allocating a larger one).
    if use_cache:
        _check_window(model, prompt_lens, max_new_tokens)
        check_fits(model, prompt_lens, max_new_tokens, block_size)
    else:
        _check_addressable(prompt_lens, max_new_tokens)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(
            logits, do_sample=do_sample, top_p=top_p, temperature=temperature, generator=generator
        )

    # inference_mode on top of no_grad: no version counters or view tracking on the
    # cache's in-place appends and the custom ops (a quarter of a small model's decode
    # step on CPU). Only host lists leave this function; the one inference tensor kept,
    # the model's KV pool, is only ever used again here, under inference_mode.
    with torch.inference_mode():
        if use_cache:
            return _generate_cached(
                model, prompts, prompt_lens, max_new_tokens, block_size, eos_id, sample
            )
        return _generate_uncached(model, prompts, prompt_lens, max_new_tokens, eos_id, sample)
