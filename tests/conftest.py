"""Test-session setup.

Without a GPU, Triton kernels run under the interpreter. ``TRITON_INTERPRET``
is read when ``@triton.jit`` decorates a kernel, so it must be set before any
kernel module is imported: here, before collection. Tools that compile for a
real GPU ahead of time (metalm_fast.tools.gpu_readiness) clear it in their own
subprocesses.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_bf16_dot() -> None:
    """Triton 3.9's interpreter keeps bf16 as raw uint16 bits and feeds them to
    np.matmul as integers, so bf16 tl.dot returns garbage under the interpreter
    only. Widen bf16 dot operands to fp32 (exact) first; compiled kernels are
    untouched."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_metalm_bf16_dot", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._metalm_bf16_dot = True


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
    _patch_interpreter_bf16_dot()
