"""KernelConfig: one shipped (kernel, specialisation, arch) combination.

Every kernels/<op>.py exposes ``shipped_configs() -> list[KernelConfig]`` listing
every configuration its launchers can pick on a GPU. The GPU readiness tool
(metalm_fast.tools.gpu_readiness) compiles each one ahead of time with
``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda",
arch, 32))`` and reads its registers, spills and shared memory from ``ptxas -v``.
Launchers must choose only among these configurations, so that what is checked
is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
