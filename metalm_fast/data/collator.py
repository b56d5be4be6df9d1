"""Semi-causal batches: pack documents, sample spans, build what the model reads.

Which positions carry loss (next-token prediction, position t predicts token
t + 1 of the same document):

- span positions take encoder features as decoder input (``feature_index``);
- a target that lies inside a span is not scored: the encoder reads that span,
  so the decoder is not asked to predict it;
- the token right after a span *is* scored, predicted from the span's last
  position;
- the last token of a document has no target.

Worked example: one document ``[a b c d e f]`` with the span ``[2, 4)`` (c, d)::

    position        0  1  2  3  4  5
    decoder input   a  b  F0 F1 e  f      (F = encoder features of c, d)
    target          b  c  d  e  f  -
    scored          y  n  n  y  y  n      (c, d lie in the span; f ends the document)

so ``labels = [b, -100, -100, e, f, -100]``.

Images follow the same rule: an image occupies ``tokens_per_image`` placeholder
positions (token ``image_token_id``) whose decoder input is the vision
encoder's rows (``image_index``); targets that are placeholders are not scored,
and the token after an image is predicted from its last placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalm_fast.data.encoder_spans import retokenize_spans
from metalm_fast.data.feature_index import (
    feature_index_from_placeholders,
    feature_index_from_spans,
)
from metalm_fast.data.semi_causal import sample_spans
from metalm_fast.masks import SpanMask
from metalm_fast.models.metalm import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "SemiCausalBatch",
    "SemiCausalCollator",
    "build_batch",
    "pack_documents",
]


@dataclass
class SemiCausalBatch:
    """One packed batch (no padding). T decoder tokens, B documents, S spans, N span tokens.

    input_ids : int64 [T]     decoder token ids (ids at span positions are replaced by features)
    cu_seqlens : int64 [B + 1] document boundaries in the packed decoder sequence
    span_starts, span_ends : int64 [S]   absolute packed offsets of the encoder spans
    encoder_ids : int64 [N]   the span tokens, packed in span order
    encoder_cu_seqlens : int64 [S + 1]   span boundaries in ``encoder_ids``
    feature_index : int64 [T] row of the encoder output at span positions, -1 elsewhere
    labels : int64 [T]        next token where scored, IGNORE_INDEX elsewhere
    images : float [I, C, H, W]  the images, in order of appearance (I may be 0)
    image_index : int64 [T]   row of the vision features ([I * tokens_per_image]) at
                              image placeholder positions, -1 elsewhere
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    span_starts: torch.Tensor
    span_ends: torch.Tensor
    encoder_ids: torch.Tensor
    encoder_cu_seqlens: torch.Tensor
    feature_index: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor | None = None
    image_index: torch.Tensor | None = None

    def __post_init__(self):
        if self.images is None:
            self.images = torch.zeros(0, 1, 1, 1)
        if self.image_index is None:
            self.image_index = torch.full_like(self.input_ids, -1)

    @property
    def loss_mask(self) -> torch.Tensor:
        """bool [T]: positions that carry loss."""
        return self.labels != IGNORE_INDEX


def pack_documents(documents: list[list[int]], token_budget: int) -> list[list[list[int]]]:
    """Greedy packing into groups of at most ``token_budget`` tokens, without padding.

    Documents longer than the budget are cut into budget-sized pieces (each piece
    is then its own document); empty documents are dropped.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    pieces = [
        doc[i : i + token_budget] for doc in documents for i in range(0, len(doc), token_budget)
    ]
    groups: list[list[list[int]]] = []
    current: list[list[int]] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > token_budget and current:
            groups.append(current)
            current, used = [], 0
        current.append(piece)
        used += len(piece)
    if current:
        groups.append(current)
    return groups


def _labels(input_ids: torch.Tensor, cu: torch.Tensor, is_feature: torch.Tensor):
    """Next-token labels with the semi-causal loss rule of the module docstring."""
    total = input_ids.numel()
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.int64)
    if total < 2:
        return labels
    positions = torch.arange(total - 1)
    document = torch.searchsorted(cu, positions, right=True) - 1
    same_document = positions + 1 < cu[document + 1]
    scored = same_document & ~is_feature[1:]
    labels[:-1] = torch.where(scored, input_ids[1:], labels[:-1])
    return labels


class SemiCausalCollator:
    """Turn documents (lists of token ids) into a :class:`SemiCausalBatch`.

    Spans are drawn by :func:`sample_spans` (``span_min``..``span_max`` tokens,
    about ``fraction`` of each document) from a generator seeded once, so a
    collator with the same seed yields the same batches. ``span_encoder`` (decoder
    ids of a span -> encoder ids, e.g. metalm_fast.data.encoder_spans.SpanRetokenizer)
    with ``placeholder_id``: the text encoder has its own tokenizer, and each span
    becomes a placeholder run of its encoder token count.
    """

    def __init__(
        self,
        *,
        span_min: int = 64,
        span_max: int = 128,
        fraction: float = 0.25,
        seed: int = 0,
        span_encoder=None,
        placeholder_id: int | None = None,
    ):
        if span_encoder is not None and placeholder_id is None:
            raise ValueError("span_encoder needs placeholder_id (the span positions' token)")
        self.span_min, self.span_max, self.fraction = span_min, span_max, fraction
        self.span_encoder, self.placeholder_id = span_encoder, placeholder_id
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, documents: list[list[int]]) -> SemiCausalBatch:
        lengths = [len(doc) for doc in documents]
        starts, ends = sample_spans(
            lengths,
            span_min=self.span_min,
            span_max=self.span_max,
            fraction=self.fraction,
            generator=self.generator,
        )
        if self.span_encoder is None:
            return build_batch(documents, starts, ends)
        documents, starts, ends, encoder_spans = retokenize_spans(
            documents, starts, ends, self.span_encoder, self.placeholder_id
        )
        return build_batch(documents, starts, ends, encoder_spans=encoder_spans)


def build_batch(
    documents: list[list[int]],
    span_starts,
    span_ends,
    *,
    images=None,
    image_token_id: int | None = None,
    tokens_per_image: int = 1,
    encoder_spans: list[list[int]] | None = None,
) -> SemiCausalBatch:
    """The batch for given documents and spans (absolute packed offsets, validated).

    ``encoder_spans``: each span's encoder token ids (in span order), when the text
    encoder has its own tokenizer (metalm_fast.data.encoder_spans); the span's length
    must equal its encoder token count. By default a span's encoder input is its
    decoder tokens.

    ``images`` (float [I, C, H, W], in order of appearance) go with runs of
    ``tokens_per_image`` placeholder tokens ``image_token_id`` in the documents;
    the placeholder count must equal ``I * tokens_per_image`` and spans must not
    cover a placeholder.
    """
    lengths = [len(doc) for doc in documents]
    input_ids = torch.tensor([token for doc in documents for token in doc], dtype=torch.int64)
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    # The mask validates the spans as given (integers, inside one document, no
    # overlap) before any conversion could truncate a float or read a bool.
    SpanMask.semi_causal(cu, span_starts, span_ends)
    starts = torch.as_tensor(span_starts, dtype=torch.int64)
    ends = torch.as_tensor(span_ends, dtype=torch.int64)
    order = torch.argsort(starts)
    starts, ends = starts[order], ends[order]
    feature_index = feature_index_from_spans(input_ids.numel(), starts, ends)
    image_index, images = _image_index(input_ids, images, image_token_id, tokens_per_image)
    if bool(((feature_index >= 0) & (image_index >= 0)).any()):
        raise ValueError("span_starts/span_ends cover an image placeholder; spans must not")
    if encoder_spans is None:
        span_tokens = [input_ids[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
    else:
        span_tokens = _encoder_span_tensors(encoder_spans, order, ends - starts)
    encoder_ids = torch.cat(span_tokens) if span_tokens else input_ids[:0]
    encoder_cu = torch.tensor([0, *(ends - starts).tolist()], dtype=torch.int64).cumsum(0)
    return SemiCausalBatch(
        input_ids=input_ids,
        cu_seqlens=cu,
        span_starts=starts,
        span_ends=ends,
        encoder_ids=encoder_ids,
        encoder_cu_seqlens=encoder_cu,
        feature_index=feature_index,
        labels=_labels(input_ids, cu, (feature_index >= 0) | (image_index >= 0)),
        images=images,
        image_index=image_index,
    )


def _encoder_span_tensors(encoder_spans, order: torch.Tensor, lengths: torch.Tensor):
    """The encoder ids of each span in start order, checked against the span lengths."""
    if len(encoder_spans) != lengths.numel():
        raise ValueError(
            f"encoder_spans holds {len(encoder_spans)} spans, span_starts {lengths.numel()}"
        )
    tokens = [torch.as_tensor(encoder_spans[i], dtype=torch.int64) for i in order.tolist()]
    for index, (ids, length) in enumerate(zip(tokens, lengths.tolist())):
        if ids.dim() != 1 or ids.numel() != length:
            raise ValueError(
                f"encoder_spans: span {index} (in start order) has {ids.numel()} encoder "
                f"tokens for {length} positions; each span needs one position per token"
            )
    return tokens


def _image_index(input_ids, images, image_token_id, tokens_per_image):
    if images is None or len(images) == 0:
        if image_token_id is not None and bool((input_ids == image_token_id).any()):
            raise ValueError(f"documents hold image_token_id {image_token_id} but no images")
        return torch.full_like(input_ids, -1), None
    if image_token_id is None:
        raise ValueError("images were given without image_token_id")
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.dim() != 4:
        raise ValueError(f"images must be [I, C, H, W], got shape {tuple(images.shape)}")
    index = feature_index_from_placeholders(
        input_ids, image_token_id, images.shape[0] * tokens_per_image
    )
    return index, images
