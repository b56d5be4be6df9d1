"""embed_scatter: bit-exact forward, index_add-golden gradients, determinism, errors."""

import pytest
import torch

from metalm_fast import embed_scatter, reference
from metalm_fast.ops._backend import unavailable_reason
from tests.tolerance import assert_within_tolerance

BACKENDS = ["reference", "cpu", "triton"]


def _require(backend: str) -> None:
    if backend == "triton":
        reason = unavailable_reason("triton", torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
    if backend == "cpu" and not hasattr(torch.ops.metalm, "_embed_scatter_fwd_cpu"):
        from metalm_fast.ops._backend import cpu_extension

        if cpu_extension() is None or not hasattr(torch.ops.metalm, "_embed_scatter_fwd_cpu"):
            pytest.skip("cpu backend of embed_scatter is not built")


def _batch(tokens=203, vocab=50, width=24, feature_fraction=0.3, dtype=torch.float32, seed=0):
    """Many duplicate ids (vocab < tokens); features scattered at random positions."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, vocab, (tokens,), generator=generator)
    is_feature = torch.rand(tokens, generator=generator) < feature_fraction
    feature_index = torch.full((tokens,), -1, dtype=torch.int64)
    feature_index[is_feature] = torch.randperm(int(is_feature.sum()), generator=generator)
    weight = torch.randn(vocab, width, generator=generator).to(dtype)
    features = torch.randn(int(is_feature.sum()), width, generator=generator).to(dtype)
    return token_ids, weight, features, feature_index


def _golden_grads(grad_out, token_ids, feature_index, vocab, num_features, scale, padding_idx=None):
    """float64 index_add: the golden of both gradients."""
    is_token = feature_index < 0
    grad_weight = torch.zeros(vocab, grad_out.shape[1], dtype=torch.float64)
    grad_weight.index_add_(0, token_ids[is_token], grad_out[is_token].double() * scale)
    if padding_idx is not None:
        grad_weight[padding_idx] = 0
    grad_features = torch.zeros(num_features, grad_out.shape[1], dtype=torch.float64)
    grad_features.index_add_(0, feature_index[~is_token], grad_out[~is_token].double())
    return grad_weight, grad_features


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.125])
def test_forward_bit_exact(backend, dtype, scale):
    _require(backend)
    token_ids, weight, features, feature_index = _batch(dtype=dtype)
    out = embed_scatter(token_ids, weight, features, feature_index, scale=scale, backend=backend)
    expected = reference.embed_scatter(token_ids, weight, features, feature_index, scale=scale)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_inexact_scale_within_tolerance(backend):
    _require(backend)
    token_ids, weight, features, feature_index = _batch(dtype=torch.float16)
    scale = 1 / 3
    out = embed_scatter(token_ids, weight, features, feature_index, scale=scale, backend=backend)
    golden = reference.embed_scatter(
        token_ids, weight.double(), features.double(), feature_index, scale=scale
    )
    baseline = reference.embed_scatter(token_ids, weight, features, feature_index, scale=scale)
    assert_within_tolerance(out, golden, baseline, "out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_gradients_against_index_add_golden(backend, dtype, padding_idx):
    _require(backend)
    token_ids, weight, features, feature_index = _batch(dtype=dtype)
    token_ids[feature_index >= 0] = 3  # ids at feature positions must be ignored
    weight.requires_grad_(True)
    features.requires_grad_(True)
    grad_out = torch.randn(token_ids.shape[0], weight.shape[1]).to(dtype)
    out = embed_scatter(
        token_ids,
        weight,
        features,
        feature_index,
        scale=2.0,
        padding_idx=padding_idx,
        backend=backend,
    )
    out.backward(grad_out)
    golden_w, golden_f = _golden_grads(
        grad_out, token_ids, feature_index, weight.shape[0], features.shape[0], 2.0, padding_idx
    )
    # Baseline: the same index_add accumulated in the test dtype.
    is_token = feature_index < 0
    base_w = torch.zeros_like(weight).index_add_(0, token_ids[is_token], grad_out[is_token] * 2.0)
    if padding_idx is not None:
        base_w[padding_idx] = 0
    assert_within_tolerance(weight.grad, golden_w, base_w, "grad_weight")
    assert torch.equal(
        features.grad,
        grad_out[feature_index >= 0][torch.argsort(feature_index[feature_index >= 0])],
    )
    unused = torch.ones(weight.shape[0], dtype=torch.bool)
    unused[token_ids[is_token]] = False
    assert torch.all(weight.grad[unused] == 0)
    if padding_idx is not None:
        assert torch.all(weight.grad[padding_idx] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_no_features_and_all_features(backend, fraction):
    _require(backend)
    token_ids, weight, features, feature_index = _batch(feature_fraction=fraction)
    weight.requires_grad_(True)
    features.requires_grad_(True)
    out = embed_scatter(token_ids, weight, features, feature_index, backend=backend)
    assert torch.equal(out, reference.embed_scatter(token_ids, weight, features, feature_index))
    out.sum().backward()
    if fraction == 1.0:
        assert torch.all(weight.grad == 0)
    else:
        assert features.grad.shape == (0, weight.shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weight_and_int32_indices(backend):
    _require(backend)
    token_ids, weight, features, feature_index = _batch()
    wide = torch.randn(weight.shape[0], 2 * weight.shape[1])
    weight_view = wide[:, : weight.shape[1]]  # row stride 2*Dm, last dim contiguous
    assert not weight_view.is_contiguous()
    out = embed_scatter(
        token_ids.int(), weight_view, features, feature_index.int(), backend=backend
    )
    expected = reference.embed_scatter(token_ids, weight_view, features, feature_index)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_repeat(backend):
    _require(backend)
    token_ids, weight, features, feature_index = _batch(tokens=4000, vocab=7)
    grad_out = torch.randn(4000, weight.shape[1])

    def grads():
        w = weight.clone().requires_grad_(True)
        f = features.clone().requires_grad_(True)
        embed_scatter(token_ids, w, f, feature_index, backend=backend).backward(grad_out)
        return w.grad, f.grad

    first, second = grads(), grads()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ----------------------------------------------------------------------------- errors
def _good():
    batch = _batch(tokens=10, vocab=5, width=4, feature_fraction=0.3, seed=3)
    assert 0 < batch[2].shape[0] < 10, "the error tests need both kinds of position"
    return batch


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda i, w, f, x: (i.float(), w, f, x), TypeError, "token_ids must be int32 or int64"),
        (lambda i, w, f, x: (i[None], w, f, x), ValueError, "token_ids must be 1-D"),
        (lambda i, w, f, x: (i, w, f, x[:-1]), ValueError, "feature_index has 9 entries"),
        (lambda i, w, f, x: (i, w[0], f, x), ValueError, "weight must be 2-D"),
        (lambda i, w, f, x: (i, w.long(), f, x), TypeError, "weight must be a floating dtype"),
        (lambda i, w, f, x: (i, w, f[:, :2], x), ValueError, "features width 2"),
        (lambda i, w, f, x: (i, w, f.double(), x), TypeError, "features dtype"),
        (lambda i, w, f, x: (i, w.t(), f, x), ValueError, "weight must be contiguous"),
        (lambda i, w, f, x: (i, w, f.to("meta"), x), ValueError, "one device"),
    ],
)
def test_shape_dtype_device_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        embed_scatter(*mutate(*_good()), backend="reference")


def test_validate_catches_bad_ids_and_rows():
    token_ids, weight, features, feature_index = _good()
    bad_ids = token_ids.clone()
    bad_ids[feature_index < 0] = 99
    with pytest.raises(ValueError, match="token_ids contains 99"):
        embed_scatter(bad_ids, weight, features, feature_index, validate=True)
    negative = token_ids.clone()
    negative[feature_index < 0] = -2
    with pytest.raises(ValueError, match="token_ids contains -2"):
        embed_scatter(negative, weight, features, feature_index, validate=True)
    bad_rows = feature_index.clone()
    bad_rows[0] = features.shape[0]
    with pytest.raises(ValueError, match="feature_index contains"):
        embed_scatter(token_ids, weight, features, bad_rows, validate=True)
    # ids at feature positions are never read, so they may be anything
    placeholder = token_ids.clone()
    placeholder[feature_index >= 0] = 10**6
    embed_scatter(placeholder, weight, features, feature_index, validate=True)


def test_cpu_kernel_never_reads_out_of_range_without_validate():
    _require("cpu")
    token_ids, weight, features, feature_index = _good()
    token_ids[feature_index < 0] = 10**6
    with pytest.raises(RuntimeError, match="out of range"):
        embed_scatter(token_ids, weight, features, feature_index, backend="cpu")


def test_bad_padding_idx_and_scale():
    args = _good()
    with pytest.raises(ValueError, match="padding_idx"):
        embed_scatter(*args, padding_idx=5, backend="reference")
    with pytest.raises(ValueError, match="scale must be a finite float"):
        embed_scatter(*args, scale=float("inf"), backend="reference")


def test_opcheck():
    token_ids, weight, features, feature_index = _good()
    weight.requires_grad_(True)
    features.requires_grad_(True)
    for backend in BACKENDS:
        if backend == "cpu" and not hasattr(torch.ops.metalm, "_embed_scatter_fwd_cpu"):
            continue
        if backend == "triton" and unavailable_reason("triton", torch.device("cpu")):
            continue
        args = (token_ids, weight, features, feature_index, 2.0, -1, backend)
        torch.library.opcheck(torch.ops.metalm.embed_scatter_fwd.default, args)
