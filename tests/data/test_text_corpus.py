"""The pydoc topics corpus: splits, coverage without repeats (whitespace aside), document
sizes."""

from pydoc_data.topics import topics

import pytest

from metalm_fast.data.text_corpus import (
    MAX_DOCUMENT_CHARS,
    _first_occurrences,
    _group_paragraphs,
    normalized,
    pydoc_documents,
)


def _paragraphs(documents):
    return [p for document in documents for p in document.split("\n\n")]


def test_splits_are_disjoint_and_cover_the_corpus():
    train, validation, every = (pydoc_documents(s) for s in ("train", "validation", "all"))
    assert sorted(train + validation) == sorted(every)
    assert 0.08 <= len(validation) / len(every) <= 0.12
    # disjoint down to paragraphs, whitespace aside: no held-out text is also trained on
    trained = {normalized(p) for p in _paragraphs(train)}
    assert trained.isdisjoint(normalized(p) for p in _paragraphs(validation))


def test_every_distinct_paragraph_is_kept_exactly_once():
    kept = [normalized(p) for p in _paragraphs(pydoc_documents("all"))]
    assert len(kept) == len(set(kept))
    distinct = {normalized(p) for text in topics.values() for p in text.split("\n\n")} - {""}
    assert set(kept) == distinct


def test_a_repeat_that_differs_only_in_whitespace_is_dropped():
    # the case exact comparison missed: a later topic re-wraps, re-indents or adds a
    # trailing newline to a paragraph an earlier topic (in sorted order) already holds
    topics_ = {
        "a": "Intro.\n\nThe same text,\nwrapped here.\n\nNote:",
        "b": "Other.\n\nThe same text, wrapped\n   here.\n\n   Note:\n",
    }
    assert _first_occurrences(topics_) == [
        ["Intro.", "The same text,\nwrapped here.", "Note:"],
        ["Other."],
    ]


def test_sizes():
    corpus_chars = sum(map(len, topics.values()))
    assert 400_000 <= corpus_chars <= 600_000, "pydoc_data holds about 460 KB of English"
    kept_chars = sum(map(len, pydoc_documents("all")))
    assert 0.7 * corpus_chars <= kept_chars <= corpus_chars, "repeats are about a fifth of the text"
    assert sum(map(len, pydoc_documents("validation"))) >= 0.05 * kept_chars


def test_paragraphs_group_into_bounded_documents_in_order():
    for text in topics.values():
        paragraphs = text.split("\n\n")
        documents = _group_paragraphs(paragraphs, MAX_DOCUMENT_CHARS)
        assert "\n\n".join(documents) == text
        for document in documents:
            assert len(document) <= MAX_DOCUMENT_CHARS or "\n\n" not in document


def test_documents_are_deterministic():
    assert pydoc_documents("train") == pydoc_documents("train")


@pytest.mark.parametrize("split", ["test", "Train", ""])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="split"):
        pydoc_documents(split)
