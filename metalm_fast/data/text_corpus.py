"""The embedded text corpus: the Python standard library's documentation topics.

``pydoc_data.topics.topics`` ships with every CPython (it backs ``help("if")``):
79 topics, about 460 KB of real English technical prose, nothing to download.

The topics repeat one another (the "compound" topic contains the whole "if",
"while", "for" and "try" topics; "else" is "if"), about a fifth of the text. A
held-out split is only honest if its text is not also in train, so a paragraph
(text between blank lines) is kept only at its first occurrence, in sorted
topic order: about 373 KB of distinct text remain. Two paragraphs are the same
when they differ only in whitespace: a topic that repeats another's paragraph
may re-wrap its lines, re-indent it or end it with a newline, and such a
repeat, missed by an exact comparison, would put held-out text in train (24
paragraphs, with Python 3.11). Each topic's remaining paragraphs are grouped,
in order, into documents of at most ``MAX_DOCUMENT_CHARS`` characters, joined
by ``"\n\n"``.

Every tenth document is held out for validation, a fixed ~10% that depends on
nothing but the corpus. Caveat: the corpus is the running interpreter's, so its
exact text (not its size) varies across Python versions.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["MAX_DOCUMENT_CHARS", "SPLITS", "normalized", "pydoc_documents"]

#: Longest document in characters (a paragraph longer than this stays whole).
MAX_DOCUMENT_CHARS = 4000
#: Accepted values of ``split``.
SPLITS = ("train", "validation", "all")
# Documents i with i % _HOLDOUT_EVERY == _HOLDOUT_EVERY - 1 form the validation split.
_HOLDOUT_EVERY = 10


def normalized(paragraph: str) -> str:
    """``paragraph`` with every run of whitespace one space, none at either end: the
    text two paragraphs are compared by.

    >>> normalized("  Re-wrapped,\\n   re-indented.\\n") == normalized("Re-wrapped, re-indented.")
    True
    """
    return " ".join(paragraph.split())


def _first_occurrences(topics: dict[str, str]) -> list[list[str]]:
    """Per topic (sorted by key), its paragraphs not already seen (in it or before it),
    compared whitespace-normalised; the first occurrence is kept as written."""
    seen: set[str] = set()
    kept: list[list[str]] = []
    for key in sorted(topics):  # dict order is an implementation detail, the split must not be
        paragraphs = []
        for paragraph in topics[key].split("\n\n"):
            text = normalized(paragraph)
            if text and text not in seen:
                seen.add(text)
                paragraphs.append(paragraph)
        kept.append(paragraphs)
    return kept


def _group_paragraphs(paragraphs: list[str], max_chars: int) -> list[str]:
    """Greedily group paragraphs into documents of at most ``max_chars`` characters."""
    documents: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        # +2: the "\n\n" that joins this paragraph to the previous one
        if current and size + 2 + len(paragraph) > max_chars:
            documents.append("\n\n".join(current))
            current, size = [], 0
        size += (2 if current else 0) + len(paragraph)
        current.append(paragraph)
    if current:
        documents.append("\n\n".join(current))
    return documents


@lru_cache(maxsize=1)
def _all_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(
        document
        for paragraphs in _first_occurrences(topics)
        for document in _group_paragraphs(paragraphs, MAX_DOCUMENT_CHARS)
    )


def pydoc_documents(split: str = "train") -> list[str]:
    """Documents of the pydoc topics corpus.

    Parameters
    ----------
    split : "train" (~90% of documents), "validation" (the other ~10%), or "all".

    Returns
    -------
    list[str] : documents in a fixed order (sorted topic, then position in the
        topic), each at most ``MAX_DOCUMENT_CHARS`` characters unless a single
        paragraph is longer.

    Example
    -------
    >>> train, validation = pydoc_documents("train"), pydoc_documents("validation")
    >>> len(train) + len(validation) == len(pydoc_documents("all"))
    True
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    documents = _all_documents()
    if split == "all":
        return list(documents)
    held_out = [i % _HOLDOUT_EVERY == _HOLDOUT_EVERY - 1 for i in range(len(documents))]
    keep = split == "validation"
    return [doc for doc, out in zip(documents, held_out) if out == keep]
