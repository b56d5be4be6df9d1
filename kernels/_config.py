"""KernelConfig: one shipped (kernel, specialisation, arch) combination.

Every kernels/<op>.py exposes ``shipped_configs() -> list[KernelConfig]`` listing
every configuration its launchers can pick on a GPU. The GPU readiness tool
(metalm_fast.tools.gpu_readiness) compiles each one ahead of time with
``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda",
arch, 32))`` and reads its registers, spills and shared memory from ``ptxas -v``.
Launchers must choose only among these configurations, so that what is checked
is what runs.

The helpers that turn a kernel's argument list into the ASTSource inputs live
here too, one copy for every op: :func:`triton_signature` (argument types) and
:func:`aligned_attrs` (the divisibility the JIT specialises a typical call on).

>>> signature_of = {"x_ptr": "*fp16", "lse_ptr": "*fp32", "scale": "fp32", "n": "i32"}
>>> class Kernel:  # anything with Triton's ``arg_names``
...     arg_names = ["x_ptr", "lse_ptr", "scale", "n", "BLOCK"]
>>> triton_signature(Kernel, torch.float16, pointers={"lse_ptr": "*fp32"},
...                  scalars={"scale": "fp32"}) == signature_of
True
>>> aligned_attrs(Kernel)
{(0,): [['tt.divisibility', 16]], (1,): [['tt.divisibility', 16]]}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: Triton's name of every data dtype the kernels ship for.
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelConfig:
    """A kernel plus everything needed to compile it without a GPU.

    Attributes
    ----------
    kernel : triton.runtime.JITFunction
    op : str                 the op it belongs to, e.g. "span_attention"
    pass_name : str          e.g. "fwd", "bwd_dq", "bwd_dkdv"
    arch : int               80 (A100) or 90 (H100/H200)
    signature : dict         argument name -> Triton type ("*fp16", "i32", "fp32", ...)
                             for every non-constexpr argument, in order
    constexprs : dict        constexpr argument name -> value
    num_warps, num_stages : launch options
    uses_matmul : bool       whether the kernel does tl.dot (so mma/wgmma must appear)
    label : str              short human description, e.g. "bf16 D=128 BM=128 BN=64"
    """

    kernel: Any
    op: str
    pass_name: str
    arch: int
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    uses_matmul: bool = True
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _runtime_args(kernel) -> list[str]:
    """The non-constexpr arguments of ``kernel`` in order (constexprs are upper-case)."""
    return [name for name in kernel.arg_names if not name.isupper()]


def triton_signature(
    kernel,
    dtype: torch.dtype,
    *,
    pointers: Mapping[str, str] | None = None,
    scalars: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Triton types of every non-constexpr argument of ``kernel``, in order.

    A ``*_ptr`` argument points at data of ``dtype`` unless ``pointers`` names
    its type (indices, fp32 statistics); any other argument is ``i32`` unless
    ``scalars`` names its type (``fp32`` scales).
    """
    pointers, scalars = pointers or {}, scalars or {}
    data = "*" + DTYPE_NAMES[dtype]
    return {
        name: pointers.get(name, data) if name.endswith("_ptr") else scalars.get(name, "i32")
        for name in _runtime_args(kernel)
    }


def aligned_attrs(kernel) -> dict[tuple[int], list]:
    """ASTSource attrs for the specialisation the JIT compiles in practice.

    At run time Triton marks every pointer and integer argument that is a
    multiple of 16 with tt.divisibility=16; that is what lets loads vectorise
    and feed cp.async / TMA pipelines. torch allocations are 16-byte aligned,
    and with D a multiple of 16 (32, 64, 80, 96, 128, 256: every head dim
    docs/ARCHITECTURE.md lists) so are ``head_dim`` and every ``stride_*``.
    Other head dims (say 72) run a variant with finer-grained D masks that
    these attrs do not describe.
    """
    aligned = [
        index
        for index, name in enumerate(_runtime_args(kernel))
        if name.endswith("_ptr") or name.startswith("stride_") or name == "head_dim"
    ]
    return {(index,): [["tt.divisibility", 16]] for index in aligned}
