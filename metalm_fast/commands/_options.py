"""Options every model-running command shares: ``--device`` and ``--dtype``.

``train``, ``generate``, ``eval`` and ``demo`` add them with
:func:`add_runtime_options` and read them with :func:`runtime_device`; the
rule behind them is :mod:`metalm_fast.training.runtime`.

Example
-------
>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_runtime_options(parser)
>>> args = parser.parse_args(["--device", "cpu", "--dtype", "bf16"])
>>> runtime_device(args), args.dtype
(device(type='cpu'), 'bf16')
"""

from __future__ import annotations

import argparse

import torch

from metalm_fast.training.distributed import DEVICES, resolve_device
from metalm_fast.training.runtime import DTYPES

__all__ = ["SEED_RANGE", "add_runtime_options", "check_seed", "runtime_device"]

#: the seeds torch.manual_seed takes (a 64-bit value, negative ones wrapped)
SEED_RANGE = (-(2**63), 2**64)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="where the model runs: auto (CUDA when torch sees a GPU, else "
        "the CPU), cpu or cuda (default auto)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="forward precision: fp32, or bf16 (torch.autocast to bfloat16, "
        "also on the CPU; weights stay fp32); auto is bf16 on CUDA and "
        "fp32 on the CPU (default auto)",
    )


def runtime_device(args: argparse.Namespace) -> torch.device:
    """The device ``--device`` names; ValueError naming ``--device`` when it is unavailable."""
    try:
        return resolve_device(args.device)
    except ValueError as error:
        raise ValueError(f"--device {args.device}: {error}; use --device cpu or auto") from error


def check_seed(seed: int) -> None:
    """ValueError naming ``--seed`` when torch cannot take it (it says only "Overflow
    when unpacking long long")."""
    low, high = SEED_RANGE
    if not low <= seed < high:
        raise ValueError(f"--seed must lie in [-2**63, 2**64), got {seed}")
