"""argmax_rows equals torch.argmax(-1) exactly: ties, NaN, infinities, odd widths."""

import pytest
import torch

from metalm_fast.ops.argmax_rows import argmax_rows, uses_kernel


def _cases(rows, width, seed):
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, width, generator=generator)
    ties = torch.randint(0, 3, (rows, width), generator=generator).float()
    with_nan = normal.clone()
    with_nan[:, width // 2] = float("nan")
    with_nan[0, width - 1] = float("nan")
    infinite = normal.clone()
    infinite[:, -1], infinite[:, 0] = float("inf"), float("-inf")
    all_minus_inf = torch.full((rows, width), float("-inf"))
    return {
        "normal": normal,
        "ties": ties,
        "nan": with_nan,
        "inf": infinite,
        "all -inf": all_minus_inf,
    }


@pytest.mark.parametrize(
    "rows, width", [(1, 1), (3, 5), (4, 16), (5, 17), (2, 33), (8, 8192), (7, 1000)]
)
def test_matches_torch_argmax(rows, width):
    for name, logits in _cases(rows, width, seed=rows * 1000 + width).items():
        assert torch.equal(argmax_rows(logits), logits.argmax(-1)), name


def test_strided_rows_and_fallbacks():
    wide = torch.randn(6, 300)
    view = wide[:, :257]  # row stride 300: still the kernel
    assert uses_kernel(view) == uses_kernel(wide)
    assert torch.equal(argmax_rows(view), view.argmax(-1))
    columns = wide[:, ::2]  # strided columns, float64, int: torch.argmax
    assert not uses_kernel(columns)
    assert torch.equal(argmax_rows(columns), columns.argmax(-1))
    assert torch.equal(argmax_rows(wide.double()), wide.double().argmax(-1))
    ints = torch.randint(0, 9, (3, 11))
    assert torch.equal(argmax_rows(ints), ints.argmax(-1))


def test_the_cpu_kernel_runs_when_built():
    try:
        import metalm_fast._C  # noqa: F401
    except ImportError:
        pytest.skip("metalm_fast._C is not built")
    assert uses_kernel(torch.randn(2, 64))


@pytest.mark.parametrize(
    "logits, error, match",
    [
        ([[1.0, 2.0]], TypeError, "logits must be a torch.Tensor"),
        (torch.randn(4), ValueError, r"logits must be \[B, V\]"),
        (torch.randn(2, 0), ValueError, "V > 0"),
    ],
)
def test_errors_name_the_argument(logits, error, match):
    with pytest.raises(error, match=match):
        argmax_rows(logits)


def test_a_vocab_past_int32_steps_aside_to_torch_argmax(tmp_path):
    """The kernel indexes lanes with int32 and refuses V >= 2**31 - 1; the rule must
    send such logits to torch.argmax instead of raising. A sparse file gives the
    [1, 2**31] fp32 tensor without 8 GB of memory (only uses_kernel looks at it)."""
    path = tmp_path / "logits.bin"
    with open(path, "wb") as handle:
        handle.truncate(2**31 * 4)
    logits = torch.from_file(str(path), shared=True, size=2**31, dtype=torch.float32)
    assert not uses_kernel(logits.view(1, 2**31))
    assert not uses_kernel(logits[: 2**31 - 1].view(1, -1))
