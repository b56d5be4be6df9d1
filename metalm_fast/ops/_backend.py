"""Backend selection shared by every op.

Backends: ``triton`` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1 for
tests), ``cuda`` (csrc/cuda, where an op has one), ``cpu`` (csrc/cpu via
``metalm_fast._C``), ``reference`` (the plain-PyTorch oracle).

``backend="auto"`` picks the fastest available backend for the tensors' device;
``METALM_FAST_BACKEND`` overrides "auto" globally. Asking for a backend that is
not available raises a ValueError that says why. Compiled extensions are
imported lazily here, so a missing build never breaks ``import metalm_fast``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


@functools.cache
def _import_extension(name: str):
    """Import ``metalm_fast.<name>``; return (module, None) or (None, why)."""
    try:
        return importlib.import_module(f"metalm_fast.{name}"), None
    except ImportError as error:
        return None, (
            f"the compiled extension metalm_fast.{name} is not built ({error}); "
            "reinstall with `pip install --no-build-isolation -e .`"
        )


def cpu_extension():
    """The ``metalm_fast._C`` module (registers torch.ops.metalm CPU kernels), or None."""
    return _import_extension("_C")[0]


def cuda_extension():
    """The ``metalm_fast._cuda`` module, or None."""
    return _import_extension("_cuda")[0]


def _extension_for(backend: str):
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'cpu' or 'cuda' (a compiled backend), got {backend!r}")
    return cpu_extension() if backend == "cpu" else cuda_extension()


@functools.cache
def compiled_op(name: str, backend: str = "cpu"):
    """``torch.ops.metalm.<name>.default`` from the ``backend`` extension, or None.

    None when the extension (``metalm_fast._C`` for "cpu", ``metalm_fast._cuda``
    for "cuda") is not built, or was built before the op existed. The one place
    that answers "is the compiled op built"; the answer is fixed for the process
    (an extension is imported once).
    """
    if _extension_for(backend) is None or not hasattr(torch.ops.metalm, name):
        return None
    return getattr(torch.ops.metalm, name).default


def compiled_op_available(name: str, backend: str = "cpu") -> bool:
    """True when :func:`compiled_op` finds ``torch.ops.metalm.<name>``."""
    return compiled_op(name, backend) is not None


def compiled_op_missing(backend: str, op_name: str) -> str | None:
    """Why ``torch.ops.metalm.<op_name>`` is missing from a built extension, or None.

    An extension built before an op was added imports fine but lacks the op;
    that must read as "not built", not as an AttributeError deep in a call.
    None also when the extension itself is not built: :func:`unavailable_reason`
    says that.
    """
    if _extension_for(backend) is None or compiled_op_available(op_name, backend):
        return None
    module = "_C" if backend == "cpu" else "_cuda"
    return (
        f"metalm_fast.{module} was built without {op_name}; rebuild it with "
        "`pip install --no-build-isolation -e .`"
    )


def eager_inference() -> bool:
    """True under torch.inference_mode outside torch.compile tracing.

    There a custom op's Python wrapper (dispatch, aliasing checks: microseconds a
    call) guards nothing, so the per-layer fast paths of a decode step call the
    backend's kernel directly; torch.compile still traces the custom op.
    """
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device}"
        return _import_extension("_C")[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        return _import_extension("_cuda")[1]
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (
            f"the triton backend needs CUDA tensors (got {device}); on CPU it runs "
            "only under the interpreter (TRITON_INTERPRET=1)"
        )
    return f"unknown backend {backend!r}"


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(
        f"metalm_fast.{op}: backend='auto' uses the slow reference backend because {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


# Dynamo runs this eagerly while tracing and bakes the answer into the graph:
# it imports modules and reads the environment, which must not be traced.
@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device: torch.device, supported: tuple[str, ...]) -> str:
    """Turn a requested backend into the one that will run, or raise ValueError.

    ``supported`` lists the backends ``op`` has, fastest first per device kind:
    "auto" picks the first available one for ``device``.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("METALM_FAST_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"METALM_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend not in supported:
            raise ValueError(f"{op} has no {backend!r} backend; it has {', '.join(supported)}")
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise ValueError(f"{op}: backend {backend!r} is not available: {reason}")
        return backend
    preferred = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for candidate in supported:
        if candidate in preferred and unavailable_reason(candidate, device) is None:
            return candidate
    reasons = [f"{c}: {unavailable_reason(c, device)}" for c in supported if c in preferred]
    _warn_fallback(op, "; ".join(reasons) or f"no fast backend exists for {device}")
    return "reference"


# Eager under torch.compile (imports, environment, warnings), as resolve_backend is.
@torch.compiler.assume_constant_result
def resolve_with_compiled_op(
    op: str, backend: str, device: torch.device, supported: tuple[str, ...], ops: dict[str, str]
) -> str:
    """:func:`resolve_backend`, plus a check that the compiled backend holds this op.

    ``ops`` maps each compiled backend ("cpu", "cuda") to the op's name in
    ``torch.ops.metalm``. An explicit request for a stale build raises
    ValueError; "auto" falls back to the next backend (the reference, on CPU)
    with a warning, as a missing build does.
    """
    resolved = resolve_backend(op, backend, device, supported)
    if resolved not in ops:
        return resolved
    reason = compiled_op_missing(resolved, ops[resolved])
    if reason is None:
        return resolved
    from_environment = os.environ.get("METALM_FAST_BACKEND", "auto") not in ("", "auto")
    if backend != "auto" or from_environment:
        raise ValueError(f"{op}: backend {resolved!r} is not available: {reason}")
    fallback = "triton" if resolved == "cuda" and "triton" in supported else "reference"
    warnings.warn(
        f"metalm_fast.{op}: using the {fallback} backend because {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback
