"""Compatibility names for metalm_fast/ops/paged_decode_attention.py, which imports
them from here; the op is metalm_fast.ops.kv_cache_append, the allocator
metalm_fast.nn.paged_kv_cache and the backend check metalm_fast.ops._backend."""

from metalm_fast.ops._backend import resolve_with_compiled_op
from metalm_fast.ops.kv_cache_append import check_cache_pair

__all__ = ["check_cache_pair", "resolve_with_compiled_op"]
