"""ptxas, cuobjdump and nvcc helpers of the GPU readiness tool.

Parsers of ``ptxas -v`` logs (registers, spills, shared memory per entry
function), tensor-core detection in PTX (mma.sync / wgmma) and in SASS
(HMMA / HGMMA counts), and locating the binaries Triton ships.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_ENTRY = re.compile(r"info\s*: Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"info\s*: Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class PtxasUsage:
    """One entry function's line of ``ptxas -v``."""

    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    static_smem: int = 0
    arch: str = ""


def parse_ptxas_verbose(log: str) -> dict[str, PtxasUsage]:
    """Parse ``ptxas -v`` output (Triton's single kernel or nvcc's many) into usage per entry.

    Device (non-entry) functions get "Function properties" lines too; they are
    kept only when an entry of that name exists, so callers see kernels only.
    """
    entries: dict[str, PtxasUsage] = {}
    frames: dict[str, tuple[int, int, int]] = {}
    current_entry = properties_of = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current_entry = match.group(1)
            entries[current_entry] = PtxasUsage(arch=match.group(2))
        elif match := _PROPERTIES.search(line):
            properties_of = match.group(1)
        elif (match := _FRAME.search(line)) and properties_of is not None:
            frames[properties_of] = tuple(int(value) for value in match.groups())
        elif (match := _USED.search(line)) and current_entry is not None:
            entries[current_entry].registers = int(match.group(1))
            if smem := _SMEM.search(line):
                entries[current_entry].static_smem = int(smem.group(1))
    for name, usage in entries.items():
        if name in frames:
            usage.stack_frame, usage.spill_stores, usage.spill_loads = frames[name]
    return entries


def sass_tensor_core_counts(sass: str) -> dict[str, int]:
    """HMMA + HGMMA instructions per function in ``cuobjdump -sass`` output."""
    counts, function = {}, None
    for line in sass.splitlines():
        if line.strip().startswith("Function :"):
            function = line.split(":", 1)[1].strip()
            counts[function] = 0
        elif function is not None and re.search(r"\b(HGMMA|HMMA)\.", line):
            counts[function] += 1
    return counts


def ptx_tensor_core(ptx: str) -> str:
    """The strongest tensor-core instruction in a PTX text: "wgmma", "mma" or "none"."""
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"(?<![\w.])mma\.(sync|sp)", ptx):
        return "mma"
    return "none"


# ----------------------------------------------------------------------------- tools
def _run(command: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)


def _triton_bin(name: str) -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _sass_counts(cubin_path: str) -> dict[str, int]:
    """Tensor-core SASS instructions per function of a cubin ({} without cuobjdump)."""
    cuobjdump = _triton_bin("cuobjdump") or shutil.which("cuobjdump")
    if cuobjdump is None:
        return {}
    return sass_tensor_core_counts(_run([cuobjdump, "-sass", cubin_path]).stdout)


def _short_name(demangled: str) -> tuple[str, str]:
    """("scale_kernel", "<float>") from "void (anonymous namespace)::scale_kernel<float>(...)"."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    if name.endswith(")"):  # drop the argument list: the last balanced (...) group
        depth = 0
        for position in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[position], 0)
            if depth == 0:
                name = name[:position]
                break
    base, angle, template = name.partition("<")
    return base.split("::")[-1], angle + template


def _demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    if not names or shutil.which("c++filt") is None:
        return {name: name for name in names}
    out = _run(["c++filt", *names]).stdout.splitlines()
    if len(out) != len(names):
        return {name: name for name in names}
    return dict(zip(names, out, strict=True))
