"""Semi-causal collator: the documented loss rule, packing, and batch invariants."""

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


def _brute_force_labels(documents, starts, ends):
    in_span = set()
    for s, e in zip(starts, ends):
        in_span.update(range(s, e))
    labels, offset = [], 0
    for doc in documents:
        for i in range(len(doc)):
            t = offset + i
            has_target = i + 1 < len(doc)
            labels.append(doc[i + 1] if has_target and t + 1 not in in_span else IGNORE_INDEX)
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
