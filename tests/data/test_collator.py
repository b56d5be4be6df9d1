"""Semi-causal collator: the documented loss rule, packing, and batch invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metalm_fast.data.collator import (
    IGNORE_INDEX,
    SemiCausalCollator,
    build_batch,
    pack_documents,
)


def test_worked_example_of_the_docstring():
    a, b, c, d, e, f = 10, 11, 12, 13, 14, 15
    batch = build_batch([[a, b, c, d, e, f]], [2], [4])
    assert batch.feature_index.tolist() == [-1, -1, 0, 1, -1, -1]
    assert batch.labels.tolist() == [b, IGNORE_INDEX, IGNORE_INDEX, e, f, IGNORE_INDEX]
    assert batch.encoder_ids.tolist() == [c, d]
    assert batch.encoder_cu_seqlens.tolist() == [0, 2]


def test_pack_documents_respects_budget_and_keeps_every_token():
    documents = [[1] * 5, [2] * 9, [3] * 2, [], [4] * 4]
    groups = pack_documents(documents, 8)
    assert all(sum(map(len, group)) <= 8 for group in groups)
    flat = [token for group in groups for doc in group for token in doc]
    assert flat == [token for doc in documents for token in doc]


def _brute_force_labels(documents, starts, ends, placeholder=None):
    """The loss rule, position by position: a target in a span or a placeholder is not scored."""
    in_span = set()
    for s, e in zip(starts, ends):
        in_span.update(range(s, e))
    labels, offset = [], 0
    for doc in documents:
        for i in range(len(doc)):
            t = offset + i
            scored = i + 1 < len(doc) and t + 1 not in in_span and doc[i + 1] != placeholder
            labels.append(doc[i + 1] if scored else IGNORE_INDEX)
        offset += len(doc)
    return labels


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 700), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_invariants(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(0, 1000, (n,), generator=generator).tolist() for n in lengths]
    batch = SemiCausalCollator(seed=seed)(documents)
    starts, ends = batch.span_starts.tolist(), batch.span_ends.tolist()
    assert batch.labels.tolist() == _brute_force_labels(documents, starts, ends)
    # one encoder row per span token, in span order, equal to the decoder's span tokens
    assert int((batch.feature_index >= 0).sum()) == batch.encoder_ids.numel()
    rows = batch.feature_index[batch.feature_index >= 0]
    assert torch.equal(batch.encoder_ids[rows], batch.input_ids[batch.feature_index >= 0])
    assert batch.encoder_cu_seqlens[-1] == batch.encoder_ids.numel()
    assert batch.cu_seqlens[-1] == sum(lengths)
    last_tokens = batch.cu_seqlens[1:][batch.cu_seqlens[1:] > batch.cu_seqlens[:-1]] - 1
    assert not batch.loss_mask[last_tokens].any(), "a document's last token has no target"


IMAGE_ID = 3


@st.composite
def image_documents(draw):
    """Documents of text runs and image placeholder runs, with spans inside text runs only.

    Returns (documents, span_starts, span_ends, number of images, tokens_per_image).
    """
    tokens_per_image = draw(st.integers(1, 4))
    documents, starts, ends, images, offset = [], [], [], 0, 0
    for _ in range(draw(st.integers(1, 4))):
        doc = []
        for _ in range(draw(st.integers(0, 5))):
            if draw(st.booleans()):
                doc += [IMAGE_ID] * tokens_per_image
                images += 1
                continue
            run = draw(st.lists(st.integers(4, 999), min_size=1, max_size=12))
            if draw(st.booleans()):  # a span strictly inside this text run
                a = draw(st.integers(0, len(run) - 1))
                b = draw(st.integers(a + 1, len(run)))
                starts.append(offset + len(doc) + a)
                ends.append(offset + len(doc) + b)
            doc += run
        documents.append(doc)
        offset += len(doc)
    return documents, starts, ends, images, tokens_per_image


@settings(max_examples=60, deadline=None)
@given(case=image_documents())
def test_image_path_invariants(case):
    documents, starts, ends, count, tokens_per_image = case
    images = torch.rand(count, 1, 2, 2)
    batch = build_batch(
        documents,
        starts,
        ends,
        images=images,
        image_token_id=IMAGE_ID,
        tokens_per_image=tokens_per_image,
    )
    is_image = batch.image_index >= 0
    assert int(is_image.sum()) == count * tokens_per_image
    assert torch.equal(is_image, batch.input_ids == IMAGE_ID)
    # vision rows in position order: the r-th placeholder reads row r
    assert batch.image_index[is_image].tolist() == list(range(count * tokens_per_image))
    if count:
        assert torch.equal(batch.images, images)
    assert batch.labels.tolist() == _brute_force_labels(documents, starts, ends, IMAGE_ID)
    assert not bool((batch.labels[batch.loss_mask] == IMAGE_ID).any())
    assert not bool((is_image & (batch.feature_index >= 0)).any())
    assert int((batch.feature_index >= 0).sum()) == batch.encoder_ids.numel()


def test_image_path_bad_input_raises():
    doc = [10, IMAGE_ID, IMAGE_ID, 11, 12]
    two_images = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="placeholder"):
        build_batch([doc], [], [], images=two_images, image_token_id=IMAGE_ID, tokens_per_image=2)
    with pytest.raises(ValueError, match="image placeholder"):
        build_batch(
            [doc], [0], [2], images=two_images[:1], image_token_id=IMAGE_ID, tokens_per_image=2
        )
    with pytest.raises(ValueError, match="image_token_id"):
        build_batch([doc], [], [], images=two_images[:1], tokens_per_image=2)
    with pytest.raises(ValueError, match="no images"):
        build_batch([doc], [], [], image_token_id=IMAGE_ID, tokens_per_image=2)
    with pytest.raises(ValueError, match="images must be"):
        build_batch(
            [doc], [], [], images=torch.zeros(1, 2, 2), image_token_id=IMAGE_ID, tokens_per_image=2
        )


@pytest.mark.parametrize(
    "starts, ends, name",
    [([1.7], [3], "span_starts"), ([1], [3.2], "span_ends"), ([True], [3], "span_starts")],
)
def test_spans_that_are_not_integers_are_refused_not_truncated(starts, ends, name):
    with pytest.raises(TypeError, match=name):
        build_batch([[1, 2, 3, 4]], starts, ends)
