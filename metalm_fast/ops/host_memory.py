"""Zeroed CPU tensors on transparent huge pages, for the KV-cache pool.

The KV pool is tens to hundreds of MB and every decode step streams through
it. On 2 MiB pages the stream takes far fewer TLB misses than on 4 KiB pages,
and faulting the pool in costs far fewer page faults. So the pool starts on a
2 MiB boundary, is advised ``madvise(MADV_HUGEPAGE)`` and is then faulted in by
one ``madvise(MADV_POPULATE_WRITE)`` call (Linux 5.14+) before the zero fill:
when the zero fill's threads fault huge pages themselves, they contend.

Faulting in fresh huge pages can stall right after other large allocations, so
generation allocates its pool once per model and keeps it between calls
(metalm_fast.models.generation); the cost is paid once, not per call. The
figures are in benchmarks/results (cpu_end_to_end).

The advice is a hint about the backing pages, never about the contents: where
the platform or kernel does not take it (not Linux, THP disabled, no libc), the
tensor is ordinary zeroed memory and everything computes the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys

import torch

__all__ = ["HUGE_PAGE_BYTES", "zeros_on_huge_pages"]

HUGE_PAGE_BYTES = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page
_MADV_HUGEPAGE = 14  # linux/mman-common.h
_MADV_POPULATE_WRITE = 23  # an older kernel rejects it: the zero fill faults the pages


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype)`` on the CPU, backed by 2 MiB pages where possible.

    Tensors under two huge pages are plain ``torch.zeros``. Larger ones are a
    2 MiB-aligned view into a buffer one huge page longer, advised before the
    zero fill touches it.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    madvise = _madvise()
    if madvise is None or nbytes < 2 * HUGE_PAGE_BYTES:
        return torch.zeros(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE_BYTES
    region = raw[start : start + nbytes]
    madvise(region.data_ptr(), nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES, _MADV_HUGEPAGE)
    madvise(region.data_ptr(), nbytes, _MADV_POPULATE_WRITE)
    return region.view(dtype).view(shape).zero_()
