"""The text the language tasks are made of: prose paragraphs of the pydoc topics, by split.

Splits follow :func:`metalm_fast.data.text_corpus.pydoc_documents` *by document*:
a paragraph is held out exactly when the document holding it is one of the
validation documents. That is the split pretraining already honours (the demo
and ``train --data default`` read the train documents only), so no held-out
paragraph, sentence or word in context was ever seen by the model, in
pretraining or in finetuning (text_corpus keeps each paragraph once, compared
whitespace-normalised, so a paragraph re-wrapped in another topic is not a
second copy either). A split by topic would instead ask the held-out
questions about topics whose titles the finetuned model never met; by document,
most held-out topics also have training paragraphs, as in any text
classification benchmark with a fixed label set.

Only prose is kept: grammar productions and code examples (indented), headings
(underlined with ``*`` or ``=``) and very short paragraphs are dropped, and a
paragraph's line breaks become spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from metalm_fast.data.text_corpus import normalized, pydoc_documents

__all__ = ["LANGUAGE_SPLITS", "Paragraph", "content_words", "paragraphs", "sentences"]

#: The two splits the tasks are built from: "train" (finetuning, demonstrations) and
#: "held_out" (scored): the pydoc train and validation documents.
LANGUAGE_SPLITS = ("train", "held_out")
# A prose paragraph has at least this many words (shorter ones are captions, list items).
_MIN_WORDS = 12
# A heading's underline: a line of only these characters.
_UNDERLINE = re.compile(r"^[*=\-^~]{3,}$", re.MULTILINE)
# A sentence ends at . ! or ? followed by a space and a capital letter or a quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"[A-Za-z]+")
# Function words never make a cloze blank nor a distractor: the question is meant to
# test which content word fits, not grammar the tiny model learns first.
_STOPWORDS = frozenset(
    "about above after again also although among another because been before being below "
    "between both cannot could does doing down during each either else every from further "
    "have having here however into itself just many more most much must neither never none "
    "only other otherwise over same shall should since some such than that their them then "
    "there these they this those though through thus under unless until upon very were what "
    "when where whether which while will with within without would your".split()
)


@dataclass(frozen=True)
class Paragraph:
    """One prose paragraph: its text (one line), its topic's key and title."""

    text: str
    topic: str
    title: str


def _is_prose(paragraph: str) -> bool:
    if not paragraph or paragraph[0].isspace() or _UNDERLINE.search(paragraph):
        return False
    if "::=" in paragraph or ">>>" in paragraph:
        return False
    return paragraph[0].isalpha() and len(paragraph.split()) >= _MIN_WORDS


@lru_cache(maxsize=1)
def _topic_of_paragraph() -> dict[str, tuple[str, str]]:
    """Each distinct paragraph of the pydoc topics, whitespace-normalised -> (topic key,
    topic title).

    The key is the first topic (in sorted order) holding the paragraph: the topic
    whose document keeps it after text_corpus's first-occurrence deduplication
    (which compares paragraphs normalised, as here).
    """
    from pydoc_data.topics import topics

    owner: dict[str, tuple[str, str]] = {}
    for key in sorted(topics):
        title = topics[key].strip().splitlines()[0].strip()
        for paragraph in topics[key].split("\n\n"):
            owner.setdefault(normalized(paragraph), (key, title))
    return owner


@lru_cache(maxsize=len(LANGUAGE_SPLITS))
def _paragraphs(split: str) -> tuple[Paragraph, ...]:
    """Each split's prose, one line per paragraph. No paragraph needs dropping: the
    documents hold each (whitespace-normalised) paragraph once, in one split."""
    owner = _topic_of_paragraph()
    kept = []
    for document in pydoc_documents("train" if split == "train" else "validation"):
        for raw in document.split("\n\n"):
            raw = raw.strip()
            if _is_prose(raw):
                text = normalized(raw)
                topic, title = owner[text]
                kept.append(Paragraph(text, topic, title))
    return tuple(kept)


def paragraphs(split: str) -> list[Paragraph]:
    """The prose paragraphs of ``split`` ("train" or "held_out"), in corpus order.

    Example
    -------
    >>> train, held_out = paragraphs("train"), paragraphs("held_out")
    >>> {p.text for p in train}.isdisjoint(p.text for p in held_out)
    True
    """
    if split not in LANGUAGE_SPLITS:
        raise ValueError(f"split must be one of {LANGUAGE_SPLITS}, got {split!r}")
    return list(_paragraphs(split))


def sentences(text: str) -> list[str]:
    """``text`` cut into sentences (a full stop, ! or ? before a capital letter).

    >>> sentences("A is one. B is two! C")
    ['A is one.', 'B is two!', 'C']
    """
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def content_words(text: str) -> list[str]:
    """The lower-case alphabetic words of ``text`` that can be a cloze blank: four
    letters or more, no function word.

    >>> content_words("The object is returned when the loop ends")
    ['object', 'returned', 'loop', 'ends']
    """
    words = (w for w in _WORD.findall(text) if len(w) >= 4 and w.islower())
    return [w for w in words if w not in _STOPWORDS]
