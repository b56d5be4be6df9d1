"""The Triton row kernel of fused_linear_cross_entropy under the interpreter: the op's
triton backend against the float64 golden, both block configs, the launcher on
hand-made non-finite rows, and the shipped configs covering every launch."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from metalm_fast.kernels import fused_linear_cross_entropy as kernels  # noqa: E402

from metalm_fast import fused_linear_cross_entropy  # noqa: E402
from tests.ops.test_fused_linear_cross_entropy import (  # noqa: E402, F401 (one_thread: autouse)
    IGNORE,
    check_against_golden,
    flce,
    make_case,
    one_thread,
    run,
)


@pytest.fixture
def small_chunks(monkeypatch):
    """12 rows per chunk at V = 1000 (fp32): several chunks, a ragged last one."""
    monkeypatch.setattr(flce, "CHUNK_BYTES", 12 * 1000 * 4)
    monkeypatch.setattr(flce, "CHUNK_ROWS_MIN", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_against_golden(dtype, reduction, small_chunks):
    case = make_case(tokens=29, width=16, dtype=dtype, ignored=0.3)
    check_against_golden("triton", case, reduction=reduction)


OPTIONS = {
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "wide_softcap": {"softcap": 50.0},  # |z / cap| < 0.125: tanh's polynomial branch
    "everything": {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "reduction": "sum"},
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("option", OPTIONS)
def test_options_against_golden(option, bias, small_chunks):
    case = make_case(tokens=19, width=16, bias=bias, seed=2)
    check_against_golden("triton", case, **OPTIONS[option])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_block_vocab(dtype):
    """V = 5003 > SMALL_VOCAB: the 2048-wide block, two full blocks and a ragged one."""
    assert kernels.block_config(5003) == kernels.BLOCKS["large"]
    case = make_case(tokens=6, width=16, vocab=5003, dtype=dtype, ignored=0.2, bias=True)
    check_against_golden("triton", case, **OPTIONS["everything"])


def test_all_rows_ignored():
    case = make_case(tokens=5, width=16, ignored=1.0, bias=True)
    loss, per_token, grads = run(fused_linear_cross_entropy, case, backend="triton")
    assert float(loss) == 0.0 and torch.all(per_token == 0)
    assert all(torch.all(grad == 0) for grad in grads.values())


def test_non_finite_rows():
    case = make_case(tokens=12, width=16, ignored=0.0, bias=True)
    case["labels"][2] = IGNORE
    case["hidden"][2] = float("nan")  # ignored: reaches nothing
    case["hidden"][5, 3] = float("nan")
    case["hidden"][9, 0] = float("-inf")
    loss, per_token, grads = run(fused_linear_cross_entropy, case, backend="triton")
    cpu = run(fused_linear_cross_entropy, case, backend="cpu")
    assert torch.isnan(loss)
    assert torch.isnan(per_token).nonzero().flatten().tolist() == [5, 9]
    finite = torch.isfinite(per_token)
    torch.testing.assert_close(per_token[finite], cpu[1][finite])
    assert torch.all(grads["hidden"][2] == 0) and torch.isnan(grads["hidden"][[5, 9]]).all()
    rows = [0, 1, 3, 4, 6, 7, 8, 10, 11]
    torch.testing.assert_close(grads["hidden"][rows], cpu[2]["hidden"][rows])
    assert torch.isnan(grads["weight"]).all() and torch.isnan(grads["bias"]).all()


def test_loss_only_launch_matches():
    """Without gradients the kernel's WRITE_GRAD=False variant gives the same losses."""
    case = make_case(tokens=10, width=16, bias=True)
    _, per_token, _ = run(fused_linear_cross_entropy, case, backend="triton", softcap=4.0)
    with torch.no_grad():
        _, plain = fused_linear_cross_entropy(
            case["hidden"],
            case["weight"],
            case["labels"],
            bias=case["bias"],
            softcap=4.0,
            return_per_token=True,
            backend="triton",
        )
    assert torch.equal(plain, per_token)


def test_bit_identical_on_repeat(small_chunks):
    case = make_case(tokens=25, width=16, bias=True)
    first = run(fused_linear_cross_entropy, case, backend="triton", label_smoothing=0.1)
    second = run(fused_linear_cross_entropy, case, backend="triton", label_smoothing=0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])


def _eager_rows(logits, labels, **options):
    """float64 per-row losses and d(sum of losses)/d logits, by autograd."""
    x = logits.double().requires_grad_(True)
    capped = (
        x
        if options.get("softcap") is None
        else options["softcap"] * torch.tanh(x / options["softcap"])
    )
    loss = torch.nn.functional.cross_entropy(
        capped, labels, reduction="none", label_smoothing=options.get("label_smoothing", 0.0)
    )
    loss = loss + options.get("z_loss", 0.0) * torch.logsumexp(capped, -1) ** 2
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def test_launcher_on_infinite_logits():
    """Rows of 2500 logits (two blocks of 2048): -inf entries only drop out, even when a
    whole first block is -inf; +inf or NaN make exactly their row NaN, as eager does."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 2500, generator=generator) * 3
    logits[1, ::7] = float("-inf")
    logits[2, :2048] = float("-inf")  # the whole first block
    logits[3, 100] = float("inf")
    logits[4, 2400] = float("nan")
    labels = torch.tensor([0, 1, 2300, 5, 6])
    options = {"label_smoothing": 0.0, "z_loss": 1e-3}
    expected_loss, expected_grad = _eager_rows(logits, labels, **options)
    loss = torch.empty(5)
    grad = logits.clone()
    kernels.cross_entropy_rows_(
        grad, labels, None, loss, softcap=None, grad_scale=1.0, write_grad=True, **options
    )
    assert torch.equal(torch.isnan(loss), torch.isnan(expected_loss))
    assert torch.isnan(loss[3:]).all() and torch.isnan(grad[3:]).all()
    torch.testing.assert_close(loss[:3].double(), expected_loss[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:3].double(), expected_grad[:3], rtol=1e-5, atol=1e-6)
    assert torch.all(grad[1, ::7] == 0) and torch.all(grad[2, :2048] == 0)


def test_launcher_softcap_and_grad_scale():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 777, generator=generator) * 20
    labels = torch.tensor([0, 776, 300, 5])
    options = {"label_smoothing": 0.3, "z_loss": 0.0, "softcap": 7.0}
    expected_loss, expected_grad = _eager_rows(logits, labels, **options)
    loss = torch.empty(4)
    grad = logits.clone()
    kernels.cross_entropy_rows_(
        grad, labels, None, loss, grad_scale=0.25, write_grad=True, **options
    )
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), 0.25 * expected_grad, rtol=1e-5, atol=1e-6)


def test_every_launch_is_a_shipped_config():
    configs = kernels.shipped_configs()
    shipped = {
        (
            c.arch,
            c.constexprs["BLOCK_V"],
            c.num_warps,
            c.constexprs["HAS_BIAS"],
            c.constexprs["HAS_SOFTCAP"],
            c.constexprs["WRITE_GRAD"],
        )
        for c in configs
    }
    for arch in (80, 90):
        for vocab in (1, 1000, kernels.SMALL_VOCAB, kernels.SMALL_VOCAB + 1, 32003, 256000):
            block_v, warps = kernels.block_config(vocab)
            for flags in [(b, s, g) for b in (0, 1) for s in (0, 1) for g in (0, 1)]:
                assert (arch, block_v, warps, *map(bool, flags)) in shipped
    assert all(c.op == "fused_linear_cross_entropy" and not c.uses_matmul for c in configs)
