"""The docs/ARCHITECTURE.md tolerance rule, in one place.

A kernel output passes when

    max|out - golden| <= 2 * max|baseline - golden| + atol,
    atol = 2 * max|(golden + 0.3 - 0.3) - golden|   (arithmetic in the test dtype),

where golden is the reference in float64 and baseline is the reference run in
the test dtype. NaN is never tolerated.
"""

from __future__ import annotations

import torch


def rounding_atol(golden: torch.Tensor, dtype: torch.dtype) -> float:
    """2 * max|(g + 0.3 - 0.3) - g| with g = golden rounded to ``dtype``."""
    if golden.numel() == 0:
        return 0.0
    rounded = golden.to(dtype)
    shifted = (rounded + 0.3) - 0.3
    return 2.0 * float((shifted.double() - rounded.double()).abs().max())


def assert_within_tolerance(
    actual: torch.Tensor,
    golden: torch.Tensor,
    baseline: torch.Tensor,
    name: str,
    *,
    baseline_factor: float = 2.0,
) -> None:
    """Assert ``actual`` meets the rule against ``golden`` (float64) and ``baseline``.

    ``baseline_factor`` is the rule's 2; only the property tests, whose random
    tiny shapes include rows where the fp32 baseline happens to be nearly exact,
    widen it (and say so).
    """
    assert actual.shape == golden.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    )
    assert not torch.isnan(actual).any(), f"{name}: NaN in kernel output"
    if actual.numel() == 0:
        return
    actual64 = actual.detach().double().cpu()
    golden64 = golden.detach().double().cpu()
    baseline64 = baseline.detach().double().cpu()
    # Matching infinities (lse of an empty row) count as exact.
    same_inf = torch.isinf(golden64) & (actual64 == golden64)
    assert torch.equal(torch.isinf(actual64), torch.isinf(golden64)), f"{name}: inf pattern differs"
    diff = torch.where(same_inf, torch.zeros_like(actual64), actual64 - golden64).abs()
    base = torch.where(
        torch.isinf(golden64), torch.zeros_like(baseline64), baseline64 - golden64
    ).abs()
    base = torch.nan_to_num(base, nan=0.0, posinf=0.0)
    finite_golden = torch.where(torch.isinf(golden64), torch.zeros_like(golden64), golden64)
    atol = rounding_atol(finite_golden, actual.dtype)
    error, bound = float(diff.max()), baseline_factor * float(base.max()) + atol
    assert error <= bound, f"{name}: max error {error:.3e} > bound {bound:.3e} (atol {atol:.3e})"
