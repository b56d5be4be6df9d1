"""kv_cache_append: write new keys and values into their slots of a paged cache.

Layout of the paged KV cache (as in vLLM and FlashInfer): one pool of
``num_blocks`` pages per layer, for keys and for values, each page
``[block_size, Hkv, D]``::

    k_cache, v_cache : [num_blocks, block_size, Hkv, D]
    slot             = block * block_size + offset       (a token's place in the pool)
    block_table[b]   = the pages of sequence b, in order  (int32 [B, max_blocks])
    key p of b       = k_cache[block_table[b, p // block_size], p % block_size]

The allocator that hands out pages and slots is a module,
:class:`metalm_fast.nn.paged_kv_cache.PagedKVCache`; this file is the op.

:func:`kv_cache_append` writes new keys and values into their slots in place.
It is data movement, so every backend is a bit-exact copy. Slots < 0 are
skipped (padding); slots past the pool raise with ``validate=True`` and are
never written in any case (the kernels mask them).

Layers, as for the other ops: the ``metalm::kv_cache_append`` custom op (it
mutates the caches, has a fake implementation so ``torch.compile`` traces it,
and no autograd: the cache holds values, not a graph) and the public function
that validates on the host and picks a backend.
"""

from __future__ import annotations

import torch

from metalm_fast import reference
from metalm_fast.ops._backend import (
    cpu_extension,
    cuda_extension,
    eager_inference,
    resolve_with_compiled_op,
)
from metalm_fast.ops._validation import FLOAT_DTYPES, check_float_tensor, check_index_tensor

__all__ = [
    "CACHE_DTYPES",
    "append_unchecked",
    "check_cache_pair",
    "checked_append_backend",
    "kv_cache_append",
]

#: The dtypes a paged cache may hold (every backend copies them bit for bit).
CACHE_DTYPES = FLOAT_DTYPES

_SUPPORTED = ("triton", "cuda", "cpu", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COMPILED_OPS = {"cpu": "_kv_cache_append_cpu", "cuda": "_kv_cache_append_cuda"}


def _append_triton(k_cache, v_cache, k_new, v_new, slot_mapping):
    from metalm_fast.kernels.kv_cache_append import kv_cache_append_forward

    kv_cache_append_forward(k_cache, v_cache, k_new, v_new, slot_mapping)


def _append_cuda(k_cache, v_cache, k_new, v_new, slot_mapping):
    cuda_extension()
    torch.ops.metalm._kv_cache_append_cuda(k_cache, v_cache, k_new, v_new, slot_mapping)


def _append_cpu(k_cache, v_cache, k_new, v_new, slot_mapping):
    cpu_extension()
    torch.ops.metalm._kv_cache_append_cpu(k_cache, v_cache, k_new, v_new, slot_mapping)


_APPEND = {
    "triton": _append_triton,
    "cuda": _append_cuda,
    "cpu": _append_cpu,
    "reference": reference.kv_cache_append,
}


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("metalm::kv_cache_append", mutates_args=("k_cache", "v_cache"))
def _kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str,
) -> None:
    """Writes k_new / v_new into their slots of k_cache / v_cache, in place."""
    _APPEND[backend](k_cache, v_cache, k_new, v_new, slot_mapping)


@_kv_cache_append.register_fake
def _(k_cache, v_cache, k_new, v_new, slot_mapping, backend):
    return None


# ----------------------------------------------------------------------------- validation
def check_cache_pair(k_cache, v_cache) -> None:
    """Both caches: 4-D, floating, last dim contiguous, one shape, dtype and device."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_float_tensor(
            name, cache, "4-D [num_blocks, block_size, Hkv, D]", dtype_text="a floating dtype"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(
            f"k_cache and v_cache must have the same dtype, got {k_cache.dtype} and {v_cache.dtype}"
        )
    if k_cache.device != v_cache.device:
        raise ValueError(
            f"k_cache and v_cache must be on one device, got {k_cache.device} and {v_cache.device}"
        )


def _check_new(name: str, new, cache_name: str, cache: torch.Tensor) -> None:
    check_float_tensor(name, new, "3-D [T, Hkv, D]", dtype_text="a floating dtype")
    if new.shape[1:] != cache.shape[2:]:
        raise ValueError(
            f"{name} has [Hkv, D] = {list(new.shape[1:])} but {cache_name} holds "
            f"[Hkv, D] = {list(cache.shape[2:])}"
        )
    if new.dtype != cache.dtype:
        raise TypeError(
            f"{name} dtype {new.dtype} must equal {cache_name} dtype {cache.dtype} "
            "(the append is a bit-exact copy; cast first)"
        )
    if new.device != cache.device:
        raise ValueError(f"{name} is on {new.device} but {cache_name} is on {cache.device}")


def _check_append_inputs(k_cache, v_cache, k_new, v_new, slot_mapping) -> None:
    check_cache_pair(k_cache, v_cache)
    _check_new("k_new", k_new, "k_cache", k_cache)
    _check_new("v_new", v_new, "v_cache", v_cache)
    if k_new.shape[0] != v_new.shape[0]:
        raise ValueError(
            f"k_new and v_new must have the same number of tokens, got {k_new.shape[0]} "
            f"and {v_new.shape[0]}"
        )
    check_index_tensor("slot_mapping", slot_mapping, "1-D [T]")
    if slot_mapping.shape[0] != k_new.shape[0]:
        raise ValueError(
            f"slot_mapping must be 1-D with one slot per new token ({k_new.shape[0]}), "
            f"got shape {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.device != k_cache.device:
        raise ValueError(
            f"slot_mapping is on {slot_mapping.device} but k_cache is on {k_cache.device}"
        )


def _check_slots(slot_mapping: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """validate=True: every slot < num_blocks * block_size, no slot twice (one sync)."""
    num_slots = num_blocks * block_size
    slots = slot_mapping.to(torch.int64)
    outside = slots >= num_slots
    if bool(outside.any()):
        index = int(torch.nonzero(outside)[0, 0])
        raise ValueError(
            f"slot_mapping[{index}] = {int(slots[index])} is outside the pool: slots must be < "
            f"num_blocks * block_size = {num_blocks} * {block_size} = {num_slots} (or < 0 to skip)"
        )
    used = slots[slots >= 0]
    if used.numel() != torch.unique(used).numel():
        ordered = torch.sort(used).values
        repeated = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise ValueError(
            f"slot_mapping writes slot {repeated} more than once; slots must be distinct"
        )


# ----------------------------------------------------------------------------- public API
def kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = False,
    backend: str = "auto",
) -> None:
    """Write new keys and values into their slots of a paged cache, in place.

    ::

        k_cache[s // block_size, s % block_size] = k_new[t]     s = slot_mapping[t] >= 0
        v_cache[s // block_size, s % block_size] = v_new[t]

    Parameters
    ----------
    k_cache, v_cache : [num_blocks, block_size, Hkv, D], one floating dtype and
        device; only the last dim must be contiguous.
    k_new, v_new : [T, Hkv, D] in the caches' dtype (slices of a fused qkv
        projection work as they are).
    slot_mapping : int32/int64 [T]. A slot < 0 skips its token (padding). Every
        backend compares slots with the pool in int64 (never narrowed first), so
        2**32 + 1 is outside the pool, not slot 1.
    validate : check that every slot is inside the pool and that no slot repeats
        (one device synchronisation). Without it, slots past the pool are
        skipped, never written; with repeats, which write lands is unspecified.
    backend : {"auto", "triton", "cuda", "cpu", "reference"}. "auto" picks triton
        on CUDA tensors and cpu on CPU tensors.

    Returns
    -------
    None. The copy is bit-exact on every backend. No gradient flows into the
    cache (k_new and v_new are written detached).

    Example
    -------
    >>> import torch
    >>> from metalm_fast import kv_cache_append
    >>> k_cache, v_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
    >>> k_new, v_new = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    >>> kv_cache_append(k_cache, v_cache, k_new, v_new, torch.tensor([17, 18, -1]))
    >>> bool((k_cache[1, 1] == k_new[0]).all())
    True
    """
    resolved = checked_append_backend(
        k_cache, v_cache, k_new, v_new, slot_mapping, validate=validate, backend=backend
    )
    append_unchecked(k_cache, v_cache, k_new, v_new, slot_mapping, resolved)


def checked_append_backend(
    k_cache, v_cache, k_new, v_new, slot_mapping, *, validate: bool = False, backend: str = "auto"
) -> str:
    """Every check of :func:`kv_cache_append`; returns the backend that serves the call."""
    _check_append_inputs(k_cache, v_cache, k_new, v_new, slot_mapping)
    if validate:
        _check_slots(slot_mapping, k_cache.shape[0], k_cache.shape[1])
    resolved = resolve_with_compiled_op(
        "kv_cache_append", backend, k_cache.device, _SUPPORTED, _COMPILED_OPS
    )
    if resolved == "triton" and k_cache.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"the triton backend supports float16, bfloat16 and float32, got {k_cache.dtype} "
            "(k_cache)"
        )
    return resolved


def append_unchecked(k_cache, v_cache, k_new, v_new, slot_mapping, backend: str) -> None:
    """:func:`kv_cache_append` without its checks, on a backend from
    :func:`checked_append_backend`.

    For a caller that ran those checks on arguments of the same shapes, dtypes,
    devices and strides (the layers of one decode step share a pool and a slot
    mapping; metalm_fast.nn.kv_cache_attention checks the first layer only).
    """
    if eager_inference():
        _APPEND[backend](k_cache, v_cache, k_new, v_new, slot_mapping)
        return
    _kv_cache_append(k_cache, v_cache, k_new.detach(), v_new.detach(), slot_mapping, backend)
