"""Whether a module call would run forward hooks: the inference fast paths that
compute a module's math without calling it (metalm_fast.models.fused_decode,
SpanSelfAttention's chunked projection) run only where no hook would see the
difference."""

from __future__ import annotations

import torch.nn.modules.module as module_hooks
from torch import nn

__all__ = ["forward_hooked"]

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_forward_hooks_always_called")


def forward_hooked(*modules: nn.Module | None) -> bool:
    """True when a global forward hook, or one on any of ``modules``, is registered."""
    if any(getattr(module_hooks, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)
