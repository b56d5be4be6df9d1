"""Tile table of the span attention kernels and how a launch picks from it.

One table, ``_TILES``, serves both the launchers in kernels/span_attention.py
(through ``_select_config``) and ``shipped_configs()`` there, so the
configurations checked ahead of time on sm_80 / sm_90 are the ones that run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ._config import DTYPE_NAMES as _DTYPE_NAMES


@dataclass(frozen=True)
class _Tiles:
    """Tile shape and launch options of one (pass, arch, dtype class, BLOCK_D)."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    fp32_precision: str = "tf32x3"  # tl.dot input_precision for fp32 inputs


# (pass, arch, dtype class, BLOCK_D) -> tiles; dtype class "16" is fp16 and bf16,
# "32" is fp32. Every entry was chosen as the largest tile, among those tried,
# that compiles for its arch with zero register spills (ptxas -v, both the
# D == BLOCK_D and the padded variant) and within the per-block shared memory.
#   * dK/dV holds two fp32 [BLOCK_N, D] accumulators across its whole loop, so
#     it owns many keys but streams few query rows.
#   * sm_90 wants 64-row tiles on the M side of each dot for wgmma; where no such
#     tile is spill-free (16-bit dQ and dK/dV at D=256; fp32 dK/dV at D=64 and
#     fp32 at D=128) the entry is smaller and Triton emits mma.sync, still on
#     tensor cores (the shipped config says so: extra["tensor_core"] = "mma").
#   * tf32x3 keeps hi and lo halves of each operand in registers, so fp32 tiles
#     are small; where no tf32x3 tile was spill-free (fp32 dK/dV at BLOCK_D=128,
#     every fp32 pass at BLOCK_D=256) the entry uses "ieee" (FMA, exact fp32, no
#     tensor cores; shipped with uses_matmul=False and a note).
# Registers are those of the cubin Triton ships (ptxas -lineinfo
# --regAllocOptLevel=2, as metalm_fast.tools.gpu_readiness measures them).
_TILES: dict[tuple[str, int, str, int], _Tiles] = {
    # ---- forward: q block of BLOCK_M rows owned, key tiles of BLOCK_N streamed
    ("fwd", 80, "16", 32): _Tiles(128, 64, 4, 3),
    ("fwd", 80, "16", 64): _Tiles(128, 64, 4, 3),
    ("fwd", 80, "16", 128): _Tiles(128, 32, 8, 3),
    ("fwd", 80, "16", 256): _Tiles(64, 64, 8, 2),
    ("fwd", 90, "16", 32): _Tiles(128, 128, 8, 3),
    ("fwd", 90, "16", 64): _Tiles(128, 128, 8, 3),
    ("fwd", 90, "16", 128): _Tiles(128, 128, 8, 2),
    ("fwd", 90, "16", 256): _Tiles(64, 64, 8, 2),
    ("fwd", 80, "32", 32): _Tiles(64, 32, 4, 3),
    ("fwd", 80, "32", 64): _Tiles(32, 32, 4, 2),
    ("fwd", 80, "32", 128): _Tiles(16, 16, 4, 2),
    ("fwd", 80, "32", 256): _Tiles(16, 16, 4, 1, "ieee"),
    ("fwd", 90, "32", 32): _Tiles(64, 64, 4, 3),
    ("fwd", 90, "32", 64): _Tiles(64, 16, 4, 2),
    ("fwd", 90, "32", 128): _Tiles(16, 16, 4, 2),
    ("fwd", 90, "32", 256): _Tiles(16, 16, 4, 1, "ieee"),
    # ---- backward dQ: like the forward
    ("bwd_dq", 80, "16", 32): _Tiles(128, 64, 8, 3),
    ("bwd_dq", 80, "16", 64): _Tiles(128, 64, 8, 3),
    ("bwd_dq", 80, "16", 128): _Tiles(64, 64, 8, 2),
    ("bwd_dq", 80, "16", 256): _Tiles(64, 32, 8, 2),
    ("bwd_dq", 90, "16", 32): _Tiles(128, 64, 8, 3),
    ("bwd_dq", 90, "16", 64): _Tiles(128, 64, 8, 3),
    ("bwd_dq", 90, "16", 128): _Tiles(128, 64, 8, 2),
    ("bwd_dq", 90, "16", 256): _Tiles(32, 32, 4, 2),
    ("bwd_dq", 80, "32", 32): _Tiles(64, 32, 4, 2),
    ("bwd_dq", 80, "32", 64): _Tiles(32, 32, 4, 2),
    ("bwd_dq", 80, "32", 128): _Tiles(16, 16, 8, 1),
    ("bwd_dq", 80, "32", 256): _Tiles(16, 16, 4, 1, "ieee"),
    ("bwd_dq", 90, "32", 32): _Tiles(64, 32, 4, 2),
    ("bwd_dq", 90, "32", 64): _Tiles(64, 16, 8, 2),
    ("bwd_dq", 90, "32", 128): _Tiles(16, 16, 4, 1),
    ("bwd_dq", 90, "32", 256): _Tiles(16, 16, 4, 1, "ieee"),
    # ---- backward dK/dV: key block of BLOCK_N rows owned, query blocks of BLOCK_M streamed
    ("bwd_dkdv", 80, "16", 32): _Tiles(32, 128, 8, 3),
    ("bwd_dkdv", 80, "16", 64): _Tiles(16, 128, 8, 2),
    ("bwd_dkdv", 80, "16", 128): _Tiles(32, 64, 8, 2),
    ("bwd_dkdv", 80, "16", 256): _Tiles(16, 32, 8, 1),
    ("bwd_dkdv", 90, "16", 32): _Tiles(64, 128, 8, 2),
    ("bwd_dkdv", 90, "16", 64): _Tiles(32, 128, 8, 2),
    ("bwd_dkdv", 90, "16", 128): _Tiles(16, 128, 8, 2),
    ("bwd_dkdv", 90, "16", 256): _Tiles(16, 32, 8, 1),
    ("bwd_dkdv", 80, "32", 32): _Tiles(16, 64, 4, 2),
    ("bwd_dkdv", 80, "32", 64): _Tiles(16, 32, 4, 2),
    ("bwd_dkdv", 80, "32", 128): _Tiles(32, 32, 8, 1, "ieee"),
    ("bwd_dkdv", 80, "32", 256): _Tiles(16, 32, 8, 1, "ieee"),
    ("bwd_dkdv", 90, "32", 32): _Tiles(32, 64, 4, 2),
    ("bwd_dkdv", 90, "32", 64): _Tiles(16, 32, 4, 2),
    ("bwd_dkdv", 90, "32", 128): _Tiles(16, 32, 8, 1, "ieee"),
    ("bwd_dkdv", 90, "32", 256): _Tiles(16, 32, 8, 1, "ieee"),
}

# The ops layer accepts multiples of 8 in [16, 256]; D < 32 runs padded to 32
# (tl.dot needs K >= 16 and 32 keeps one bucket for the small dims).
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MIN_BLOCK_D = 32


def _dot_precision(tiles: _Tiles, dtype: torch.dtype) -> str:
    """fp32: the entry's precision (tf32x3 unless noted). fp16/bf16 ignore it and use mma."""
    return tiles.fp32_precision if dtype == torch.float32 else "ieee"


def _constexprs(tiles: _Tiles, dtype: torch.dtype, block_d: int, even_d: bool) -> dict:
    """The constexpr arguments of a launch: shared by the launchers and shipped_configs()."""
    return {
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "BLOCK_D": block_d,
        "EVEN_D": even_d,
        "DOT_PRECISION": _dot_precision(tiles, dtype),
    }


def _block_d(head_dim: int) -> int:
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"span attention kernels support head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, "
            f"got {head_dim}"
        )
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def _select_config(pass_name: str, dtype: torch.dtype, head_dim: int, arch: int) -> _Tiles:
    """The tiles a launcher uses: the same table shipped_configs() enumerates."""
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"span attention kernels take fp16, bf16 or fp32, got {dtype}")
    dtype_class = "32" if dtype == torch.float32 else "16"
    return _TILES[(pass_name, arch, dtype_class, _block_d(head_dim))]


def _arch_of(tensor: torch.Tensor) -> int:
    """90 for compute capability >= 9, else 80; CPU tensors (interpreter) use the sm_80 tiles."""
    if tensor.device.type != "cuda":
        return 80
    major, _ = torch.cuda.get_device_capability(tensor.device)
    return 90 if major >= 9 else 80


def _config_notes(pass_name: str, arch: int, tiles: _Tiles, dtype: torch.dtype) -> str:
    """Why a config departs from wgmma on sm_90 or from tensor cores altogether."""
    if _dot_precision(tiles, dtype) == "ieee" and dtype == torch.float32:
        return "fp32 with ieee dots (FMA): no spill-free tf32x3 tile at this head dim"
    dot_rows = tiles.block_n if pass_name == "bwd_dkdv" else tiles.block_m
    if arch == 90 and dot_rows < 64:
        return "mma.sync on sm_90: no spill-free tile with the 64 rows wgmma needs"
    return ""
