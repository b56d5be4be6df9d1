"""The pydoc topics corpus: splits, coverage without repeats, document sizes."""

from pydoc_data.topics import topics

import pytest

from metalm_fast.data.text_corpus import MAX_DOCUMENT_CHARS, _group_paragraphs, pydoc_documents


def _paragraphs(documents):
    return [p for document in documents for p in document.split("\n\n")]


def test_splits_are_disjoint_and_cover_the_corpus():
    train, validation, every = (pydoc_documents(s) for s in ("train", "validation", "all"))
    assert sorted(train + validation) == sorted(every)
    assert 0.08 <= len(validation) / len(every) <= 0.12
    # disjoint down to paragraphs: no held-out text is also trained on
    assert not set(_paragraphs(train)) & set(_paragraphs(validation))


def test_every_distinct_paragraph_is_kept_exactly_once():
    kept = _paragraphs(pydoc_documents("all"))
    assert len(kept) == len(set(kept))
    distinct = {p for text in topics.values() for p in text.split("\n\n") if p.strip()}
    assert set(kept) == distinct


def test_sizes():
    corpus_chars = sum(map(len, topics.values()))
    assert 400_000 <= corpus_chars <= 600_000, "pydoc_data holds about 460 KB of English"
    kept_chars = sum(map(len, pydoc_documents("all")))
    assert 0.7 * corpus_chars <= kept_chars <= corpus_chars, "repeats are ~17% of the text"
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
