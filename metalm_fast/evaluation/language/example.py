"""What every language task is made of: an :class:`Example` and its prompt layout.

One example is a passage (the text the question is about), a question, the
candidate answers (none for a generation task) and the true answer. Its
tokens, text pieces encoded one by one (never as one string) so that the
prompt is a prefix of the document::

    prompt      <bos> encode(passage) encode(" question: " + question + " answer:")
    document    prompt, encode(" " + answer), <eos>

When the model has a non-causal reader (a two-stack text encoder, or the
single stack's bidirectional spans) the passage is one span: it is read as a
whole, in both directions, the way MetaLM finetunes on language tasks; a
decoder-only model reads it causally as tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from metalm_fast.data.default_data import answer_tokens

__all__ = [
    "Example",
    "Prompt",
    "example_document",
    "example_prompt",
    "question_prompt",
    "reads_spans",
]


@dataclass(frozen=True)
class Example:
    """One question; ``candidates`` is empty for a generation task."""

    passage: str
    question: str
    candidates: tuple[str, ...]
    answer: str

    @property
    def chance(self) -> float:
        """1 / the number of candidates (a uniform guess); NaN for a generation task."""
        return 1.0 / len(self.candidates) if self.candidates else float("nan")


@dataclass
class Prompt:
    """Tokens of one packed document and its spans (offsets in its own tokens)."""

    tokens: list[int]
    spans: list[tuple[int, int]]


def reads_spans(model) -> bool:
    """Does ``model`` read spans non-causally (a text encoder, or a single stack)?"""
    config = model.config
    return config.variant == "single_stack" or bool(getattr(model, "has_text_encoder", False))


def _pieces(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(passage tokens, question tokens up to and with " answer:")."""
    passage = tokenizer.encode(example.passage)
    question = tokenizer.encode(" question: " + example.question + " answer:")
    return passage, question


def example_document(tokenizer, example: Example) -> list[int]:
    """The solved example's tokens, <bos> to <eos>."""
    passage, question = _pieces(tokenizer, example)
    answer = answer_tokens(tokenizer, example.answer)
    return [tokenizer.bos_id, *passage, *question, *answer, tokenizer.eos_id]


def example_prompt(
    tokenizer,
    example: Example,
    demos: tuple[Example, ...] | list[Example] = (),
    *,
    encode_passages: bool = False,
    encoder_demos: bool = False,
) -> Prompt:
    """The prompt for ``example`` after the solved ``demos``.

    ``encode_passages``: every passage (the demonstrations' and the question's) is
    a span. ``encoder_demos``: each demonstration, after its <bos>, is one span
    (passage, question, answer and <eos>: the non-causal reader sees the whole
    solved example), as digit VQA's encoder demonstrations are.
    """
    tokens: list[int] = []
    spans: list[tuple[int, int]] = []
    for demo in demos:
        document = example_document(tokenizer, demo)
        if encoder_demos:
            spans.append((len(tokens) + 1, len(tokens) + len(document)))
        elif encode_passages:
            passage = len(tokenizer.encode(demo.passage))
            spans.append((len(tokens) + 1, len(tokens) + 1 + passage))
        tokens += document
    passage, question = _pieces(tokenizer, example)
    if encode_passages:
        spans.append((len(tokens) + 1, len(tokens) + 1 + len(passage)))
    tokens += [tokenizer.bos_id, *passage, *question]
    return Prompt(tokens, spans)


def question_prompt(tokenizer, example: Example) -> Prompt:
    """The question alone, ``<bos> encode(" question: " + question + " answer:")``: no
    passage, no demonstration. What a candidate's likelihood is measured against when
    it is scored by pointwise mutual information (``normalize="pmi"``)."""
    _, question = _pieces(tokenizer, example)
    return Prompt([tokenizer.bos_id, *question], [])
