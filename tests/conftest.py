"""Test-session setup.

Without a GPU, Triton kernels run under the interpreter. ``TRITON_INTERPRET``
is read when ``@triton.jit`` decorates a kernel, so it must be set before any
kernel module is imported: here, before collection. Tools that compile for a
real GPU ahead of time (metalm_fast.tools.gpu_readiness) clear it in their own
subprocesses.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
