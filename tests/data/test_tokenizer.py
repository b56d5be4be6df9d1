"""The pydoc BPE tokenizer: exactness, special ids, vocab size, cache and determinism."""

import os

import pytest

from metalm_fast.data import tokenizer as tokenizer_module
from metalm_fast.data.text_corpus import pydoc_documents
from metalm_fast.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(1024, cache_dir=tmp_path_factory.mktemp("cache"))


def test_round_trip_on_held_out_corpus_text_and_unicode(tokenizer):
    for text in pydoc_documents("validation"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    for text in ["", " ", "naïve café ünïcode ∑ 漢字 🐍", "tabs\tand\nnewlines\r\n"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids_are_fixed_and_never_produced_from_text(tokenizer):
    ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id)
    assert ids == (0, 1, 2, 3)
    text = "a <image> b <bos><eos><pad>"
    encoded = tokenizer.encode(text)
    assert not set(encoded) & set(ids), "special tokens must not be forged from text"
    assert tokenizer.decode(encoded) == text


def test_decode_drops_specials_and_shows_each_image_run_once(tokenizer):
    hello = tokenizer.encode(" hello")
    image = tokenizer.image_id
    ids = [tokenizer.bos_id, image, image, image, *hello, tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "<image> hello"
    assert tokenizer.decode([image, *hello, image]) == "<image> hello<image>"


@pytest.mark.parametrize("vocab_size", [260, 1024])
def test_vocab_size_is_exact_and_covers_every_id(vocab_size, tmp_path):
    tokenizer = load_tokenizer(vocab_size, cache_dir=tmp_path)
    assert tokenizer.vocab_size == vocab_size
    ids = [i for text in pydoc_documents("all")[:20] for i in tokenizer.encode(text)]
    assert 0 <= min(ids) and max(ids) < vocab_size


@pytest.mark.parametrize("vocab_size", [0, 259, 1024.0, 10**6])
def test_bad_vocab_size_raises(vocab_size, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(vocab_size, cache_dir=tmp_path)


def test_cache_file_is_written_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("METALM_FAST_CACHE", str(tmp_path))
    first = load_tokenizer(300)
    path = tmp_path / tokenizer_module.cache_name(300)
    assert path.is_file()
    assert os.listdir(tmp_path) == [path.name], "no temporary file may be left behind"

    def no_training(vocab_size):
        raise AssertionError("the cached tokenizer must be reused, not retrained")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
    second = load_tokenizer(300)
    text = pydoc_documents("validation")[0]
    assert second.encode(text) == first.encode(text)


def test_training_is_deterministic_across_cache_dirs(tmp_path):
    load_tokenizer(512, cache_dir=tmp_path / "a")
    load_tokenizer(512, cache_dir=tmp_path / "b")
    name = tokenizer_module.cache_name(512)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_save_and_from_file_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "copy.json")
    copy = Tokenizer.from_file(tmp_path / "copy.json")
    text = pydoc_documents("validation")[1]
    assert copy.vocab_size == tokenizer.vocab_size
    assert copy.encode(text) == tokenizer.encode(text)
    assert [copy.encode(token) for token in SPECIAL_TOKENS] == [
        tokenizer.encode(token) for token in SPECIAL_TOKENS
    ]
