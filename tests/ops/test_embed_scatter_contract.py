"""embed_scatter's contract is the same on every backend (issue 13).

An id outside [0, V) at a token position, or a feature row >= F, fails on
reference, cpu and triton alike, with validate=True (ValueError) and without
(RuntimeError naming the position, as the cpu kernel does): never Python's
negative indexing, never a zero row, never an int64 id aliased to a small one.
Bools and floats are not indices. A NaN or inf reaches exactly the rows that
read it, bit for bit.
"""

import pytest
import torch

from metalm_fast import embed_scatter, reference
from metalm_fast.ops import embed_scatter as embed_scatter_op
from tests.ops.test_embed_scatter import BACKENDS, _require

V, F, WIDTH = 5, 3, 8
BIG = 2**32  # BIG + k narrowed to int32 is k: a valid-looking row


def _tables(dtype=torch.float32):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(V, WIDTH, generator=generator).to(dtype)
    features = torch.randn(F, WIDTH, generator=generator).to(dtype)
    return weight, features


def _indices():
    """Tokens at 0, 2, 4; features at 1, 3 (rows 2 and 0)."""
    token_ids = torch.tensor([1, 0, 4, 0, 2])
    feature_index = torch.tensor([-1, 2, -1, 0, -1])
    return token_ids, feature_index


BAD_IDS = [-1, V, -BIG + 1, BIG + 1, 2**62]
BAD_ROWS = [F, BIG + 1, 2**62]


# (index argument, position spoiled, bad value, table size the error must name)
OUT_OF_RANGE = [("token_ids", 2, bad, V) for bad in BAD_IDS] + [
    ("feature_index", 3, bad, F) for bad in BAD_ROWS
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, position, bad, size", OUT_OF_RANGE)
def test_out_of_range_index_fails_on_every_backend(backend, name, position, bad, size):
    _require(backend)
    weight, features = _tables()
    token_ids, feature_index = _indices()
    {"token_ids": token_ids, "feature_index": feature_index}[name][position] = bad
    with pytest.raises(
        RuntimeError, match=rf"{name}\[{position}\]={bad} is out of range for {size}"
    ):
        embed_scatter(token_ids, weight, features, feature_index, backend=backend)
    with pytest.raises(ValueError, match=f"{name} contains {bad}"):
        embed_scatter(token_ids, weight, features, feature_index, validate=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_minus_one_id_fails(backend):
    _require(backend)
    weight, features = _tables()
    token_ids, feature_index = _indices()
    token_ids = token_ids.int()
    token_ids[0] = -1
    with pytest.raises(RuntimeError, match=r"token_ids\[0\]=-1 is out of range"):
        embed_scatter(token_ids, weight, features, feature_index.int(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_checks_rows_too(backend):
    _require(backend)
    token_ids, feature_index = _indices()
    token_ids[0] = -1
    grad_out = torch.ones(5, WIDTH)
    with pytest.raises(RuntimeError, match=r"token_ids\[0\]=-1 is out of range"):
        embed_scatter_op._embed_scatter_bwd(
            grad_out, token_ids, feature_index, V, F, 1.0, -1, backend
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_is_never_read_may_be_anything(backend):
    """Ids at feature positions are unread; any negative feature_index is a token."""
    _require(backend)
    weight, features = _tables()
    token_ids, feature_index = _indices()
    expected = reference.embed_scatter(token_ids, weight, features, feature_index)
    odd_ids = token_ids.clone()
    odd_ids[feature_index >= 0] = torch.tensor([-1, 2**62])
    odd_rows = feature_index.clone()
    odd_rows[feature_index < 0] = torch.tensor([-2, -BIG - 1, -(2**62)])
    out = embed_scatter(odd_ids, weight, features, odd_rows, validate=True, backend=backend)
    assert torch.equal(out, expected)
    assert torch.equal(embed_scatter(odd_ids, weight, features, odd_rows, backend=backend), out)


def test_reference_has_no_negative_indexing():
    weight, features = _tables()
    token_ids, feature_index = _indices()
    token_ids[0] = -1
    with pytest.raises(RuntimeError, match=r"token_ids\[0\]=-1 is out of range"):
        reference.embed_scatter(token_ids, weight, features, feature_index)


def test_reference_with_no_weight_rows_reads_only_features():
    _, features = _tables()
    weight = features.new_empty((0, WIDTH))
    out = reference.embed_scatter(torch.tensor([9, 9]), weight, features, torch.tensor([2, 0]))
    assert torch.equal(out, features[[2, 0]])


# ----------------------------------------------------------------------------- not integers
@pytest.mark.parametrize("padding_idx", [True, False, 1.0, "1"])
def test_padding_idx_must_be_an_int(padding_idx):
    weight, features = _tables()
    with pytest.raises(TypeError, match="padding_idx must be an int"):
        embed_scatter(*_indices()[:1], weight, features, _indices()[1], padding_idx=padding_idx)


def test_padding_idx_accepts_index_like_ints():
    weight, features = _tables()
    weight.requires_grad_(True)
    token_ids, feature_index = _indices()
    embed_scatter(
        token_ids, weight, features, feature_index, padding_idx=torch.tensor(-4)
    ).sum().backward()
    assert torch.all(weight.grad[1] == 0) and torch.all(weight.grad[4] != 0)


@pytest.mark.parametrize("which", ["token_ids", "feature_index"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_bool_and_float_indices_raise(which, dtype):
    weight, features = _tables()
    token_ids, feature_index = _indices()
    args = {"token_ids": token_ids, "feature_index": feature_index}
    args[which] = args[which].clamp(0, 1).to(dtype)
    with pytest.raises(TypeError, match=f"{which} must be int32 or int64"):
        embed_scatter(args["token_ids"], weight, features, args["feature_index"])


def test_more_than_2_31_positions_are_refused_on_the_shapes():
    weight, features = _tables()
    ids = torch.zeros(1, dtype=torch.int64).expand(2**31)  # stride 0: no memory behind it
    rows = torch.full((1,), -1).expand(2**31)
    # An unknown backend: if the shape check regressed, the call fails on the
    # backend name (and the match) instead of allocating a [2**31, Dm] output.
    with pytest.raises(ValueError, match="token_ids must have fewer than 2\\*\\*31 rows"):
        embed_scatter(ids, weight, features, rows, backend="not-a-backend")


# ----------------------------------------------------------------------------- non-finite values
def _bits(tensor):
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_non_finite_values_reach_exactly_their_rows(backend, dtype, scale):
    _require(backend)
    weight, features = _tables(dtype)
    weight[0, 1], weight[3, 2], weight[4, 0] = float("nan"), float("inf"), float("-inf")
    features[1, 3], features[2, 5] = float("nan"), float("-inf")
    # Weight rows 0 and 3 and feature row 1 are not read: they must not leak.
    token_ids = torch.tensor([4, 0, 1, 3, 2, 4])
    feature_index = torch.tensor([-1, 2, -1, 0, -1, 2])
    out = embed_scatter(token_ids, weight, features, feature_index, scale=scale, backend=backend)
    expected = torch.stack([weight[4] * scale, features[2], weight[1] * scale, features[0]])
    expected = torch.cat([expected, torch.stack([weight[2] * scale, features[2]])])
    assert torch.equal(_bits(out), _bits(expected))
    assert torch.isfinite(out[[2, 3, 4]]).all()
    assert out[0, 0] == float("-inf") and torch.isneginf(out[1, 5]) and torch.isneginf(out[5, 5])
