"""PagedKVCache: the pool of key/value pages of every layer, and its page allocator.

Layout (as in vLLM and FlashInfer; the op that writes it is
:func:`metalm_fast.ops.kv_cache_append.kv_cache_append`): one pool of
``num_blocks`` pages per layer, for keys and for values, each page
``[block_size, Hkv, D]``; a token's slot is ``block * block_size + offset`` and
``block_table[b]`` lists sequence b's pages in order.

Sequences of any length share the pool with no fragmentation beyond each
sequence's last, partly filled page; pages come from and return to a free list.
A pool outlives the sequences it serves: :meth:`PagedKVCache.reset` returns
every page at once, so a generation can reuse the pool of the previous one
(metalm_fast.models.generation does) instead of allocating and zero-filling a
fresh one. Pages handed out again hold the keys and values of earlier
sequences until they are overwritten; nothing reads them, since every kernel
reads only the first ``seq_lens[b]`` tokens of a sequence.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from metalm_fast.checks import integer
from metalm_fast.ops.host_memory import zeros_on_huge_pages
from metalm_fast.ops.kv_cache_append import CACHE_DTYPES, kv_cache_append

__all__ = ["CacheStep", "KVCacheFullError", "PagedKVCache"]


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
    num_layers, num_blocks, block_size, num_kv_heads, head_dim : ints > 0; the
        pool's ``num_blocks * block_size`` tokens must fit int32 (the block
        table and the lengths the kernels read are int32).
    dtype : floating dtype of keys and values.
    device : where the pool lives.

    The pool is one zero-initialised tensor ``[num_layers, 2, num_blocks,
    block_size, Hkv, D]``;
    :meth:`key_cache` / :meth:`value_cache` are views of one layer. Sequence
    bookkeeping (pages and lengths) is host-side Python; a step's block table,
    lengths and slots are built once and shared by all layers.

    Every allocating call is all-or-nothing: when the pool cannot hold a request,
    :class:`KVCacheFullError` is raised and no sequence, page or slot changes.
    Sequence ids, token counts and layers are ints (numpy integers too): a bool
    or a float raises TypeError naming the argument (``free(True)`` would
    otherwise free sequence 1, and ``free(1.0)`` too).

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
        sizes = {
            "num_layers": num_layers,
            "num_blocks": num_blocks,
            "block_size": block_size,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
        }
        for name, value in sizes.items():
            if integer(value, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_blocks * block_size > _INT32_MAX:
            raise ValueError(
                f"num_blocks * block_size = {num_blocks} * {block_size} tokens must be at most "
                f"2**31 - 1: block tables and lengths are int32"
            )
        num_layers, num_blocks, block_size = int(num_layers), int(num_blocks), int(block_size)
        num_kv_heads, head_dim = int(num_kv_heads), int(head_dim)
        if dtype not in CACHE_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu":  # 2 MiB pages: see ops/host_memory.py
            self.kv = zeros_on_huge_pages(shape, dtype)
        else:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        # Each layer's key and value views, made once (every decode step asks for them).
        self._views = [(self.kv[layer, 0], self.kv[layer, 1]) for layer in range(num_layers)]
        self._next_id = 0
        self.reset()

    def reset(self) -> None:
        """End every sequence: all pages are free again, handed out in a fresh pool's order.

        The pool's values are left as they are (see the module docstring); sequence
        ids keep counting up, so an id from before the reset is never valid again.
        """
        # A stack: pop() hands out the lowest free page first, so a fresh (or reset)
        # cache fills pages 0, 1, 2, ... (readable slots in tests and debugging).
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
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

    @property
    def num_sequences(self) -> int:
        """Sequences allocated and not freed."""
        return len(self._lengths)

    def key_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, Hkv, D] keys of ``layer`` (a view)."""
        return self._views[self._layer(layer)][0]

    def value_cache(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, Hkv, D] values of ``layer`` (a view)."""
        return self._views[self._layer(layer)][1]

    def _layer(self, layer: int) -> int:
        if not 0 <= integer(layer, "layer") < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    # ------------------------------------------------------------------ sequences
    def allocate(self, num_tokens: int = 0) -> int:
        """Start a sequence holding ``num_tokens`` tokens; returns its id."""
        seq_id = self._next_id
        self._reserve({seq_id: integer(num_tokens, "num_tokens", minimum=0)}, new={seq_id})
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
        seq_id = self._known(seq_id)
        wanted = self._blocks_for(integer(num_tokens, "num_tokens", minimum=0)) - len(
            self._pages[seq_id]
        )
        if wanted > 0:
            self._check_free(wanted)
            self._take_pages(seq_id, wanted)

    def free(self, seq_id: int) -> None:
        """End a sequence and return its pages to the pool."""
        seq_id = self._known(seq_id)
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lengths[seq_id]

    def seq_len(self, seq_id: int) -> int:
        return self._lengths[self._known(seq_id)]

    def _known(self, seq_id: int) -> int:
        # Type first: True == 1 and 1.0 == 1 would find sequence 1 in the dict.
        seq_id = integer(seq_id, "seq_ids")
        if seq_id not in self._lengths:
            raise ValueError(f"seq_ids: sequence {seq_id!r} is not allocated (or was freed)")
        return seq_id

    def _batch(self, seq_ids, num_tokens) -> tuple[list[int], list[int]]:
        one_id = isinstance(seq_ids, (numbers.Number, bool))  # checked by _known
        ids = [seq_ids] if one_id else list(seq_ids)
        one_count = isinstance(num_tokens, (numbers.Number, bool))
        counts = [num_tokens] * len(ids) if one_count else list(num_tokens)
        if len(counts) != len(ids):
            raise ValueError(f"num_tokens has {len(counts)} entries but seq_ids has {len(ids)}")
        ids = [self._known(seq_id) for seq_id in ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {ids}")
        return ids, [integer(n, "num_tokens", minimum=0) for n in counts]

    def _reserve(self, growth: dict[int, int], new: set[int] = frozenset()) -> None:
        """Give each sequence the pages for its extra tokens, or raise and change nothing."""
        wanted = {  # reserved pages (reserve) may already cover the growth
            seq_id: max(
                0,
                self._blocks_for(self._lengths.get(seq_id, 0) + extra)
                - len(self._pages.get(seq_id, ())),
            )
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
    def slot_mapping(self, seq_ids: Sequence[int], num_tokens: int | Sequence[int]) -> torch.Tensor:
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
            slots += [
                pages[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(length - count, length)
            ]
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
        positions = [
            p for start, n in zip(context, counts, strict=True) for p in range(start, start + n)
        ]
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

    def append(
        self,
        layer: int,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        backend: str = "auto",
    ) -> None:
        """:func:`kv_cache_append` into ``layer``'s pages."""
        kv_cache_append(
            self.key_cache(layer),
            self.value_cache(layer),
            k_new,
            v_new,
            slot_mapping,
            backend=backend,
        )

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, blocks={self.num_blocks} x "
            f"{self.block_size}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"{self.dtype}, {self.device}, sequences={self.num_sequences}, "
            f"free_blocks={self.num_free_blocks})"
        )


_INT32_MAX = 2**31 - 1
