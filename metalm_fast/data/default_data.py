"""The default training mixture (pydoc text + captioned digits) and its prompt formats.

Prompt formats, in one place for training, evaluation and generation
(``I`` is a run of ``tokens_per_image`` image placeholder tokens)::

    caption document   <bos> I " " caption <eos>
    VQA prompt         <bos> I " question: " question " answer:"
    VQA document       VQA prompt, " " answer, <eos>

Text pieces are ``encode`` of the strings shown, concatenated (never encoded
as one string), so a prompt's tokens are a prefix of its document's tokens.

:class:`DefaultData` streams packed :class:`SemiCausalBatch` micro-batches of
exactly ``token_budget`` tokens: caption documents (one digit image each) take
up to ``image_fraction`` of the budget, text fills the rest. Text documents are
``<bos> text <eos>`` of a pydoc document, cut where a micro-batch is full; the
rest continues the next micro-batch as its own document. Semi-causal spans are
sampled over text pieces only, so they never cover an image placeholder.

The stream depends only on the constructor's arguments: every call of
``micro_batches()`` restarts it from the beginning, identically.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from metalm_fast.data.collator import IGNORE_INDEX, SemiCausalBatch, build_batch
from metalm_fast.data.digits import (
    QUESTIONS,
    DigitImages,
    caption,
    caption_variants,
    load_digits,
)
from metalm_fast.data.encoder_spans import retokenize_spans
from metalm_fast.data.semi_causal import sample_spans
from metalm_fast.data.text_corpus import pydoc_documents
from metalm_fast.data.tokenizer import Tokenizer

__all__ = [
    "DefaultData",
    "answer_tokens",
    "caption_document",
    "image_tokens",
    "vqa_document",
    "vqa_prompt",
]


def _check_tokens_per_image(tokens_per_image: int) -> None:
    if not isinstance(tokens_per_image, int) or tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be a positive int, got {tokens_per_image!r}")


def image_tokens(tokenizer: Tokenizer, tokens_per_image: int) -> list[int]:
    """The placeholder run of one image: ``[image_id] * tokens_per_image``."""
    _check_tokens_per_image(tokens_per_image)
    return [tokenizer.image_id] * tokens_per_image


def caption_document(tokenizer: Tokenizer, caption: str, tokens_per_image: int) -> list[int]:
    """``<bos> I encode(" " + caption) <eos>``: a captioned image (one image)."""
    return [
        tokenizer.bos_id,
        *image_tokens(tokenizer, tokens_per_image),
        *tokenizer.encode(" " + caption),
        tokenizer.eos_id,
    ]


def vqa_prompt(tokenizer: Tokenizer, question: str, tokens_per_image: int) -> list[int]:
    """``<bos> I encode(" question: " + question + " answer:")``: what the model is given."""
    return [
        tokenizer.bos_id,
        *image_tokens(tokenizer, tokens_per_image),
        *tokenizer.encode(" question: " + question + " answer:"),
    ]


def answer_tokens(tokenizer: Tokenizer, answer: str) -> list[int]:
    """``encode(" " + answer)``: the tokens that follow a VQA prompt (no <eos>)."""
    return tokenizer.encode(" " + answer)


def vqa_document(
    tokenizer: Tokenizer, question: str, answer: str, tokens_per_image: int
) -> list[int]:
    """``vqa_prompt + answer_tokens + <eos>``: one VQA training document (one image)."""
    return [
        *vqa_prompt(tokenizer, question, tokens_per_image),
        *answer_tokens(tokenizer, answer),
        tokenizer.eos_id,
    ]


def _epochs(size: int, rng: random.Random) -> Iterator[int]:
    """Indices 0..size-1 forever, reshuffled by ``rng`` at every epoch."""
    while True:
        order = list(range(size))
        rng.shuffle(order)
        yield from order


class _TextStream:
    """Text documents in shuffled epochs, handed out in pieces that fit the room left."""

    def __init__(self, documents: list[list[int]], rng: random.Random):
        self._documents = documents
        self._order = _epochs(len(documents), rng)
        self._current: list[int] = []
        self._offset = 0

    def take(self, limit: int) -> list[int]:
        """The next 1..``limit`` tokens of the current document (the next one when it is done)."""
        if self._offset == len(self._current):
            self._current, self._offset = self._documents[next(self._order)], 0
        piece = self._current[self._offset : self._offset + limit]
        self._offset += len(piece)
        return piece


class _CaptionStream:
    """Captioned digits in shuffled epochs; one that does not fit waits for the next batch."""

    def __init__(
        self, tokenizer: Tokenizer, digits: DigitImages, tokens_per_image: int, rng: random.Random
    ):
        self._tokenizer, self._digits, self._tokens_per_image = tokenizer, digits, tokens_per_image
        self._rng = rng
        self._order = _epochs(len(digits), rng)
        self._pending: tuple[list[int], int] | None = None

    def take(self, limit: int) -> tuple[list[int], int] | None:
        """(document, image row) if the next caption document fits in ``limit``, else None."""
        if self._pending is None:
            row = next(self._order)
            text = caption(int(self._digits.labels[row]), self._rng)
            self._pending = (caption_document(self._tokenizer, text, self._tokens_per_image), row)
        if len(self._pending[0]) > limit:
            return None
        item, self._pending = self._pending, None
        return item


class DefaultData:
    """The embedded training mixture, as an infinite deterministic stream of micro-batches.

    Parameters
    ----------
    tokenizer : the pydoc tokenizer (:func:`load_tokenizer`), or a pretrained decoder's
        (``Tokenizer.from_pretrained``).
    tokens_per_image : placeholder tokens per image (the vision encoder's rows per image).
    token_budget : tokens per micro-batch; every micro-batch has exactly this many.
    image_fraction : share of each micro-batch's *tokens* given to caption documents
        (placeholders included), in [0, 1]. Captions are added while they fit in
        ``round(image_fraction * token_budget)`` tokens; text fills the rest.
    span_min, span_max, span_fraction : semi-causal spans over text (:func:`sample_spans`).
    seed : seeds the epoch shuffles, caption templates and spans.
    digits_split : "train" or "test" digits for the captions.
    text_split : "train", "validation" or "all" pydoc documents.
    span_encoder : None (the text encoder reads the decoder's tokens), or decoder ids of
        a span -> the encoder's ids (:class:`~metalm_fast.data.encoder_spans.SpanRetokenizer`):
        each span becomes a run of its encoder token count, so a micro-batch then holds
        ``token_budget`` plus the spans' change in length.

    Attributes
    ----------
    digits : DigitImages of ``digits_split``; batch images are rows of ``digits.images``.
    text_documents : list of ``[bos, *encode(text), eos]``, one per pydoc document.
    image_budget : int, ``round(image_fraction * token_budget)``.

    Note
    ----
    In each micro-batch the text pieces come first, then the caption documents;
    ``batch.images`` are in the captions' order. A text piece that continues a
    document cut by the previous micro-batch starts without <bos>.

    Example
    -------
    >>> from metalm_fast.data.tokenizer import load_tokenizer
    >>> data = DefaultData(load_tokenizer(), tokens_per_image=16)
    >>> batch = next(data.micro_batches())
    >>> batch.input_ids.numel(), batch.images.shape[1:]
    (2048, torch.Size([1, 8, 8]))
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokens_per_image: int,
        *,
        token_budget: int = 2048,
        image_fraction: float = 0.5,
        span_min: int = 64,
        span_max: int = 128,
        span_fraction: float = 0.25,
        seed: int = 0,
        digits_split: str = "train",
        text_split: str = "train",
        span_encoder=None,
    ):
        _check_tokens_per_image(tokens_per_image)
        if not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
        if not 0.0 <= image_fraction <= 1.0:
            raise ValueError(f"image_fraction must lie in [0, 1], got {image_fraction}")
        sample_spans([], span_min=span_min, span_max=span_max, fraction=span_fraction)  # validates
        self.tokenizer, self.tokens_per_image = tokenizer, tokens_per_image
        self.token_budget, self.image_fraction, self.seed = token_budget, image_fraction, seed
        self.span_min, self.span_max, self.span_fraction = span_min, span_max, span_fraction
        self.span_encoder = span_encoder
        self.image_budget = round(image_fraction * token_budget)
        self._check_caption_fits()
        self.digits = load_digits(digits_split)
        # Encoded once, up front: the stream then only slices lists.
        self.text_documents = [
            [tokenizer.bos_id, *ids, tokenizer.eos_id]
            for ids in tokenizer.encode_batch(pydoc_documents(text_split))
        ]

    def _check_caption_fits(self) -> None:
        if self.image_budget == 0:
            return
        longest = max(
            len(caption_document(self.tokenizer, text, self.tokens_per_image))
            for label in range(10)
            for text in caption_variants(label)
        )
        if longest > self.image_budget:
            raise ValueError(
                f"image_fraction * token_budget = {self.image_budget} tokens cannot hold a "
                f"caption document ({longest} tokens with tokens_per_image="
                f"{self.tokens_per_image}); raise token_budget or image_fraction"
            )

    def micro_batches(self) -> Iterator[SemiCausalBatch]:
        """Packed text + caption micro-batches, forever; the same sequence at every call."""
        text = _TextStream(self.text_documents, random.Random(f"text-{self.seed}"))
        captions = _CaptionStream(
            self.tokenizer,
            self.digits,
            self.tokens_per_image,
            random.Random(f"captions-{self.seed}"),
        )
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield self._mixed_batch(text, captions, generator)

    def _mixed_batch(
        self, text: _TextStream, captions: _CaptionStream, generator: torch.Generator
    ) -> SemiCausalBatch:
        caption_docs: list[list[int]] = []
        rows: list[int] = []
        room = self.image_budget
        while (item := captions.take(room)) is not None:
            caption_docs.append(item[0])
            rows.append(item[1])
            room -= len(item[0])
        text_docs: list[list[int]] = []
        room = self.token_budget - sum(map(len, caption_docs))
        while room > 0:
            text_docs.append(text.take(room))
            room -= len(text_docs[-1])
        # Text goes first so that spans sampled over the text pieces alone are already
        # absolute packed offsets, and can never reach a caption's placeholders.
        starts, ends = sample_spans(
            [len(doc) for doc in text_docs],
            span_min=self.span_min,
            span_max=self.span_max,
            fraction=self.span_fraction,
            generator=generator,
        )
        images = self.digits.images[rows] if rows else None
        encoder_spans = None
        if self.span_encoder is not None:  # the text encoder has its own tokenizer
            text_docs, starts, ends, encoder_spans = retokenize_spans(
                text_docs, starts, ends, self.span_encoder, self.tokenizer.bos_id
            )
        return build_batch(
            text_docs + caption_docs,
            starts,
            ends,
            images=images,
            image_token_id=self.tokenizer.image_id,
            tokens_per_image=self.tokens_per_image,
            encoder_spans=encoder_spans,
        )

    def vqa_micro_batches(
        self, split: str = "train", *, answer_only: bool = True
    ) -> Iterator[SemiCausalBatch]:
        """Packed digit VQA documents (random task, random scan of ``split``), forever.

        Each micro-batch holds as many whole :func:`vqa_document` s as fit in
        ``token_budget``; no spans. With ``answer_only`` (the default, for
        finetuning) only targets in the answer and its <eos> are scored;
        otherwise every target except image placeholders is (the collator's rule).
        """
        digits = load_digits(split)
        longest = max(
            len(vqa_document(self.tokenizer, task.question, answer, self.tokens_per_image))
            for task in QUESTIONS
            for answer in task.candidates
        )
        if longest > self.token_budget:
            raise ValueError(
                f"token_budget {self.token_budget} cannot hold a VQA document "
                f"({longest} tokens); raise token_budget"
            )
        return self._vqa_stream(digits, random.Random(f"vqa-{split}-{self.seed}"), answer_only)

    def _vqa_stream(
        self, digits: DigitImages, rng: random.Random, answer_only: bool
    ) -> Iterator[SemiCausalBatch]:
        items = (self._vqa_item(digits, row, rng) for row in _epochs(len(digits), rng))
        pending = next(items)
        while True:
            group, used = [], 0
            while used + len(pending[0]) <= self.token_budget:
                group.append(pending)
                used += len(pending[0])
                pending = next(items)
            yield self._vqa_batch(group, digits, answer_only)

    def _vqa_batch(self, group, digits: DigitImages, answer_only: bool) -> SemiCausalBatch:
        documents, rows, scored = zip(*group)
        batch = build_batch(
            list(documents),
            [],
            [],
            images=digits.images[list(rows)],
            image_token_id=self.tokenizer.image_id,
            tokens_per_image=self.tokens_per_image,
        )
        if answer_only:
            keep = torch.tensor([flag for flags in scored for flag in flags], dtype=torch.bool)
            batch.labels = torch.where(keep, batch.labels, IGNORE_INDEX)
        return batch

    def _vqa_item(self, digits: DigitImages, row: int, rng: random.Random):
        """(document, image row, bool per position: does its target lie in the answer/<eos>)."""
        task = rng.choice(QUESTIONS)
        answer = task.answer_for(int(digits.labels[row]))
        prompt = vqa_prompt(self.tokenizer, task.question, self.tokens_per_image)
        document = vqa_document(self.tokenizer, task.question, answer, self.tokens_per_image)
        # position t predicts t + 1: the answer's targets are positions len(prompt) - 1 ...
        # len(document) - 2 (the last predicts <eos>); the final position has no target.
        scored = [len(prompt) - 1 <= t < len(document) - 1 for t in range(len(document))]
        return document, row, scored
