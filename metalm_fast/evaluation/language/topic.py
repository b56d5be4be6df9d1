"""Topic classification: which of ``TOPIC_CHOICES`` listed topics does a paragraph come from?

The candidates are topic titles ("Lambdas", 'The "assert" statement', ...): the
paragraph's own and ``TOPIC_CHOICES - 1`` others drawn from the label set, in a
random order, listed in the question. The label set is the topics that have
training paragraphs, so every held-out question asks about a topic the
finetuning could have met; a held-out paragraph of another topic is left out.
Chance: 1 / ``TOPIC_CHOICES``.
"""

from __future__ import annotations

import random

from metalm_fast.evaluation.language.corpus import Paragraph, paragraphs
from metalm_fast.evaluation.language.example import Example

__all__ = ["MAX_PASSAGE_WORDS", "TOPIC_CHOICES", "label_titles", "passage_of", "topic_examples"]

#: Candidate topics per question.
TOPIC_CHOICES = 4
#: A paragraph is cut after this many words: enough to name its subject, and a
#: prompt of a hundred-odd tokens keeps the scoring of every candidate cheap.
MAX_PASSAGE_WORDS = 48


def label_titles() -> list[str]:
    """The titles of the topics with training paragraphs, sorted: the label set."""
    return sorted({p.title for p in paragraphs("train")})


def passage_of(paragraph: Paragraph) -> str:
    """The paragraph's first ``MAX_PASSAGE_WORDS`` words."""
    return " ".join(paragraph.text.split()[:MAX_PASSAGE_WORDS])


def question_listing(candidates: list[str]) -> str:
    """'which topic is it from: a; b; c or d?'"""
    return f"which topic is it from: {'; '.join(candidates[:-1])} or {candidates[-1]}?"


def topic_examples(split: str, rng: random.Random) -> list[Example]:
    """One question per paragraph of ``split`` whose topic is in the label set."""
    titles = label_titles()
    known = set(titles)
    examples = []
    for paragraph in paragraphs(split):
        if paragraph.title not in known:
            continue
        others = rng.sample([t for t in titles if t != paragraph.title], TOPIC_CHOICES - 1)
        candidates = [paragraph.title, *others]
        rng.shuffle(candidates)
        examples.append(
            Example(
                passage_of(paragraph),
                question_listing(candidates),
                tuple(candidates),
                paragraph.title,
            )
        )
    return examples
