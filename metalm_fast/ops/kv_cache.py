"""The paged KV cache: its allocator (:class:`PagedKVCache`) and the append op.

Layout (as in vLLM and FlashInfer): one pool of ``num_blocks`` pages per layer,
for keys and for values, each page ``[block_size, Hkv, D]``::

    k_cache, v_cache : [num_blocks, block_size, Hkv, D]
    slot             = block * block_size + offset       (a token's place in the pool)
    block_table[b]   = the pages of sequence b, in order  (int32 [B, max_blocks])
    key p of b       = k_cache[block_table[b, p // block_size], p % block_size]

Sequences of any length share the pool with no fragmentation beyond each
sequence's last, partly filled page; pages come from and return to a free list.

:func:`kv_cache_append` writes new keys and values into their slots in place.
It is data movement, so every backend is a bit-exact copy. Slots < 0 are
skipped (padding); slots past the pool raise with ``validate=True`` and are
never written in any case (the kernels mask them).

Layers, as for the other ops: the ``metalm::kv_cache_append`` custom op (it
mutates the caches, has a fake implementation so ``torch.compile`` traces it,
and no autograd: the cache holds values, not a graph) and the public function
that validates on the host and picks a backend.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from metalm_fast import reference
from metalm_fast.ops._backend import (
    cpu_extension,
    cuda_extension,
    eager_inference,
    resolve_backend,
)
from metalm_fast.ops._host_memory import zeros_on_huge_pages
from metalm_fast.ops._validation import FLOAT_DTYPES, check_float_tensor, check_index_tensor

__all__ = ["CacheStep", "KVCacheFullError", "PagedKVCache", "kv_cache_append"]

_SUPPORTED = ("triton", "cuda", "cpu", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COMPILED_OPS = {"cpu": "_kv_cache_append_cpu", "cuda": "_kv_cache_append_cuda"}


# ----------------------------------------------------------------------------- backends
def compiled_op_missing(backend: str, op_name: str) -> str | None:
    """Why ``torch.ops.metalm.<op_name>`` is missing from a built extension, or None.

    An extension built before an op was added imports fine but lacks the op;
    that must read as "not built", not as an AttributeError deep in a call.
    """
    extension = cpu_extension() if backend == "cpu" else cuda_extension()
    if extension is not None and not hasattr(torch.ops.metalm, op_name):
        module = "_C" if backend == "cpu" else "_cuda"
        return (
            f"metalm_fast.{module} was built without {op_name}; rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
    return None


# Eager under torch.compile (imports, environment, warnings), as resolve_backend is.
@torch.compiler.assume_constant_result
def resolve_with_compiled_op(
    op: str, backend: str, device: torch.device, supported: tuple[str, ...], ops: dict[str, str]
) -> str:
    """:func:`resolve_backend`, plus a check that the compiled backend holds this op.

    An explicit request for a stale build raises ValueError; "auto" falls back to
    the next backend (the reference, on CPU) with a warning, as a missing build does.
    """
    resolved = resolve_backend(op, backend, device, supported)
    if resolved not in ops:
        return resolved
    reason = compiled_op_missing(resolved, ops[resolved])
    if reason is None:
        return resolved
    from_environment = os.environ.get("METALM_FAST_BACKEND", "auto") not in ("", "auto")
    if backend != "auto" or from_environment:
        raise ValueError(f"{op}: backend {resolved!r} is not available: {reason}")
    fallback = "triton" if resolved == "cuda" and "triton" in supported else "reference"
    warnings.warn(f"metalm_fast.{op}: using the {fallback} backend because {reason}",
                  RuntimeWarning, stacklevel=3)
    return fallback


def _append_triton(k_cache, v_cache, k_new, v_new, slot_mapping):
    from metalm_fast.kernels.kv_cache_append import kv_cache_append_forward

    kv_cache_append_forward(k_cache, v_cache, k_new, v_new, slot_mapping)


def _append_cuda(k_cache, v_cache, k_new, v_new, slot_mapping):
    cuda_extension()
    torch.ops.metalm._kv_cache_append_cuda(k_cache, v_cache, k_new, v_new, slot_mapping)


def _append_cpu(k_cache, v_cache, k_new, v_new, slot_mapping):
    cpu_extension()
    torch.ops.metalm._kv_cache_append_cpu(k_cache, v_cache, k_new, v_new, slot_mapping)


_APPEND = {
    "triton": _append_triton,
    "cuda": _append_cuda,
    "cpu": _append_cpu,
    "reference": reference.kv_cache_append,
}


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("metalm::kv_cache_append", mutates_args=("k_cache", "v_cache"))
def _kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str,
) -> None:
    """Writes k_new / v_new into their slots of k_cache / v_cache, in place."""
    _APPEND[backend](k_cache, v_cache, k_new, v_new, slot_mapping)


@_kv_cache_append.register_fake
def _(k_cache, v_cache, k_new, v_new, slot_mapping, backend):
    return None


# ----------------------------------------------------------------------------- validation
def check_cache_pair(k_cache, v_cache) -> None:
    """Both caches: 4-D, floating, last dim contiguous, one shape, dtype and device."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_float_tensor(name, cache, "4-D [num_blocks, block_size, Hkv, D]",
                           dtype_text="a floating dtype")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(
            f"k_cache and v_cache must have the same dtype, got {k_cache.dtype} and {v_cache.dtype}"
        )
    if k_cache.device != v_cache.device:
        raise ValueError(
            f"k_cache and v_cache must be on one device, got {k_cache.device} and {v_cache.device}"
        )


def _check_new(name: str, new, cache_name: str, cache: torch.Tensor) -> None:
    check_float_tensor(name, new, "3-D [T, Hkv, D]", dtype_text="a floating dtype")
    if new.shape[1:] != cache.shape[2:]:
        raise ValueError(
            f"{name} has [Hkv, D] = {list(new.shape[1:])} but {cache_name} holds "
            f"[Hkv, D] = {list(cache.shape[2:])}"
        )
    if new.dtype != cache.dtype:
        raise TypeError(
            f"{name} dtype {new.dtype} must equal {cache_name} dtype {cache.dtype} "
            "(the append is a bit-exact copy; cast first)"
        )
    if new.device != cache.device:
        raise ValueError(f"{name} is on {new.device} but {cache_name} is on {cache.device}")


def _check_append_inputs(k_cache, v_cache, k_new, v_new, slot_mapping) -> None:
    check_cache_pair(k_cache, v_cache)
    _check_new("k_new", k_new, "k_cache", k_cache)
    _check_new("v_new", v_new, "v_cache", v_cache)
    if k_new.shape[0] != v_new.shape[0]:
        raise ValueError(
            f"k_new and v_new must have the same number of tokens, got {k_new.shape[0]} "
            f"and {v_new.shape[0]}"
        )
    check_index_tensor("slot_mapping", slot_mapping, "1-D [T]")
    if slot_mapping.shape[0] != k_new.shape[0]:
        raise ValueError(
            f"slot_mapping must be 1-D with one slot per new token ({k_new.shape[0]}), "
            f"got shape {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.device != k_cache.device:
        raise ValueError(
            f"slot_mapping is on {slot_mapping.device} but k_cache is on {k_cache.device}"
        )


def _check_slots(slot_mapping: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """validate=True: every slot < num_blocks * block_size, no slot twice (one sync)."""
    num_slots = num_blocks * block_size
    slots = slot_mapping.to(torch.int64)
    outside = slots >= num_slots
    if bool(outside.any()):
        index = int(torch.nonzero(outside)[0, 0])
        raise ValueError(
            f"slot_mapping[{index}] = {int(slots[index])} is outside the pool: slots must be < "
            f"num_blocks * block_size = {num_blocks} * {block_size} = {num_slots} (or < 0 to skip)"
        )
    used = slots[slots >= 0]
    if used.numel() != torch.unique(used).numel():
        ordered = torch.sort(used).values
        repeated = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise ValueError(
            f"slot_mapping writes slot {repeated} more than once; slots must be distinct"
        )


# ----------------------------------------------------------------------------- public API
def kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = False,
    backend: str = "auto",
) -> None:
    """Write new keys and values into their slots of a paged cache, in place.

    ::

        k_cache[s // block_size, s % block_size] = k_new[t]     s = slot_mapping[t] >= 0
        v_cache[s // block_size, s % block_size] = v_new[t]

    Parameters
    ----------
    k_cache, v_cache : [num_blocks, block_size, Hkv, D], one floating dtype and
        device; only the last dim must be contiguous.
    k_new, v_new : [T, Hkv, D] in the caches' dtype (slices of a fused qkv
        projection work as they are).
    slot_mapping : int32/int64 [T]. A slot < 0 skips its token (padding).
    validate : check that every slot is inside the pool and that no slot repeats
        (one device synchronisation). Without it, slots past the pool are
        skipped, never written; with repeats, which write lands is unspecified.
    backend : {"auto", "triton", "cuda", "cpu", "reference"}. "auto" picks triton
        on CUDA tensors and cpu on CPU tensors.

    Returns
    -------
    None. The copy is bit-exact on every backend. No gradient flows into the
    cache (k_new and v_new are written detached).

    Example
    -------
    >>> import torch
    >>> from metalm_fast import kv_cache_append
    >>> k_cache, v_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
    >>> k_new, v_new = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    >>> kv_cache_append(k_cache, v_cache, k_new, v_new, torch.tensor([17, 18, -1]))
    >>> bool((k_cache[1, 1] == k_new[0]).all())
    True
    """
    resolved = checked_append_backend(k_cache, v_cache, k_new, v_new, slot_mapping,
                                      validate=validate, backend=backend)
    append_unchecked(k_cache, v_cache, k_new, v_new, slot_mapping, resolved)


def checked_append_backend(k_cache, v_cache, k_new, v_new, slot_mapping, *,
                           validate: bool = False, backend: str = "auto") -> str:
    """Every check of :func:`kv_cache_append`; returns the backend that serves the call."""
    _check_append_inputs(k_cache, v_cache, k_new, v_new, slot_mapping)
    if validate:
        _check_slots(slot_mapping, k_cache.shape[0], k_cache.shape[1])
    resolved = resolve_with_compiled_op(
        "kv_cache_append", backend, k_cache.device, _SUPPORTED, _COMPILED_OPS
    )
    if resolved == "triton" and k_cache.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"the triton backend supports float16, bfloat16 and float32, got {k_cache.dtype} "
            "(k_cache)"
        )
    return resolved


def append_unchecked(k_cache, v_cache, k_new, v_new, slot_mapping, backend: str) -> None:
    """:func:`kv_cache_append` without its checks, on a backend from
    :func:`checked_append_backend`.

    Internal: for a caller that ran those checks on arguments of the same shapes,
    dtypes, devices and strides (the layers of one decode step share a pool and a
    slot mapping; metalm_fast.nn.kv_cache_attention checks the first layer only).
    """
    if eager_inference():
        _APPEND[backend](k_cache, v_cache, k_new, v_new, slot_mapping)
        return
    _kv_cache_append(k_cache, v_cache, k_new.detach(), v_new.detach(), slot_mapping, backend)


# ----------------------------------------------------------------------------- allocator
class KVCacheFullError(RuntimeError):
    """The pool has too few free pages; nothing was allocated or written."""


@dataclass(frozen=True)
class CacheStep:
    """What one forward pass adds to the cache, shared by every layer.

    Built by :meth:`PagedKVCache.step` after the sequences were extended.

    Attributes
    ----------
    seq_ids : the sequences, in batch order.
    query_lens : new tokens per sequence (host ints); the new tokens are packed
        in this order.
    context_lens : tokens each sequence held before this step (host ints).
    slot_mapping : int64 [T_new], the slot of every new token.
    positions : int64 [T_new], every new token's position in its sequence (rotary).
    cu_seqlens : int32 [B + 1], offsets of each sequence's new tokens.
    block_table : int32 [B, max_blocks], pages of each sequence (0-padded).
    seq_lens : int32 [B], tokens per sequence after this step.
    is_decode : one new token per sequence (the paged decode kernel serves the step).
    num_tokens : new tokens in all (T_new).
    memo : values derived from the step once and reused by every layer (rotary
        cos/sin, the checked decode ops of metalm_fast.nn.kv_cache_attention);
        filled by the layers of the forward pass that uses the step.

    ``is_decode`` and ``num_tokens`` are computed once, when the step is built: a
    decoder reads them in every layer of every step.
    """

    seq_ids: tuple[int, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    is_decode: bool = field(init=False)
    num_tokens: int = field(init=False)
    memo: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_decode", all(n == 1 for n in self.query_lens))
        object.__setattr__(self, "num_tokens", sum(self.query_lens))
        object.__setattr__(self, "memo", {})


class PagedKVCache:
    """A pool of key/value pages for every layer, with a free-list allocator.

    Parameters
    ----------
    num_layers, num_blocks, block_size, num_kv_heads, head_dim : ints > 0.
    dtype : floating dtype of keys and values.
    device : where the pool lives.

    The pool is one zero-initialised tensor ``[num_layers, 2, num_blocks,
    block_size, Hkv, D]`` (on the CPU on 2 MiB pages where the kernel allows);
    :meth:`key_cache` / :meth:`value_cache` are views of one layer. Sequence
    bookkeeping (pages and lengths) is host-side Python; a step's block table,
    lengths and slots are built once and shared by all layers.

    Every allocating call is all-or-nothing: when the pool cannot hold a request,
    :class:`KVCacheFullError` is raised and no sequence, page or slot changes.

    Example
    -------
    >>> import torch
    >>> from metalm_fast import PagedKVCache
    >>> cache = PagedKVCache(2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16)
    >>> seq = cache.allocate()
    >>> step = cache.step([seq], [6])          # a 6-token prompt: 2 pages
    >>> step.slot_mapping.tolist(), cache.num_free_blocks
    ([0, 1, 2, 3, 4, 5], 6)
    >>> cache.free(seq)
    >>> cache.num_free_blocks
    8
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        sizes = {"num_layers": num_layers, "num_blocks": num_blocks, "block_size": block_size,
                 "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu":  # 2 MiB pages: see ops/_host_memory.py
            self.kv = zeros_on_huge_pages(shape, dtype)
        else:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        # Each layer's key and value views, made once (every decode step asks for them).
        self._views = [(self.kv[layer, 0], self.kv[layer, 1]) for layer in range(num_layers)]
        # A stack: pop() hands out the lowest free page first, so a fresh cache
        # fills pages 0, 1, 2, ... (readable slots in tests and debugging).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self._table_cache: tuple[tuple, torch.Tensor] | None = None  # _step_block_table

    # ------------------------------------------------------------------ pool views
    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def key_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, Hkv, D] keys of ``layer`` (a view)."""
        return self._views[self._layer(layer)][0]

    def value_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, Hkv, D] values of ``layer`` (a view)."""
        return self._views[self._layer(layer)][1]

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    # ------------------------------------------------------------------ sequences
    def allocate(self, num_tokens: int = 0) -> int:
        """Start a sequence holding ``num_tokens`` tokens; returns its id."""
        seq_id = self._next_id
        self._reserve({seq_id: _count("num_tokens", num_tokens)}, new={seq_id})
        self._next_id += 1
        return seq_id

    def extend(self, seq_ids: int | Sequence[int], num_tokens: int | Sequence[int]) -> torch.Tensor:
        """Grow sequences by ``num_tokens`` each; returns the new tokens' slots (int64).

        All or nothing: on :class:`KVCacheFullError` no sequence grows.
        """
        ids, counts = self._batch(seq_ids, num_tokens)
        self._reserve(dict(zip(ids, counts, strict=True)))
        return self.slot_mapping(ids, counts)

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Give ``seq_id`` the pages for ``num_tokens`` tokens in all now; its length stays.

        Its later tokens then land on pages taken together (consecutive in a fresh
        pool) instead of one page at a time among other sequences' pages, and the
        CPU decode kernel streams a sequence on consecutive pages faster. Pages
        already held count toward ``num_tokens``. All or nothing, as every
        allocating call.
        """
        self._known(seq_id)
        wanted = self._blocks_for(_count("num_tokens", num_tokens)) - len(self._pages[seq_id])
        if wanted > 0:
            self._check_free(wanted)
            self._take_pages(seq_id, wanted)

    def free(self, seq_id: int) -> None:
        """End a sequence and return its pages to the pool."""
        self._known(seq_id)
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lengths[seq_id]

    def seq_len(self, seq_id: int) -> int:
        return self._lengths[self._known(seq_id)]

    def _known(self, seq_id: int) -> int:
        if seq_id not in self._lengths:
            raise ValueError(f"seq_ids: sequence {seq_id!r} is not allocated (or was freed)")
        return seq_id

    def _batch(self, seq_ids, num_tokens) -> tuple[list[int], list[int]]:
        ids = [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)
        counts = [num_tokens] * len(ids) if isinstance(num_tokens, int) else list(num_tokens)
        if len(counts) != len(ids):
            raise ValueError(
                f"num_tokens has {len(counts)} entries but seq_ids has {len(ids)}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {ids}")
        for seq_id in ids:
            self._known(seq_id)
        return ids, [_count("num_tokens", n) for n in counts]

    def _reserve(self, growth: dict[int, int], new: set[int] = frozenset()) -> None:
        """Give each sequence the pages for its extra tokens, or raise and change nothing."""
        wanted = {  # reserved pages (reserve) may already cover the growth
            seq_id: max(0, self._blocks_for(self._lengths.get(seq_id, 0) + extra)
                        - len(self._pages.get(seq_id, ())))
            for seq_id, extra in growth.items()
        }
        self._check_free(sum(wanted.values()))
        for seq_id, extra in growth.items():
            if seq_id in new:
                self._pages[seq_id], self._lengths[seq_id] = [], 0
            self._take_pages(seq_id, wanted[seq_id])
            self._lengths[seq_id] += extra

    def _take_pages(self, seq_id: int, count: int) -> None:
        """Move ``count`` free pages (checked free) to the end of ``seq_id``'s pages."""
        self._pages[seq_id].extend(self._free.pop() for _ in range(count))

    def _check_free(self, needed: int) -> None:
        if needed > len(self._free):
            raise KVCacheFullError(
                f"KV cache pool exhausted: this request needs {needed} more pages of "
                f"{self.block_size} tokens but only {len(self._free)} of {self.num_blocks} are "
                "free; nothing was allocated. Free finished sequences or build a larger "
                "PagedKVCache (num_blocks)."
            )

    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ------------------------------------------------------------------ index tensors
    def slot_mapping(
        self, seq_ids: Sequence[int], num_tokens: int | Sequence[int]
    ) -> torch.Tensor:
        """int64 slots of the last ``num_tokens`` tokens of each sequence, packed in order."""
        ids, counts = self._batch(seq_ids, num_tokens)
        for seq_id, count in zip(ids, counts, strict=True):
            if count > self._lengths[seq_id]:
                raise ValueError(
                    f"num_tokens: sequence {seq_id} holds only {self._lengths[seq_id]} tokens"
                )
        return self._slots(ids, counts)

    def _slots(self, ids: list[int], counts: list[int]) -> torch.Tensor:
        slots = []
        for seq_id, count in zip(ids, counts, strict=True):
            length, pages = self._lengths[seq_id], self._pages[seq_id]
            slots += [pages[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(length - count, length)]
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 [B, max pages of the batch]: each sequence's pages, padded with 0."""
        rows = [self._pages[self._known(seq_id)] for seq_id in seq_ids]
        width = max((len(row) for row in rows), default=0)
        table = [row + [0] * (width - len(row)) for row in rows]
        return torch.tensor(table, dtype=torch.int32, device=self.device).reshape(len(rows), width)

    def _step_block_table(self, ids: list[int]) -> torch.Tensor:
        """:meth:`block_table` for :meth:`step`, shared by consecutive steps while it holds.

        A sequence's pages only grow (at its end) and ids are never reused, so the ids
        and their page counts name the table: decode steps reuse it until a sequence
        takes a new page (every block_size steps) instead of rebuilding it from
        B x max_blocks host ints every step. Nothing writes into a step's tensors.
        """
        key = (tuple(ids), tuple(len(self._pages[seq_id]) for seq_id in ids))
        if self._table_cache is None or self._table_cache[0] != key:
            self._table_cache = (key, self.block_table(ids))
        return self._table_cache[1]

    def seq_lens(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 [B]: tokens held by each sequence."""
        lengths = [self._lengths[self._known(seq_id)] for seq_id in seq_ids]
        return torch.tensor(lengths, dtype=torch.int32, device=self.device)

    def step(self, seq_ids: Sequence[int], num_new_tokens: int | Sequence[int]) -> CacheStep:
        """Extend the sequences by their new tokens and describe the step for every layer."""
        ids, counts = self._batch(seq_ids, num_new_tokens)  # checked once, here
        context = [self._lengths[seq_id] for seq_id in ids]
        self._reserve(dict(zip(ids, counts, strict=True)))
        positions = [p for start, n in zip(context, counts, strict=True)
                     for p in range(start, start + n)]
        cu = [0]
        for n in counts:
            cu.append(cu[-1] + n)
        lengths = [start + n for start, n in zip(context, counts, strict=True)]
        return CacheStep(
            seq_ids=tuple(ids),
            query_lens=tuple(counts),
            context_lens=tuple(context),
            slot_mapping=self._slots(ids, counts),
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=self.device),
            block_table=self._step_block_table(ids),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
        )

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
               slot_mapping: torch.Tensor, *, backend: str = "auto") -> None:
        """:func:`kv_cache_append` into ``layer``'s pages."""
        kv_cache_append(self.key_cache(layer), self.value_cache(layer), k_new, v_new,
                        slot_mapping, backend=backend)

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, blocks={self.num_blocks} x "
            f"{self.block_size}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"{self.dtype}, {self.device}, sequences={len(self._lengths)}, "
            f"free_blocks={self.num_free_blocks})"
        )


def _count(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value
