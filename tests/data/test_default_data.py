"""The default mixture: prompt formats, and the invariants of its micro-batch streams."""

from itertools import islice

import pytest
import torch

from metalm_fast.data.collator import SemiCausalBatch
from metalm_fast.data.default_data import (
    DefaultData,
    answer_tokens,
    caption_document,
    image_tokens,
    vqa_document,
    vqa_prompt,
)
from metalm_fast.data.digits import QUESTIONS, caption_variants
from metalm_fast.data.tokenizer import load_tokenizer
from tests.data.test_collator import _brute_force_labels

TOKENS_PER_IMAGE = 4
BUDGET = 512


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(512, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def data(tokenizer):
    return DefaultData(tokenizer, TOKENS_PER_IMAGE, token_budget=BUDGET, seed=1)


@pytest.fixture(scope="module")
def batches(data):
    return list(islice(data.micro_batches(), 12))


def _documents(batch: SemiCausalBatch) -> list[list[int]]:
    cu = batch.cu_seqlens.tolist()
    return [batch.input_ids[a:b].tolist() for a, b in zip(cu[:-1], cu[1:])]


def _assert_same(a: SemiCausalBatch, b: SemiCausalBatch) -> None:
    for name, value in vars(a).items():
        assert torch.equal(value, getattr(b, name)), name


def test_prompt_formats(tokenizer):
    bos, eos, image = tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id
    assert image_tokens(tokenizer, 3) == [image] * 3
    assert caption_document(tokenizer, "a 7.", 2) == [
        bos,
        image,
        image,
        *tokenizer.encode(" a 7."),
        eos,
    ]
    prompt = vqa_prompt(tokenizer, "is it even?", 2)
    assert prompt == [bos, image, image, *tokenizer.encode(" question: is it even? answer:")]
    assert answer_tokens(tokenizer, "yes") == tokenizer.encode(" yes")
    assert vqa_document(tokenizer, "is it even?", "yes", 2) == [
        *prompt,
        *answer_tokens(tokenizer, "yes"),
        eos,
    ]
    with pytest.raises(ValueError, match="tokens_per_image"):
        image_tokens(tokenizer, 0)


def test_stream_is_deterministic(tokenizer, data, batches):
    again = DefaultData(tokenizer, TOKENS_PER_IMAGE, token_budget=BUDGET, seed=1)
    for a, b, c in zip(batches, again.micro_batches(), data.micro_batches()):
        _assert_same(a, b)
        _assert_same(a, c)
    other = next(
        DefaultData(tokenizer, TOKENS_PER_IMAGE, token_budget=BUDGET, seed=2).micro_batches()
    )
    assert not torch.equal(other.input_ids, batches[0].input_ids)


def test_every_micro_batch_fills_the_budget_with_text_and_images(data, batches):
    for batch in batches:
        assert batch.input_ids.numel() == BUDGET
        placeholders = int((batch.input_ids == data.tokenizer.image_id).sum())
        assert placeholders == int((batch.image_index >= 0).sum())
        assert placeholders == batch.images.shape[0] * TOKENS_PER_IMAGE > 0
        assert batch.images.shape[1:] == (1, 8, 8)
        caption_tokens = sum(len(d) for d in _documents(batch) if data.tokenizer.image_id in d)
        assert caption_tokens <= data.image_budget
        assert batch.span_starts.numel() > 0, "text with semi-causal spans in every batch"


def test_image_runs_and_captions_match_their_images(data, batches):
    image_id = data.tokenizer.image_id
    flat_digits = data.digits.images.flatten(1)
    for batch in batches[:4]:
        captioned = [d for d in _documents(batch) if image_id in d]
        assert len(captioned) == batch.images.shape[0]
        for document, image in zip(captioned, batch.images):
            assert document[1 : 1 + TOKENS_PER_IMAGE] == [image_id] * TOKENS_PER_IMAGE
            assert document.count(image_id) == TOKENS_PER_IMAGE
            rows = (flat_digits == image.flatten()).all(1).nonzero().flatten()
            labels = set(data.digits.labels[rows].tolist())
            text = data.tokenizer.decode(document).removeprefix("<image> ")
            assert any(text in caption_variants(label) for label in labels)


def test_spans_stay_in_text_and_the_loss_follows_the_collator_rule(data, batches):
    image_id = data.tokenizer.image_id
    for batch in batches:
        starts, ends = batch.span_starts.tolist(), batch.span_ends.tolist()
        assert not bool(((batch.feature_index >= 0) & (batch.image_index >= 0)).any())
        for start, end in zip(starts, ends):
            assert image_id not in batch.input_ids[start:end].tolist()
            assert data.span_min <= end - start <= data.span_max
        expected = _brute_force_labels(_documents(batch), starts, ends, image_id)
        assert batch.labels.tolist() == expected
        assert not bool((batch.labels[batch.loss_mask] == image_id).any())


def test_text_pieces_rejoin_into_whole_corpus_documents(data, batches):
    tokenizer = data.tokenizer
    stream = [
        token
        for batch in batches
        for d in _documents(batch)
        if tokenizer.image_id not in d
        for token in d
    ]
    corpus = {tuple(document) for document in data.text_documents}
    whole = []
    for token in stream:
        whole.append(token)
        if token == tokenizer.eos_id:
            if whole[0] == tokenizer.bos_id:  # the stream may start mid-document: skip that one
                assert tuple(whole) in corpus
            whole = []


def test_image_fraction_zero_gives_text_only(tokenizer):
    data = DefaultData(tokenizer, TOKENS_PER_IMAGE, token_budget=256, image_fraction=0.0)
    batch = next(data.micro_batches())
    assert batch.images.shape[0] == 0 and not bool((batch.image_index >= 0).any())
    assert batch.input_ids.numel() == 256


def test_bad_arguments_raise(tokenizer):
    with pytest.raises(ValueError, match="image_fraction"):
        DefaultData(tokenizer, TOKENS_PER_IMAGE, image_fraction=1.5)
    with pytest.raises(ValueError, match="caption document"):
        DefaultData(tokenizer, 64, token_budget=100, image_fraction=0.5)
    with pytest.raises(ValueError, match="token_budget"):
        DefaultData(tokenizer, TOKENS_PER_IMAGE, token_budget=0)
    with pytest.raises(ValueError, match="tokens_per_image"):
        DefaultData(tokenizer, 0)
    with pytest.raises(ValueError, match="span_min"):
        DefaultData(tokenizer, TOKENS_PER_IMAGE, span_min=200, span_max=100)
    with pytest.raises(ValueError, match="split"):
        DefaultData(tokenizer, TOKENS_PER_IMAGE, text_split="test")
    with pytest.raises(ValueError, match="token_budget"):
        DefaultData(
            tokenizer, TOKENS_PER_IMAGE, token_budget=16, image_fraction=0.0
        ).vqa_micro_batches()


def test_vqa_stream_scores_only_answers(data):
    tokenizer = data.tokenizer
    answers = {answer for task in QUESTIONS for answer in task.candidates}
    batches = list(islice(data.vqa_micro_batches("test"), 3))
    for batch, again in zip(batches, data.vqa_micro_batches("test")):
        _assert_same(batch, again)
        assert 0 < batch.input_ids.numel() <= BUDGET
        assert batch.span_starts.numel() == 0
        documents = _documents(batch)
        assert len(documents) == batch.images.shape[0]
        labels = batch.labels.tolist()
        offset = 0
        for document in documents:
            prompts = [vqa_prompt(tokenizer, task.question, TOKENS_PER_IMAGE) for task in QUESTIONS]
            prompt_end = next(len(p) for p in prompts if document[: len(p)] == p)
            scored = [t for t in labels[offset : offset + len(document)] if t >= 0]
            assert scored == document[prompt_end:], "answer and <eos> only"
            assert tokenizer.decode(scored).strip() in answers
            offset += len(document)


def test_vqa_stream_with_full_loss_follows_the_collator_rule(data):
    batch = next(data.vqa_micro_batches("train", answer_only=False))
    expected = _brute_force_labels(_documents(batch), [], [], data.tokenizer.image_id)
    assert batch.labels.tolist() == expected


def test_default_settings(tokenizer):
    data = DefaultData(tokenizer, tokens_per_image=16)
    batch = next(data.micro_batches())
    assert batch.input_ids.numel() == 2048
    caption_tokens = int(sum(batch.cu_seqlens.diff()[-batch.images.shape[0] :]))
    assert 0.45 * 2048 <= caption_tokens <= 0.5 * 2048, "image_fraction is a share of tokens"
