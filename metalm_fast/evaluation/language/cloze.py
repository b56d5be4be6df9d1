"""Cloze: a passage with one word blanked; which of ``CLOZE_CHOICES`` words fills the blank?

The passage is a paragraph's first words (as topic classification's), and the
blank is one occurrence (the first) of a content word (four letters or more,
no function word) that occurs again in the passage: as in LAMBADA, the passage
itself holds the evidence for the answer, so the task is reading, not knowing
the corpus by heart. The distractors are content words of the training split that never
occur in the sentence's topic, drawn *in proportion to their frequency*, as
the blanked words themselves are: a model that only knows which words are
common scores chance, one that reads the sentence can tell the word that
belongs to its subject from three that belong elsewhere. (Distractors that
could fit the topic would ask for grammar and meaning beyond what a tiny
model learns in CPU minutes.) Chance: 1 / ``CLOZE_CHOICES``.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import cache, lru_cache

from metalm_fast.evaluation.language.corpus import (
    LANGUAGE_SPLITS,
    content_words,
    paragraphs,
)
from metalm_fast.evaluation.language.example import Example
from metalm_fast.evaluation.language.topic import passage_of

__all__ = ["BLANK", "BLANKS_PER_PASSAGE", "CLOZE_CHOICES", "cloze_examples"]

CLOZE_CHOICES = 4
#: Most blanks drawn from one passage (each its own question).
BLANKS_PER_PASSAGE = 3
BLANK = "____"
_WORDS = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=1)
def _word_frequencies() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The training split's content words (sorted) and their counts."""
    counts = Counter(w for p in paragraphs("train") for w in content_words(p.text))
    words = sorted(counts)
    return tuple(words), tuple(counts[w] for w in words)


@cache
def _topic_words(topic: str) -> frozenset[str]:
    """Every lower-cased word of the topic's paragraphs, in either split."""
    return frozenset(
        w.lower()
        for split in LANGUAGE_SPLITS
        for p in paragraphs(split)
        if p.topic == topic
        for w in _WORDS.findall(p.text)
    )


def _distractors(rng: random.Random, excluded: frozenset[str], count: int) -> list[str]:
    words, weights = _word_frequencies()
    chosen: list[str] = []
    while len(chosen) < count:
        (word,) = rng.choices(words, weights)
        if word not in excluded and word not in chosen:
            chosen.append(word)
    return chosen


def _blanked(sentence: str, word: str) -> str:
    """``sentence`` with its first whole-word ``word`` replaced by BLANK."""
    tokens = sentence.split(" ")
    for i, token in enumerate(tokens):
        core = token.strip(".,;:!?()\"'")
        if core == word:
            tokens[i] = token.replace(word, BLANK, 1)
            return " ".join(tokens)
    raise AssertionError(f"{word!r} is not a word of {sentence!r}")


def cloze_examples(split: str, rng: random.Random) -> list[Example]:
    """Up to ``BLANKS_PER_PASSAGE`` questions per paragraph of ``split``, one per recurring
    content word of its passage (drawn at random when there are more)."""
    examples = []
    for paragraph in paragraphs(split):
        passage = passage_of(paragraph)
        words = content_words(passage)
        recurring = sorted({w for w in words if words.count(w) > 1 and _has_whole_word(passage, w)})
        if not recurring:
            continue
        for word in rng.sample(recurring, min(BLANKS_PER_PASSAGE, len(recurring))):
            examples.append(_question(rng, passage, word, paragraph.topic))
    return examples


def _question(rng: random.Random, passage: str, word: str, topic: str) -> Example:
    others = _distractors(rng, _topic_words(topic), CLOZE_CHOICES - 1)
    candidates = [word, *others]
    rng.shuffle(candidates)
    listing = f"{', '.join(candidates[:-1])} or {candidates[-1]}"
    return Example(
        _blanked(passage, word),
        f"which word fills the blank: {listing}?",
        tuple(candidates),
        word,
    )


def _has_whole_word(sentence: str, word: str) -> bool:
    return any(token.strip(".,;:!?()\"'") == word for token in sentence.split(" "))
