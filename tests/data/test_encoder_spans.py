"""Spans re-tokenized for a text encoder with its own tokenizer, and pretrained tokenizers."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from metalm_fast.data.collator import IGNORE_INDEX, SemiCausalCollator, build_batch
from metalm_fast.data.encoder_spans import SpanRetokenizer, retokenize_spans
from metalm_fast.data.tokenizer import Tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "eps"]


def _word_tokenizer(specials: list[str], framing: bool = False) -> Backend:
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Backend(models.WordLevel(vocab, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if framing:  # BERT's [CLS] text [SEP]
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
        )
    return backend


def test_a_span_becomes_a_run_of_its_encoder_token_count():
    documents = [[10, 11, 12, 13, 14], [20, 21, 22]]
    # Span [1, 3) gives 3 encoder tokens, span [6, 8) gives 1.
    encode = {(11, 12): [7, 8, 9], (21, 22): [5]}
    docs, starts, ends, spans = retokenize_spans(
        documents, [6, 1], [8, 3], lambda ids: encode[tuple(ids)], placeholder_id=0
    )
    assert docs == [[10, 0, 0, 0, 13, 14], [20, 0]]
    assert (starts, ends, spans) == ([1, 7], [4, 8], [[7, 8, 9], [5]])
    batch = build_batch(docs, starts, ends, encoder_spans=spans)
    assert batch.encoder_ids.tolist() == [7, 8, 9, 5]
    assert batch.encoder_cu_seqlens.tolist() == [0, 3, 4]
    assert batch.feature_index.tolist() == [-1, 0, 1, 2, -1, -1, -1, 3]
    # The token after the span is predicted from its last position; none inside it.
    assert batch.labels.tolist() == [IGNORE_INDEX] * 3 + [13, 14] + [IGNORE_INDEX] * 3


def test_a_span_with_no_encoder_token_stays_in_the_decoder():
    docs, starts, ends, spans = retokenize_spans([[1, 2, 3]], [0], [2], lambda ids: [], 0)
    assert (docs, starts, ends, spans) == ([[1, 2, 3]], [], [], [])


@pytest.mark.parametrize(
    "starts, ends", [([3], [9]), ([-1], [2]), ([0, 1], [3, 4]), ([2**40], [2**40 + 1])]
)
def test_retokenize_refuses_spans_outside_a_document_or_overlapping(starts, ends):
    with pytest.raises(ValueError, match="span"):
        retokenize_spans([[1, 2, 3, 4], [5, 6]], starts, ends, lambda ids: [0], 0)


def test_encoder_spans_must_match_the_span_lengths():
    with pytest.raises(ValueError, match="span 0 .* 2 encoder tokens for 3 positions"):
        build_batch([[1, 2, 3, 4]], [0], [3], encoder_spans=[[5, 6]])
    with pytest.raises(ValueError, match="encoder_spans holds 2 spans"):
        build_batch([[1, 2, 3, 4]], [0], [3], encoder_spans=[[5, 6, 7], [8]])


def test_span_retokenizer_reads_the_text_with_the_encoders_framing(tmp_path):
    decoder = Tokenizer(_word_tokenizer(["<unk>", "<s>", "</s>"]), {"bos": 1, "eos": 2})
    encoder = _word_tokenizer(["[UNK]", "[CLS]", "[SEP]", "pad0", "pad1"], framing=True)
    ids = decoder.encode("beta gamma")
    assert SpanRetokenizer(decoder, encoder)(ids) == [1, 6, 7, 2]
    collator = SemiCausalCollator(
        span_min=2,
        span_max=2,
        fraction=0.5,
        span_encoder=SpanRetokenizer(decoder, encoder),
        placeholder_id=1,
    )
    batch = collator([decoder.encode("alpha beta gamma delta")])
    # One span of 2 decoder tokens became 4 encoder tokens ([CLS] w w [SEP]).
    assert batch.input_ids.numel() == 4 - 2 + 4
    assert batch.encoder_ids.numel() == 4
    assert int((batch.feature_index >= 0).sum()) == 4


def _save_pretrained_tokenizer(directory, backend, settings, config=None):
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_from_pretrained_reads_the_special_tokens(tmp_path):
    backend = _word_tokenizer(["<unk>", "<s>", "</s>", "<pad>"])
    settings = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}
    tokenizer = Tokenizer.from_pretrained(
        _save_pretrained_tokenizer(tmp_path / "llama", backend, settings)
    )
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert tokenizer.image_id == 3  # the pad token, being neither bos nor eos
    assert tokenizer.decode(tokenizer.encode("alpha eps")) == "alpha eps"


def test_from_pretrained_without_bos_starts_documents_with_eos(tmp_path):
    backend = _word_tokenizer(["<|endoftext|>"])
    directory = _save_pretrained_tokenizer(
        tmp_path / "qwen", backend, {"bos_token": None}, {"eos_token_id": 0}
    )
    tokenizer = Tokenizer.from_pretrained(directory)
    assert tokenizer.bos_id == tokenizer.eos_id == 0
    assert tokenizer.image_id is None


@pytest.mark.parametrize("token_id", [-1, 6, 2**40, True])
def test_from_pretrained_refuses_a_special_id_outside_the_vocabulary(tmp_path, token_id):
    backend = _word_tokenizer(["<unk>"])  # 6 tokens: <unk> and the five words
    directory = _save_pretrained_tokenizer(
        tmp_path / "bad", backend, {"bos_token": None}, {"eos_token_id": token_id}
    )
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_pretrained(directory)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    backend = _word_tokenizer(["<unk>", "<s>", "</s>"])
    directory = _save_pretrained_tokenizer(tmp_path / "x", backend, {"bos_token": "<s>"})
    with pytest.raises(ValueError, match="no eos token"):
        Tokenizer.from_pretrained(directory)
    settings = {"eos_token": "</s>"}
    directory = _save_pretrained_tokenizer(tmp_path / "y", backend, settings)
    with pytest.raises(ValueError, match="image_token '<img>'"):
        Tokenizer.from_pretrained(directory, image_token="<img>")
    assert Tokenizer.from_pretrained(directory, image_token="<unk>").image_id == 0
