"""Continuation: a sentence; which of ``CONTINUATION_CHOICES`` sentences comes next?

The passage is one sentence of a paragraph and the answer the sentence that
follows it there; the ``CONTINUATION_CHOICES - 1`` distractors are sentences
of the same split drawn so that nothing but the passage tells them apart.
Paragraphs are distinct, but a few sentences recur in several (the string
methods' "Padding is done using the specified *fillchar*..."): a held-out pair
with a sentence the training split also holds is left out, so a held-out
question never shows a training sentence, as passage, answer or distractor.
The distractors:

- each is itself a sentence that follows another in its paragraph, as the
  answer is (a paragraph's opening sentence reads differently: it names the
  subject, where a second sentence refers back to it);
- each is about as long as the answer (within ``LENGTH_TOLERANCE`` of its word
  count, the nearest lengths when too few are), so length gives nothing away
  even to a score that is not length-normalised;
- ``SAME_TOPIC_DISTRACTORS`` of them come from the answer's own topic, never
  next to the passage (same subject: only reading the passage's sentence
  tells), the rest from other topics (told apart by subject).

The candidates are not listed in the question: as in story-cloze and
HellaSwag, each is scored by its log-likelihood after the passage, so the
model must find the sentence the passage makes likely. (Listed in the question,
as topic's are, they did no better: 28.9% against 30.5% for the finetuned
two-stack model, benchmarks/results/cpu_language_designs_2026-12-02.md.) The
score is the candidate's pointwise mutual information with the passage
(``normalize="pmi"`` in :mod:`.scoring`): a sentence of common words is likely
after any passage, and what tells the answer is how much the passage raises it.
A longer passage (the sentences before, back to 80 words across the topic's
paragraphs) measured no better: 43% against 48% for one finetuned two-stack
model. The finetuned tiny two-stack model memorises the training pairs (92% on a
fresh draw of training questions against 48% held out); neither more pretraining
nor a bigger model raised the held-out figure: 8000 pretraining steps 39%, the
small preset 23% (it learns the 114k-token corpus by heart: pretraining loss
0.22). Chance: 1 / ``CONTINUATION_CHOICES``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from metalm_fast.evaluation.language.corpus import paragraphs, sentences
from metalm_fast.evaluation.language.example import Example

__all__ = [
    "CONTINUATION_CHOICES",
    "CONTINUATION_QUESTION",
    "LENGTH_TOLERANCE",
    "SAME_TOPIC_DISTRACTORS",
    "continuation_examples",
]

CONTINUATION_CHOICES = 4
#: Distractors drawn from the answer's own topic (never adjacent to the passage).
SAME_TOPIC_DISTRACTORS = 0
#: A distractor's word count lies within this fraction of the answer's (at least 2 words).
LENGTH_TOLERANCE = 0.2
CONTINUATION_QUESTION = "which sentence comes next?"
# Sentences outside these word counts are fragments or run-ons (lists, tables).
_MIN_WORDS, _MAX_WORDS = 5, 40


@dataclass(frozen=True)
class _Follower:
    """A usable sentence that follows another in its paragraph: a candidate answer."""

    text: str
    words: int
    topic: str
    paragraph: int  # index in the split: tells the passage's neighbours apart
    position: int  # index of the sentence in its paragraph


def _usable(sentence: str) -> bool:
    return _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS


@lru_cache(maxsize=1)
def _training_sentences() -> frozenset[str]:
    return frozenset(s for p in paragraphs("train") for s in sentences(p.text))


def _pairs(split: str) -> list[tuple[str, _Follower]]:
    """(sentence, the usable sentence after it) for every usable pair of ``split``; a
    held-out pair only when neither sentence is also a training sentence."""
    trained = _training_sentences() if split == "held_out" else frozenset()
    pairs = []
    for index, paragraph in enumerate(paragraphs(split)):
        found = sentences(paragraph.text)
        for position, (first, second) in enumerate(zip(found, found[1:]), start=1):
            if _usable(first) and _usable(second) and not {first, second} & trained:
                follower = _Follower(second, len(second.split()), paragraph.topic, index, position)
                pairs.append((first, follower))
    return pairs


def _near_in_length(pool: list[_Follower], words: int, count: int) -> list[_Follower]:
    """Those of ``pool`` within the length tolerance of ``words``; at least the ``count``
    nearest in length when fewer are (ties kept in corpus order: deterministic)."""
    tolerance = max(2, round(LENGTH_TOLERANCE * words))
    near = [f for f in pool if abs(f.words - words) <= tolerance]
    if len(near) >= count:
        return near
    return sorted(pool, key=lambda f: abs(f.words - words))[:count]


def _distractors(
    rng: random.Random, first: str, answer: _Follower, followers: list[_Follower]
) -> list[str]:
    """``CONTINUATION_CHOICES - 1`` distinct distractor texts for the pair (first, answer)."""
    excluded = {first, answer.text}  # a sentence repeated elsewhere is no distractor
    usable = [f for f in followers if f.text not in excluded]
    own = [
        f
        for f in usable
        if f.topic == answer.topic
        # not the passage's own neighbourhood: the sentence after the answer could
        # also read as a continuation of the passage
        and not (f.paragraph == answer.paragraph and abs(f.position - answer.position) <= 1)
    ]
    others = [f for f in usable if f.topic != answer.topic]
    same = min(SAME_TOPIC_DISTRACTORS, len(own))
    chosen: list[str] = []
    for pool, count in ((own, same), (others, CONTINUATION_CHOICES - 1 - same)):
        near = _near_in_length(pool, answer.words, count)
        wanted = len(chosen) + count
        while len(chosen) < wanted:
            pick = rng.choice(near).text
            if pick not in chosen:  # two pool entries may be one text
                chosen.append(pick)
    return chosen


def continuation_examples(split: str, rng: random.Random) -> list[Example]:
    """One question per pair of consecutive usable sentences of ``split``."""
    pairs = _pairs(split)
    followers = [follower for _, follower in pairs]
    examples = []
    for first, answer in pairs:
        candidates = [answer.text, *_distractors(rng, first, answer, followers)]
        rng.shuffle(candidates)
        examples.append(Example(first, CONTINUATION_QUESTION, tuple(candidates), answer.text))
    return examples
