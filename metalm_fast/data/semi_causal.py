"""Semi-causal span sampling (MetaLM, Hao et al. 2022).

In semi-causal language modeling, random spans of ``span_min``..``span_max``
tokens covering about ``fraction`` of each document go through the
bidirectional encoder; the causal decoder predicts every other token. Spans
never cross a document boundary and never overlap.

Per document of length L (documents shorter than ``span_min`` get no span):

1. draw span lengths uniformly in [span_min, min(span_max, L)] while the next
   one still fits under the document's budget ``round(fraction * L)`` (the first
   span is always placed, so short documents are not starved);
2. spread the uncovered tokens over the k + 1 gaps around the k spans with a
   uniformly random composition, so spans land anywhere in the document.

Everything is O(number of spans) and uses only the given torch.Generator, so a
seed reproduces a batch exactly.
"""

from __future__ import annotations

import torch

__all__ = ["sample_spans"]


def _span_lengths(length: int, span_min: int, span_max: int, budget: int, generator) -> list[int]:
    longest = min(span_max, length)
    lengths: list[int] = []
    while True:
        draw = int(torch.randint(span_min, longest + 1, (1,), generator=generator))
        if lengths and sum(lengths) + draw > budget:
            return lengths
        if sum(lengths) + draw > length:
            return lengths
        lengths.append(draw)


def _gaps(free: int, count: int, generator) -> list[int]:
    """A uniformly random composition of ``free`` into ``count`` non-negative parts."""
    cuts = torch.randint(0, free + 1, (count - 1,), generator=generator).sort().values.tolist()
    bounds = [0, *cuts, free]
    return [bounds[i + 1] - bounds[i] for i in range(count)]


def sample_spans(
    doc_lengths: list[int],
    *,
    span_min: int = 64,
    span_max: int = 128,
    fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample encoder spans over packed documents.

    Parameters
    ----------
    doc_lengths : lengths of the packed documents, in packing order.
    span_min, span_max : span length bounds (inclusive).
    fraction : target share of each document's tokens inside spans.
    generator : torch.Generator for reproducibility.

    Returns
    -------
    span_starts, span_ends : int64 [S], absolute packed offsets, sorted, each
        span inside one document, non-overlapping. Feed them to
        ``SpanMask.semi_causal`` and ``feature_index_from_spans``.

    Example
    -------
    >>> starts, ends = sample_spans([1000, 50, 600], generator=torch.Generator().manual_seed(0))
    >>> bool(((ends - starts) >= 64).all() and ((ends - starts) <= 128).all())
    True
    """
    if not 1 <= span_min <= span_max:
        raise ValueError(f"need 1 <= span_min <= span_max, got {span_min} and {span_max}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if any(length < 0 for length in doc_lengths):
        raise ValueError("doc_lengths must be non-negative")
    starts: list[int] = []
    ends: list[int] = []
    offset = 0
    for length in doc_lengths:
        if length >= span_min:
            budget = max(span_min, round(fraction * length))
            lengths = _span_lengths(length, span_min, span_max, budget, generator)
            gaps = _gaps(length - sum(lengths), len(lengths) + 1, generator)
            cursor = offset
            for gap, span in zip(gaps, lengths):
                cursor += gap
                starts.append(cursor)
                ends.append(cursor + span)
                cursor += span
        offset += length
    return torch.tensor(starts, dtype=torch.int64), torch.tensor(ends, dtype=torch.int64)
