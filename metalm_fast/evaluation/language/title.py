"""Title generation: a paragraph in, its topic's title out, scored by exact match.

The same paragraphs as topic classification (the label set's topics), but no
title is listed: the model must produce it, greedily, and the answer counts
only when the generated text, stripped, equals the title. Chance is that of a
uniform guess among the label set's titles, 1 / their number.
"""

from __future__ import annotations

import random

from metalm_fast.evaluation.language.corpus import paragraphs
from metalm_fast.evaluation.language.example import Example
from metalm_fast.evaluation.language.topic import label_titles, passage_of

__all__ = ["TITLE_QUESTION", "title_chance", "title_examples"]

TITLE_QUESTION = "what is the title of its topic?"


def title_chance() -> float:
    """1 / the number of titles in the label set."""
    return 1.0 / len(label_titles())


def title_examples(split: str, rng: random.Random) -> list[Example]:
    """One question per paragraph of ``split`` whose topic is in the label set.

    ``rng`` is unused (nothing is drawn); it keeps every task's builder alike.
    """
    del rng
    known = set(label_titles())
    return [
        Example(passage_of(p), TITLE_QUESTION, (), p.title)
        for p in paragraphs(split)
        if p.title in known
    ]
