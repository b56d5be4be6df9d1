"""Continuation: two sentences; does the second follow the first? (yes / no)

Positives are two consecutive sentences of a paragraph; a negative keeps the
first and replaces the second with a sentence of another topic of the same
split (so a held-out question never shows a training sentence). Each pair is
made positive or negative by a fair coin of the seeded generator: chance 0.5.
"""

from __future__ import annotations

import random

from metalm_fast.evaluation.language.corpus import paragraphs, sentences
from metalm_fast.evaluation.language.example import Example

__all__ = ["CONTINUATION_QUESTION", "continuation_examples"]

CONTINUATION_QUESTION = "does the second sentence follow the first?"
# Sentences outside these word counts are fragments or run-ons (lists, tables).
_MIN_WORDS, _MAX_WORDS = 5, 40


def _usable(sentence: str) -> bool:
    return _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS


def continuation_examples(split: str, rng: random.Random) -> list[Example]:
    """One question per pair of consecutive usable sentences of ``split``."""
    pairs, pool = [], []
    for paragraph in paragraphs(split):
        found = sentences(paragraph.text)
        pool += [(s, paragraph.topic) for s in found if _usable(s)]
        pairs += [
            (first, second, paragraph.topic)
            for first, second in zip(found, found[1:])
            if _usable(first) and _usable(second)
        ]
    examples = []
    for first, second, topic in pairs:
        follows = rng.random() < 0.5
        if not follows:
            second, _ = rng.choice([(s, t) for s, t in pool if t != topic])
        examples.append(
            Example(
                f"{first} {second}",
                CONTINUATION_QUESTION,
                ("yes", "no"),
                "yes" if follows else "no",
            )
        )
    return examples
