"""fused_linear_cross_entropy (cpu and reference backends): loss and every gradient against
the float64 golden under the tolerance rule, chunking, ignored rows, options, non-finite
rows, determinism, bad input, torch.compile. The triton backend: tests/kernels/."""

from __future__ import annotations

import importlib

import pytest
import torch

from metalm_fast import fused_linear_cross_entropy, reference
from tests.tolerance import assert_within_tolerance

# The ops package exports the function under the module's own name, so reach the module
# through importlib (attribute access would give the function).
flce = importlib.import_module("metalm_fast.ops.fused_linear_cross_entropy")

BACKENDS = ["cpu", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are tiny: on a shared 2-core machine OpenMP's thread barriers
    cost more than the work (100x here), so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_chunks(monkeypatch):
    """16 rows per chunk at V = 1000 (fp32), so every test crosses chunk boundaries."""
    monkeypatch.setattr(flce, "CHUNK_BYTES", 16 * 1000 * 4)
    monkeypatch.setattr(flce, "CHUNK_ROWS_MIN", 1)


def make_case(
    tokens=67, width=32, vocab=1000, dtype=torch.float32, ignored=0.25, bias=False, seed=0
):
    """hidden, weight (logits of a few units), labels with some ignored, optional bias."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * (2.0 / width**0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[torch.rand(tokens, generator=generator) < ignored] = IGNORE
    case = {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "labels": labels}
    if bias:
        case["bias"] = torch.randn(vocab, generator=generator).to(dtype)
    return case


def _leaves(case, dtype=None):
    """Fresh leaf copies of the float tensors (optionally cast), requiring grad."""
    out = {}
    for name, value in case.items():
        if value.dtype.is_floating_point:
            value = value.detach().to(dtype or value.dtype).requires_grad_(True)
        out[name] = value
    return out


def run(fn, case, dtype=None, **options):
    """(loss, per_token, {name: grad}) of ``fn`` on fresh leaves of ``case``."""
    leaves = _leaves(case, dtype)
    tensors = [leaves["hidden"], leaves["weight"], leaves["labels"]]
    loss, per_token = fn(*tensors, bias=leaves.get("bias"), return_per_token=True, **options)
    loss.backward()
    grads = {name: t.grad for name, t in leaves.items() if t.dtype.is_floating_point}
    return loss, per_token, grads


def check_against_golden(backend, case, **options):
    """Every output and gradient of ``backend`` meets the tolerance rule; the max errors."""
    dtype = case["hidden"].dtype
    loss, per_token, grads = run(fused_linear_cross_entropy, case, backend=backend, **options)
    g_loss, g_tokens, g_grads = run(
        reference.fused_linear_cross_entropy, case, torch.float64, **options
    )
    b_loss, b_tokens, b_grads = run(reference.fused_linear_cross_entropy, case, **options)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == per_token.dtype == expected_dtype
    assert not per_token.requires_grad
    assert_within_tolerance(loss, g_loss, b_loss, "loss")
    assert_within_tolerance(per_token, g_tokens, b_tokens, "per_token")
    errors = {"loss": float((loss.detach().double() - g_loss).abs())}
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        assert_within_tolerance(grad, g_grads[name], b_grads[name], f"grad {name}")
        errors[name] = float((grad.double() - g_grads[name]).abs().max())
    assert torch.all(per_token[case["labels"] == IGNORE] == 0)
    assert torch.all(grads["hidden"][case["labels"] == IGNORE] == 0)
    return errors


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_against_golden(backend, dtype, reduction, small_chunks):
    check_against_golden(backend, make_case(dtype=dtype), reduction=reduction)


OPTIONS = {
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "everything": {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "reduction": "sum"},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("option", OPTIONS)
def test_options_against_golden(backend, dtype, bias, option, small_chunks):
    check_against_golden(backend, make_case(dtype=dtype, bias=bias, seed=1), **OPTIONS[option])


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_32003(dtype):
    """A vocabulary that is no multiple of anything; one row per chunk (tiny budget)."""
    case = make_case(tokens=5, width=16, vocab=32003, dtype=dtype, ignored=0.2, bias=True)
    # fp16 eager (the baseline) overflows smoothing's sum over 32003 log-probs to inf.
    smoothing = 0.0 if dtype == torch.float16 else 0.1
    check_against_golden("cpu", case, label_smoothing=smoothing, softcap=8.0)


@pytest.mark.parametrize("tokens", [1, 16, 17])
def test_chunk_edges(tokens, small_chunks):
    """One row; exactly one chunk; one chunk plus one row."""
    check_against_golden("cpu", make_case(tokens=tokens, ignored=0.0), z_loss=1e-2)


def test_float64_is_exact_to_rounding(small_chunks):
    """float64 runs in float64 (golden and baseline coincide: compare directly)."""
    case = make_case(dtype=torch.float64, bias=True)
    loss, per_token, grads = run(fused_linear_cross_entropy, case, label_smoothing=0.1)
    g_loss, g_tokens, g_grads = run(reference.fused_linear_cross_entropy, case, label_smoothing=0.1)
    assert loss.dtype == per_token.dtype == torch.float64
    torch.testing.assert_close(loss, g_loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(per_token, g_tokens, rtol=1e-13, atol=1e-13)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, g_grads[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored(backend, reduction):
    """Loss 0 and zero gradients, never NaN, even where the ignored hidden is NaN."""
    case = make_case(tokens=9, ignored=1.0, bias=True)
    case["hidden"][4] = float("nan")
    loss, per_token, grads = run(
        fused_linear_cross_entropy, case, backend=backend, reduction=reduction
    )
    assert float(loss) == 0.0 and torch.all(per_token == 0)
    for name, grad in grads.items():
        assert torch.all(grad == 0), name


def test_tied_weight_gradients_add():
    """The head's weight is also the embedding table: both gradients land on it."""
    generator = torch.Generator().manual_seed(3)
    table = torch.randn(300, 24, generator=generator) * 0.3
    ids = torch.randint(0, 300, (40,), generator=generator)
    labels = torch.roll(ids, -1)
    labels[-1] = IGNORE
    mix = torch.randn(24, 24, generator=generator) * 0.3

    def grad_of(fn, dtype, **kw):
        weight = table.to(dtype).detach().requires_grad_(True)
        hidden = torch.tanh(weight[ids] @ mix.to(dtype))
        fn(hidden, weight, labels, **kw).backward()
        return weight.grad

    for dtype in (torch.float32, torch.bfloat16):
        got = grad_of(fused_linear_cross_entropy, dtype, backend="cpu")
        golden = grad_of(reference.fused_linear_cross_entropy, torch.float64)
        baseline = grad_of(reference.fused_linear_cross_entropy, dtype)
        assert_within_tolerance(got, golden, baseline, f"tied weight grad {dtype}")


def test_return_per_token_and_plain_loss_agree():
    case = make_case(bias=True)
    loss = fused_linear_cross_entropy(
        case["hidden"], case["weight"], case["labels"], bias=case["bias"]
    )
    both = fused_linear_cross_entropy(
        case["hidden"], case["weight"], case["labels"], bias=case["bias"], return_per_token=True
    )
    assert torch.equal(loss, both[0])
    scored = case["labels"] != IGNORE
    assert torch.allclose(both[1][scored].double().mean(), loss.double(), rtol=1e-6)


def test_grad_output_scales_and_accumulates():
    case = _leaves(make_case())
    loss = fused_linear_cross_entropy(case["hidden"], case["weight"], case["labels"])
    (loss * 3.0).backward()
    once = make_case()
    _, _, grads = run(fused_linear_cross_entropy, once)
    assert torch.allclose(case["hidden"].grad, 3 * grads["hidden"], rtol=1e-6, atol=0)
    assert torch.allclose(case["weight"].grad, 3 * grads["weight"], rtol=1e-6, atol=0)


def test_without_grad_the_loss_is_the_same():
    case = make_case(bias=True)
    _, per_token, _ = run(fused_linear_cross_entropy, case, softcap=4.0)
    with torch.no_grad():
        _, plain = fused_linear_cross_entropy(
            case["hidden"],
            case["weight"],
            case["labels"],
            bias=case["bias"],
            softcap=4.0,
            return_per_token=True,
        )
    assert torch.equal(plain, per_token)


def test_frozen_weight_gets_no_gradient():
    case = make_case()
    hidden = case["hidden"].requires_grad_(True)
    fused_linear_cross_entropy(hidden, case["weight"], case["labels"]).backward()
    assert case["weight"].grad is None and hidden.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_on_repeat(dtype, small_chunks):
    case = make_case(dtype=dtype, bias=True)
    first = run(fused_linear_cross_entropy, case, label_smoothing=0.1, z_loss=1e-3)
    second = run(fused_linear_cross_entropy, case, label_smoothing=0.1, z_loss=1e-3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def test_reference_grads_match_autograd():
    case = make_case(dtype=torch.float64, bias=True)
    options = {"label_smoothing": 0.15, "z_loss": 1e-2, "softcap": 2.5, "reduction": "sum"}
    _, _, grads = run(reference.fused_linear_cross_entropy, case, **options)
    explicit = reference.fused_linear_cross_entropy_grads(
        case["hidden"], case["weight"], case["labels"], bias=case["bias"], **options
    )
    for name, grad in zip(("hidden", "weight", "bias"), explicit):
        torch.testing.assert_close(grad, grads[name], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend, small_chunks):
    """NaN / inf hidden rows: exactly their losses are NaN; other rows' losses and
    grad_hidden match the golden; grad_weight and grad_bias mix rows and are NaN;
    a NaN in an ignored row reaches nothing."""
    case = make_case(tokens=40, ignored=0.0, bias=True)
    case["labels"][7] = IGNORE
    bad = [3, 20]
    case["hidden"][3, 5] = float("nan")
    case["hidden"][20, 0] = float("inf")
    case["hidden"][7] = float("nan")
    loss, per_token, grads = run(fused_linear_cross_entropy, case, backend=backend)
    g_loss, g_tokens, g_grads = run(reference.fused_linear_cross_entropy, case, torch.float64)
    _, b_tokens, b_grads = run(reference.fused_linear_cross_entropy, case)
    assert torch.isnan(loss) and torch.isnan(g_loss)
    assert torch.isnan(per_token).nonzero().flatten().tolist() == bad
    assert torch.equal(torch.isnan(per_token), torch.isnan(g_tokens))
    good = torch.ones(40, dtype=torch.bool)
    good[bad] = False
    assert_within_tolerance(per_token[good], g_tokens[good], b_tokens[good], "per_token")
    grad_hidden = grads["hidden"]
    assert torch.isnan(grad_hidden[bad]).all() and torch.all(grad_hidden[7] == 0)
    assert_within_tolerance(
        grad_hidden[good], g_grads["hidden"][good], b_grads["hidden"][good], "grad hidden"
    )
    assert torch.isnan(grads["weight"]).all() and torch.isnan(grads["bias"]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_ignored_rows_only(backend):
    case = make_case(tokens=30, ignored=0.3, bias=True, seed=5)
    clean = {k: v.clone() for k, v in case.items()}
    case["hidden"][case["labels"] == IGNORE] = float("nan")
    dirty = run(fused_linear_cross_entropy, case, backend=backend)
    clean_run = run(fused_linear_cross_entropy, clean, backend=backend)
    assert torch.equal(dirty[0], clean_run[0]) and torch.equal(dirty[1], clean_run[1])
    for name in dirty[2]:
        assert torch.equal(dirty[2][name], clean_run[2][name]), name


# ----------------------------------------------------------------------------- bad input
def _call(**changes):
    case = make_case(tokens=6, vocab=50, width=8)
    case.update(changes)
    options = {k: case.pop(k) for k in list(case) if k not in ("hidden", "weight", "labels")}
    return fused_linear_cross_entropy(case["hidden"], case["weight"], case["labels"], **options)


BAD_INPUTS = [
    ({"hidden": torch.randn(6, 8, 1)}, ValueError, "hidden must be 2-D"),
    ({"hidden": torch.randn(6, 7)}, ValueError, "D must match"),
    ({"hidden": torch.randn(6, 8).half()}, TypeError, "weight dtype"),
    ({"hidden": torch.randint(0, 3, (6, 8))}, TypeError, "hidden must be"),
    ({"weight": torch.randn(0, 8)}, ValueError, "at least one row"),
    ({"weight": torch.randn(8, 50).T}, ValueError, "weight must be contiguous"),
    ({"weight": [[1.0]]}, TypeError, "weight must be a torch.Tensor"),
    ({"labels": torch.zeros(5, dtype=torch.int64)}, ValueError, "labels has 5 entries"),
    ({"labels": torch.zeros(6)}, TypeError, "labels must be int32 or int64"),
    ({"labels": torch.zeros(6, dtype=torch.bool)}, TypeError, "labels must be int32 or int64"),
    ({"labels": torch.zeros(6, 1, dtype=torch.int64)}, ValueError, "labels must be 1-D"),
    ({"labels": torch.tensor([0, 1, 50, 2, 3, 4])}, ValueError, r"labels\[2\] = 50 is outside"),
    ({"labels": torch.tensor([0, 1, -1, 2, 3, 4])}, ValueError, r"labels\[2\] = -1"),
    ({"labels": torch.tensor([0, 2**32 + 1, 2, 3, 4, 5])}, ValueError, "4294967297"),
    ({"bias": torch.randn(49)}, ValueError, "bias has 49 entries"),
    ({"bias": torch.randn(50).double()}, TypeError, "bias dtype"),
    ({"bias": torch.randn(50, 1)}, ValueError, "bias must be 1-D"),
    ({"labels": torch.zeros(6, dtype=torch.int64, device="meta")}, ValueError, "one device"),
    ({"reduction": "none"}, ValueError, "reduction must be"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing must be in"),
    ({"label_smoothing": float("nan")}, ValueError, "label_smoothing must be a finite"),
    ({"label_smoothing": True}, ValueError, "label_smoothing must be a finite"),
    ({"z_loss": -1e-4}, ValueError, "z_loss must be in"),
    ({"z_loss": float("inf")}, ValueError, "z_loss must be a finite"),
    ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
    ({"softcap": -3.0}, ValueError, "softcap must be in"),
    ({"softcap": "30"}, ValueError, "softcap must be a finite"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
    ({"ignore_index": 2**64}, ValueError, "ignore_index must fit in int64"),
    ({"return_per_token": 1}, TypeError, "return_per_token must be a bool"),
    ({"backend": "cuda"}, ValueError, "has no 'cuda' backend"),
    ({"backend": "fast"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("changes, error, message", BAD_INPUTS)
def test_bad_input(changes, error, message):
    with pytest.raises(error, match=message):
        _call(**changes)


def test_labels_int32_and_a_custom_ignore_index():
    case = make_case(tokens=20, vocab=50, width=8, ignored=0.0)
    labels = case["labels"].clone()
    labels[::3] = 7  # ignore_index may be a real class id: those rows are skipped
    got = fused_linear_cross_entropy(
        case["hidden"], case["weight"], labels.to(torch.int32), ignore_index=7
    )
    keep = labels != 7
    eager = torch.nn.functional.cross_entropy(case["hidden"][keep] @ case["weight"].T, labels[keep])
    torch.testing.assert_close(got, eager)


def test_triton_refuses_float64():
    from metalm_fast.ops._backend import unavailable_reason

    if unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("triton cannot run here")
    with pytest.raises(TypeError, match="float64"):
        _call(
            hidden=torch.randn(6, 8).double(),
            weight=torch.randn(50, 8).double(),
            backend="triton",
        )


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_matches_eager():
    case = make_case(bias=True)

    def step(hidden, weight, labels, bias):
        loss, per_token = fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, softcap=6.0, return_per_token=True, backend="cpu"
        )
        return loss * 2.0, per_token

    eager = _leaves(case)
    compiled = _leaves(case)
    args = ("hidden", "weight", "labels", "bias")
    loss, per_token = step(*(eager[a] for a in args))
    loss.backward()
    torch._dynamo.reset()
    fn = torch.compile(step, fullgraph=True, backend="aot_eager")
    c_loss, c_per_token = fn(*(compiled[a] for a in args))
    c_loss.backward()
    assert torch.equal(c_loss, loss) and torch.equal(c_per_token, per_token)
    for name in ("hidden", "weight", "bias"):
        assert torch.equal(compiled[name].grad, eager[name].grad), name
