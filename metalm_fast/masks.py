"""SpanMask: the interval attention mask every MetaLM layer uses.

Tokens are packed (varlen). Every mask MetaLM needs lets each query attend one
contiguous interval of keys, so a mask is two int32 vectors of length Tq::

    query t attends key j  <=>  kv_start[t] <= j < kv_end[t]

Pictures for two documents of lengths 4 and 3 (``x`` = attended)::

    causal             bidirectional      semi-causal, span [1, 3) in doc 0
    x . . . . . .      x x x x . . .      x . . . . . .
    x x . . . . .      x x x x . . .      x x x . . . .
    x x x . . . .      x x x x . . .      x x x . . . .
    x x x x . . .      x x x x . . .      x x x x . . .
    . . . . x . .      . . . . x x x      . . . . x . .
    . . . . x x .      . . . . x x x      . . . . x x .
    . . . . x x x      . . . . x x x      . . . . x x x

Memory is O(T) and every constructor runs in O(T) (O(T log S) with S spans);
no T x T mask is ever built except by :meth:`SpanMask.to_dense`, which exists
for tests and debugging. Index contents are validated here, where the mask is
built, so kernels can trust them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalm_fast.checks import index_vector, integer

__all__ = ["SpanMask"]


#: Intervals are stored as int32; every bound is checked in int64 against this first.
_INT32_LIMIT = 2**31


def _check_same_device(tensor: torch.Tensor, name: str, device: torch.device, other: str) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} must be on {other}'s device {device}, got {tensor.device}")


def _check_intervals(kv_start, kv_end, num_keys) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(start, end) as int64 and num_keys as int, after every check of an explicit
    mask: one length, one device, 0 <= start <= end <= num_keys < 2**31 (in int64,
    so 2**32 + 3 is rejected rather than narrowed to 3). num_keys None means Tq."""
    start = index_vector(kv_start, "kv_start")
    end = index_vector(kv_end, "kv_end", start.device)
    if start.numel() != end.numel():
        raise ValueError(
            f"kv_start and kv_end must have the same length, got {start.numel()} and {end.numel()}"
        )
    if start.device != end.device:
        raise ValueError(
            f"kv_start and kv_end must be on one device, got {start.device} and {end.device}"
        )
    num_keys = start.numel() if num_keys is None else integer(num_keys, "num_keys")
    if num_keys < 0:
        raise ValueError(f"num_keys must be a non-negative int, got {num_keys!r}")
    if num_keys >= _INT32_LIMIT:
        raise ValueError(f"num_keys must be below 2**31, got {num_keys}")
    if start.numel():
        if bool((start > end).any()):
            bad = int(torch.nonzero(start > end)[0, 0])
            raise ValueError(
                f"kv_start[{bad}]={int(start[bad])} is greater than kv_end[{bad}]={int(end[bad])}"
            )
        if bool((start < 0).any()):
            bad = int(torch.nonzero(start < 0)[0, 0])
            raise ValueError(f"kv_start[{bad}]={int(start[bad])} is negative")
        if bool((end > num_keys).any()):
            bad = int(torch.nonzero(end > num_keys)[0, 0])
            raise ValueError(f"kv_end[{bad}]={int(end[bad])} is beyond num_keys={num_keys}")
    return start, end, num_keys


def _is_monotone(start: torch.Tensor, end: torch.Tensor) -> bool:
    return start.numel() < 2 or bool(((start[1:] >= start[:-1]) & (end[1:] >= end[:-1])).all())


def _check_cu_seqlens(cu_seqlens, num_tokens: int | None) -> torch.Tensor:
    cu = index_vector(cu_seqlens, "cu_seqlens")
    if cu.numel() < 1:
        raise ValueError("cu_seqlens must have at least one entry (it starts at 0)")
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        bad = int(torch.nonzero(cu[1:] < cu[:-1])[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, but cu_seqlens[{bad + 1}]={int(cu[bad + 1])} "
            f"< cu_seqlens[{bad}]={int(cu[bad])}"
        )
    if int(cu[-1]) >= _INT32_LIMIT:
        raise ValueError(
            f"cu_seqlens must end below 2**31 (the intervals are int32), got {int(cu[-1])}"
        )
    if num_tokens is not None:
        num_tokens = integer(num_tokens, "num_tokens")
    if num_tokens is not None and int(cu[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens must end at the number of tokens T={num_tokens}, got {int(cu[-1])}"
        )
    return cu


def _document_bounds(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (start, end) of the sequence holding it. Zero-length sequences hold none."""
    # searchsorted, not repeat_interleave: the latter's intra-op parallel scan
    # stalls whenever a core is busy, for far longer than its useful work.
    positions = torch.arange(int(cu[-1]), device=cu.device)
    sequence = torch.searchsorted(cu, positions, right=True) - 1
    return cu[sequence], cu[sequence + 1]


def _check_spans(cu: torch.Tensor, span_starts, span_ends) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate spans (absolute packed offsets) and return them sorted by start."""
    starts = index_vector(span_starts, "span_starts", cu.device)
    ends = index_vector(span_ends, "span_ends", cu.device)
    _check_same_device(starts, "span_starts", cu.device, "cu_seqlens")
    _check_same_device(ends, "span_ends", cu.device, "cu_seqlens")
    if starts.numel() != ends.numel():
        raise ValueError(
            f"span_starts and span_ends must have the same length, got {starts.numel()} "
            f"and {ends.numel()}"
        )
    if starts.numel() == 0:
        return starts, ends
    total = int(cu[-1])
    if bool((starts > ends).any()):
        bad = int(torch.nonzero(starts > ends)[0, 0])
        raise ValueError(
            f"span_starts[{bad}]={int(starts[bad])} is after span_ends[{bad}]={int(ends[bad])}"
        )
    if bool((starts < 0).any()) or bool((ends > total).any()):
        raise ValueError(f"spans must lie inside [0, {total}] (span_starts, span_ends)")
    # A span must stay inside one sequence: the sequence of its first token
    # must also hold its last token.
    nonempty = ends > starts
    seq_of_start = torch.searchsorted(cu, starts, right=True) - 1
    seq_of_last = torch.searchsorted(cu, ends - 1, right=True) - 1
    crossing = nonempty & (seq_of_start != seq_of_last)
    if bool(crossing.any()):
        bad = int(torch.nonzero(crossing)[0, 0])
        raise ValueError(
            f"span {bad} [{int(starts[bad])}, {int(ends[bad])}) crosses a sequence boundary "
            "(span_starts, span_ends must stay inside one sequence of cu_seqlens)"
        )
    order = torch.argsort(starts, stable=True)
    starts, ends = starts[order], ends[order]
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.numel() > 1 and bool((starts[1:] < ends[:-1]).any()):
        bad = int(torch.nonzero(starts[1:] < ends[:-1])[0, 0])
        raise ValueError(
            f"spans overlap: [{int(starts[bad])}, {int(ends[bad])}) and "
            f"[{int(starts[bad + 1])}, {int(ends[bad + 1])}) (span_starts, span_ends)"
        )
    return starts, ends


def _span_end_per_token(num_tokens: int, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per token: the end of the span holding it, or 0 when it is in no span."""
    positions = torch.arange(num_tokens, dtype=torch.int64, device=starts.device)
    if starts.numel() == 0:
        return torch.zeros_like(positions)
    index = torch.searchsorted(starts, positions, right=True) - 1
    safe = index.clamp(min=0)
    inside = (index >= 0) & (positions < ends[safe])
    return torch.where(inside, ends[safe], torch.zeros_like(positions))


@dataclass(frozen=True, eq=False)
class SpanMask:
    """An interval attention mask over packed tokens.

    Query ``t`` attends key ``j`` exactly when ``kv_start[t] <= j < kv_end[t]``.

    Attributes
    ----------
    kv_start, kv_end : torch.Tensor
        int32 [Tq], on the device the mask was built on.
    num_keys : int
        Tk, the number of keys the intervals index into.
    monotone : bool
        True when both ``kv_start`` and ``kv_end`` are non-decreasing in ``t``
        (every structured constructor gives this). Kernels use it to bound the
        queries that can see a key block with a binary search.

    Every mask is valid by construction: the structured constructors check
    their inputs, and building one field by field,
    ``SpanMask(kv_start, kv_end, num_keys, monotone=False)``, runs the checks
    of :meth:`from_intervals` (``monotone`` is then computed, see ``__post_init__``).

    Example
    -------
    >>> import torch
    >>> from metalm_fast import SpanMask
    >>> mask = SpanMask.semi_causal(torch.tensor([0, 4, 7]), [1], [3])
    >>> mask.kv_end.tolist()
    [1, 3, 3, 4, 5, 6, 7]
    """

    kv_start: torch.Tensor
    kv_end: torch.Tensor
    num_keys: int
    monotone: bool = False

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_intervals(cls, kv_start, kv_end, num_keys: int | None = None) -> SpanMask:
        """Build a mask from explicit per-query intervals.

        Parameters
        ----------
        kv_start, kv_end : 1-D integer tensors or sequences, length Tq.
        num_keys : int, optional
            Tk. Defaults to Tq (self-attention).

        Raises
        ------
        ValueError
            If the lengths differ, ``kv_start > kv_end`` anywhere, or an
            interval leaves ``[0, num_keys]`` (checked in int64).
        TypeError
            If an index is a float or a bool, or ``num_keys`` is not an int.
        """
        start, end, num_keys = _check_intervals(kv_start, kv_end, num_keys)
        return cls._trusted(start, end, num_keys)

    def select_queries(self, rows: torch.Tensor) -> SpanMask:
        """The mask of the queries ``rows`` (int64 [R], indices into [0, Tq)), same keys.

        What a layer uses when only some rows' outputs are wanted (the last
        position of each prompt before the LM head): those queries attend
        exactly as before, over all Tk keys.

        ``rows`` must be integer indices: a bool tensor raises TypeError rather
        than being read as a row mask, because ``torch.as_tensor(mask, dtype=int64)``
        would silently pick rows 0 and 1; pass ``torch.nonzero(mask).flatten()``.
        """
        rows = index_vector(rows, "rows").to(self.kv_start.device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_queries):
            raise ValueError(
                f"rows must lie in [0, {self.num_queries}), got [{int(rows.min())}, "
                f"{int(rows.max())}]"
            )
        return type(self)._trusted(self.kv_start[rows], self.kv_end[rows], self.num_keys)

    @classmethod
    def causal(cls, cu_seqlens, num_tokens: int | None = None) -> SpanMask:
        """Causal attention inside each packed sequence: ``[seq_start, t + 1)``.

        ``cu_seqlens`` (int, [B + 1]) starts at 0, is non-decreasing (zero-length
        sequences are allowed) and ends at T (checked against ``num_tokens`` if given).
        """
        cu = _check_cu_seqlens(cu_seqlens, num_tokens)
        doc_start, _ = _document_bounds(cu)
        positions = torch.arange(doc_start.numel(), device=cu.device)
        return cls._trusted(doc_start, positions + 1, int(cu[-1]))

    @classmethod
    def bidirectional(cls, cu_seqlens, num_tokens: int | None = None) -> SpanMask:
        """Full attention inside each packed sequence: ``[seq_start, seq_end)``."""
        cu = _check_cu_seqlens(cu_seqlens, num_tokens)
        doc_start, doc_end = _document_bounds(cu)
        return cls._trusted(doc_start, doc_end, int(cu[-1]))

    @classmethod
    def semi_causal(
        cls, cu_seqlens, span_starts, span_ends, num_tokens: int | None = None
    ) -> SpanMask:
        """Causal, plus bidirectional inside each span: ``[doc_start, max(t + 1, span_end))``.

        Spans are absolute packed offsets ``[span_starts[i], span_ends[i])``; each
        must stay inside one sequence and spans must not overlap.
        """
        cu = _check_cu_seqlens(cu_seqlens, num_tokens)
        starts, ends = _check_spans(cu, span_starts, span_ends)
        doc_start, _ = _document_bounds(cu)
        total = doc_start.numel()
        positions = torch.arange(total, device=cu.device)
        kv_end = torch.maximum(positions + 1, _span_end_per_token(total, starts, ends))
        return cls._trusted(doc_start, kv_end, total)

    @classmethod
    def prefix_lm(cls, cu_seqlens, prefix_lens, num_tokens: int | None = None) -> SpanMask:
        """Prefix-LM: bidirectional over the first ``prefix_lens[i]`` tokens of sequence i.

        Causal after the prefix: ``[doc_start, max(t + 1, doc_start + prefix_lens[i]))``.
        """
        cu = _check_cu_seqlens(cu_seqlens, num_tokens)
        prefix = index_vector(prefix_lens, "prefix_lens", cu.device)
        _check_same_device(prefix, "prefix_lens", cu.device, "cu_seqlens")
        lengths = cu[1:] - cu[:-1]
        if prefix.numel() != lengths.numel():
            raise ValueError(
                f"prefix_lens must have one entry per sequence ({lengths.numel()}), "
                f"got {prefix.numel()}"
            )
        if bool((prefix < 0).any()) or bool((prefix > lengths).any()):
            bad = int(torch.nonzero((prefix < 0) | (prefix > lengths))[0, 0])
            raise ValueError(
                f"prefix_lens[{bad}]={int(prefix[bad])} must lie in [0, {int(lengths[bad])}] "
                "(the sequence's length)"
            )
        return cls.semi_causal(cu, cu[:-1], cu[:-1] + prefix)

    @classmethod
    def sliding_window(cls, cu_seqlens, window: int, num_tokens: int | None = None) -> SpanMask:
        """Causal sliding window of ``window`` keys: ``[max(seq_start, t - window + 1), t + 1)``."""
        window = integer(window, "window")
        if window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        cu = _check_cu_seqlens(cu_seqlens, num_tokens)
        doc_start, _ = _document_bounds(cu)
        positions = torch.arange(doc_start.numel(), device=cu.device)
        kv_start = torch.maximum(doc_start, positions - window + 1)
        return cls._trusted(kv_start, positions + 1, int(cu[-1]))

    def __post_init__(self) -> None:
        """Validate a mask built field by field, ``SpanMask(kv_start, kv_end, num_keys)``:
        the checks of :meth:`from_intervals`, then narrowing to int32.

        ``monotone`` describes the intervals, so it is computed: a claimed True
        that does not hold raises ValueError (kernels would skip keys some query
        attends), and a False on monotone intervals is corrected to True.
        """
        if not isinstance(self.monotone, bool):
            raise TypeError(f"monotone must be a bool, got {type(self.monotone).__name__}")
        start, end, num_keys = _check_intervals(self.kv_start, self.kv_end, self.num_keys)
        start = start.to(torch.int32).contiguous()
        end = end.to(torch.int32).contiguous()
        monotone = _is_monotone(start, end)
        if self.monotone and not monotone:
            raise ValueError(
                "monotone=True but kv_start or kv_end decreases somewhere; pass "
                "monotone=False (it is computed either way)"
            )
        for name, value in (("kv_start", start), ("kv_end", end), ("num_keys", num_keys)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "monotone", monotone)

    @classmethod
    def _trusted(cls, kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int) -> SpanMask:
        """Wrap intervals a constructor has already validated in int64 (no second pass)."""
        start = kv_start.to(torch.int32).contiguous()
        end = kv_end.to(torch.int32).contiguous()
        return cls._wrap(start, end, int(num_keys), _is_monotone(start, end))

    @classmethod
    def _wrap(cls, kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int, monotone: bool):
        """The mask of these exact fields, skipping ``__post_init__``: for valid masks only."""
        mask = object.__new__(cls)
        for name, value in (
            ("kv_start", kv_start),
            ("kv_end", kv_end),
            ("num_keys", num_keys),
            ("monotone", monotone),
        ):
            object.__setattr__(mask, name, value)
        return mask

    # ------------------------------------------------------------------ properties
    @property
    def num_queries(self) -> int:
        """Tq, the number of queries."""
        return self.kv_start.numel()

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    def to(self, device) -> SpanMask:
        """The same mask with its intervals on ``device``."""
        # A copy of a valid mask: no second validation (it would sync the device).
        return type(self)._wrap(
            self.kv_start.to(device), self.kv_end.to(device), self.num_keys, self.monotone
        )

    def num_pairs(self) -> int:
        """Number of allowed (query, key) pairs: what attention FLOPs are counted over."""
        return int((self.kv_end.to(torch.int64) - self.kv_start.to(torch.int64)).sum())

    def to_dense(self) -> torch.Tensor:
        """bool [Tq, Tk]; True where the query attends the key. For tests and debugging."""
        keys = torch.arange(self.num_keys, device=self.device)
        return (keys[None, :] >= self.kv_start[:, None]) & (keys[None, :] < self.kv_end[:, None])

    def __repr__(self) -> str:
        return (
            f"SpanMask(num_queries={self.num_queries}, num_keys={self.num_keys}, "
            f"pairs={self.num_pairs()}, monotone={self.monotone}, device={self.device})"
        )
