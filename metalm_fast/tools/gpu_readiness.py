"""GPU readiness: compile every shipped GPU kernel ahead of time and check its resources.

No GPU exists on development or CI machines (docs/ARCHITECTURE.md, "GPU truth without a
GPU"), so this tool holds GPU code to account without one::

    python -m metalm_fast.tools.gpu_readiness [--ops span_attention] [--arch 80 90]
        [--jobs 2] [--filter SUBSTRING] [--representative] [--output FILE] [--no-cache]

For every ``KernelConfig`` that a kernels/<op>.py lists in ``shipped_configs()``:

1. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
   sm_80 and sm_90, specialised as Triton's launcher specialises a typical
   call: the config's ``extra["attrs"]`` if it gives them, else pointers and
   ``stride*`` arguments divisible by 16 (see :func:`divisible_by_16`).
2. The PTX is assembled again with ``ptxas -v``, using the binary and flags
   Triton's own ``make_cubin`` uses for that arch (Triton's bundled ptxas for
   sm_80, ptxas-blackwell for sm_90a: the numbers are those of the cubin that
   ships). This gives registers and spill bytes.
3. ``ptxas -v`` also gives static shared memory (Triton kernels have none:
   they use one dynamic buffer); ``compiled.metadata.shared`` is the dynamic
   shared memory the launcher requests. The check is static + dynamic <= the
   opt-in per-block limit (sm_80: 163 KiB, sm_90: 227 KiB), the bound Triton's
   driver applies. (sm_90 cubins also carry the 1 KiB the driver reserves per
   block, which ``cuobjdump -res-usage`` adds to SHARED; the opt-in limit
   already excludes it, so it is not counted.)
4. Tensor cores: ``mma.sync`` / ``wgmma.mma_async`` in the PTX decide;
   HMMA / HGMMA in the SASS (``cuobjdump -sass``) are reported as confirmation.
   A config with ``uses_matmul`` must use mma on sm_80 and wgmma on sm_90
   (mma.sync leaves much of Hopper's tensor-core throughput unused); a config
   whose tiles are too small for wgmma declares it with
   ``extra={"tensor_core": "mma"}``. ``extra["note"]`` is printed under the table.

CUDA sources (csrc/cuda/*.cu) are compiled with nvcc for sm_80 and sm_90a with
``-Xptxas -v``, one row per ``__global__`` instantiation; their dynamic shared
memory is the launcher's choice, so only static shared memory is checked. With
``--ops``, only the .cu files named after (or prefixing) those ops are built.

The report header records the Triton, ptxas and nvcc versions and a sha256
prefix of every kernel source checked, so a recorded table names what it measured.

Why subprocesses: under ``TRITON_INTERPRET=1`` (set by the interpreter tests)
``@triton.jit`` returns ``InterpretedFunction`` objects at import time, which
``triton.compile`` cannot lower, and Triton reads the flag once. So kernels are
imported and compiled in worker processes started with TRITON_INTERPRET
removed from their environment; the same workers give ``--jobs`` parallelism.
Workers pull one config index at a time from the parent, so a slow config does
not hold the others back, and a crashed worker is replaced.

An op is a name in ``OPS`` (a module ``metalm_fast.kernels.<op>``) or a
``module:function`` spec returning KernelConfigs (tests use this for a private
fixture kernel). Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import platform
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metalm_fast.tools.ptx_tools import (
    _demangle,
    _run,
    _sass_counts,
    _short_name,
    find_nvcc,
    parse_ptxas_verbose,
    ptx_tensor_core,
)

#: Kernel modules checked by default; adding an op is one entry here.
OPS = (
    "span_attention",
    "embed_scatter",
    "paged_decode_attention",
    "kv_cache_append",
    "fused_linear_cross_entropy",
)

#: Opt-in maximum shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin):
#: A100 164 KiB per SM less 1 KiB reserved per block; H100/H200 228 KiB less 1 KiB.
SMEM_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}
#: The tensor-core instruction a matmul must compile to, per arch.
EXPECTED_TENSOR_CORE = {80: "mma", 90: "wgmma"}
#: nvcc -gencode per arch; sm_90a unlocks wgmma/TMA, as Triton's own sm_90 target does.
NVCC_GENCODE = {80: "arch=compute_80,code=sm_80", 90: "arch=compute_90a,code=sm_90a"}

REPO_ROOT = Path(__file__).resolve().parents[2]
_MARKER = "@@gpu_readiness@@ "  # prefixes protocol lines; Triton may print to stdout too


# ----------------------------------------------------------------------------- results
@dataclass
class Result:
    """Resources and verdict of one compiled (kernel, configuration, arch)."""

    op: str
    pass_name: str
    kernel: str
    label: str
    arch: int
    source: str = "triton"  # "triton" or "cuda"
    uses_matmul: bool = False
    expected_tensor_core: str | None = None
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0
    dynamic_smem: int | None = None  # None: chosen by a CUDA launcher, unknown here
    ptx_tensor_core: str = "none"  # "wgmma", "mma" or "none"
    sass_tensor_core_count: int | None = None  # HGMMA/HMMA instructions in the SASS
    compile_seconds: float = 0.0
    error: str | None = None
    note: str = ""  # the config's own remark (extra["note"]), e.g. why no tensor cores
    failures: list[str] = field(default_factory=list)

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def shared_bytes(self) -> int:
        return self.static_smem + (self.dynamic_smem or 0)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        return "OK" if self.ok else "FAIL: " + "; ".join(self.failures)


def check(result: Result) -> list[str]:
    """The readiness checks; returns the failures (empty when the result passes)."""
    if result.error:
        return [result.error]
    failures = []
    if result.spill_bytes:
        failures.append(f"spills {result.spill_stores} B st + {result.spill_loads} B ld")
    limit = SMEM_LIMIT_BYTES.get(result.arch)
    if limit is not None and result.shared_bytes > limit:
        failures.append(f"shared memory {result.shared_bytes} B > {limit} B limit")
    expected = result.expected_tensor_core
    if result.uses_matmul and expected and result.ptx_tensor_core != expected:
        failures.append(f"no {expected} (tensor cores: {result.ptx_tensor_core})")
    return failures


@dataclass
class Report:
    """Everything one run produced: results, notes (skipped modules), errors, tool versions."""

    results: list[Result]
    notes: list[str]
    errors: list[str]  # contract breaches outside any one config (fail the run)
    tools: dict[str, str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.errors and all(result.ok for result in self.results)


# ----------------------------------------------------------------------------- worker side
def import_kernel_module(op: str):
    """Import ``metalm_fast.kernels.<op>``; None when the op has no module yet.

    Installed (or editable-installed from outside the tree), metalm_fast.kernels
    resolves through setup.py's package_dir. Run from the source tree, the
    plain ``metalm_fast`` directory wins and has no ``kernels``; then the
    top-level kernels/ package is registered under that name.
    """
    try:
        importlib.import_module("metalm_fast.kernels")
    except ModuleNotFoundError:
        kernels_dir = REPO_ROOT / "kernels"
        spec = importlib.util.spec_from_file_location(
            "metalm_fast.kernels",
            kernels_dir / "__init__.py",
            submodule_search_locations=[str(kernels_dir)],
        )
        if spec is None:
            return None
        package = importlib.util.module_from_spec(spec)
        sys.modules["metalm_fast.kernels"] = package
        spec.loader.exec_module(package)
        sys.modules["metalm_fast"].kernels = package
    name = f"metalm_fast.kernels.{op}"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


def _provider_configs(provider: str) -> tuple[list, str | None, str | None]:
    """(configs, note, error) for an op name or a ``module:function`` spec.

    A module not written yet is a note; a module that breaks the contract
    (no shipped_configs(), or it raises) is an error, which fails the run.
    """
    try:
        if ":" in provider:
            module_name, function_name = provider.split(":", 1)
            return list(getattr(importlib.import_module(module_name), function_name)()), None, None
        module = import_kernel_module(provider)
        if module is None:
            return [], f"skipped {provider}: kernels/{provider}.py does not exist yet", None
        if not hasattr(module, "shipped_configs"):
            return [], None, f"kernels/{provider}.py has no shipped_configs()"
        return list(module.shipped_configs()), None, None
    except Exception as error:  # noqa: BLE001 - reported as this provider's failure
        return [], None, f"{provider}: {type(error).__name__}: {error}"


def _describe(config) -> dict:
    """A JSON-safe summary of a KernelConfig, for selection and the table."""
    pointer_types = [t for t in config.signature.values() if str(t).startswith("*")]
    return {
        "op": config.op,
        "pass_name": config.pass_name,
        "arch": config.arch,
        "kernel": _unwrap_jit(config.kernel).__name__,
        "label": config.label,
        "dtype": pointer_types[0][1:] if pointer_types else "",
        "tile_size": sum(v for v in config.constexprs.values() if type(v) is int),
    }


def _unwrap_jit(kernel):
    # triton.autotune / triton.heuristics wrap the JITFunction in `.fn` layers.
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def divisible_by_16(config) -> list[str]:
    """The arguments compiled as multiples of 16, as Triton's launcher would specialise them.

    At launch Triton specialises every pointer that is 16-byte aligned and every
    int that is a multiple of 16; what it compiles depends on the call. The
    default here is the typical call: all pointers (torch allocations are
    aligned) and every ``stride*`` argument (row strides of [T, H, D] tensors
    with D a multiple of 16). Other ints (lengths, head_dim) stay generic. A
    config states its own with ``extra={"divisible_by_16": [names]}``, or gives
    raw ASTSource attrs as ``extra={"attrs": {(index,): [["tt.divisibility", 16]]}}``
    (which win). The difference is not cosmetic: unknown strides block
    vectorised loads and can cost dozens of registers.
    """
    if "divisible_by_16" in config.extra:
        return list(config.extra["divisible_by_16"])
    return [
        name
        for name, ty in config.signature.items()
        if str(ty).startswith("*") or name.startswith("stride")
    ]


def _compile_triton(config) -> Result:
    """Compile one KernelConfig and measure it (runs in a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    kernel = _unwrap_jit(config.kernel)
    expected = config.extra.get("tensor_core", EXPECTED_TENSOR_CORE.get(config.arch))
    result = Result(
        op=config.op,
        pass_name=config.pass_name,
        kernel=kernel.__name__,
        label=config.label,
        arch=config.arch,
        uses_matmul=config.uses_matmul,
        expected_tensor_core=expected,
        note=str(config.extra.get("note") or ""),
    )
    start = time.perf_counter()
    try:
        attrs = config.extra.get("attrs") or {
            (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name in divisible_by_16(config)
        }
        source = ASTSource(
            fn=kernel, signature=config.signature, constexprs=config.constexprs, attrs=attrs
        )
        options = {
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
            **config.extra.get("compile_options", {}),
        }
        compiled = triton.compile(
            source, target=GPUTarget("cuda", config.arch, 32), options=options
        )
    except Exception as error:  # noqa: BLE001 - any compiler error is this config's verdict
        lines = [line for line in str(error).splitlines() if line.strip()] or [""]
        result.error = f"compile: {type(error).__name__}: {lines[-1].strip()[:200]}"
        result.compile_seconds = time.perf_counter() - start
        return result
    result.dynamic_smem = int(compiled.metadata.shared)
    result.ptx_tensor_core = ptx_tensor_core(compiled.asm["ptx"])
    with tempfile.TemporaryDirectory(prefix="gpu_readiness_") as tmp:
        ptx_path, cubin_path = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        ptx_path.write_text(compiled.asm["ptx"])
        cubin_path.write_bytes(compiled.asm["cubin"])
        # The flags of Triton's make_cubin, so the numbers are the shipped cubin's.
        fmad = [] if getattr(compiled.metadata, "enable_fp_fusion", True) else ["--fmad=false"]
        command = [
            get_ptxas(config.arch).path,
            "-v",
            "-lineinfo",
            "--regAllocOptLevel=2",
            *fmad,
            f"--gpu-name={sm_arch_from_capability(config.arch)}",
            str(ptx_path),
            "-o",
            str(Path(tmp) / "reassembled.cubin"),
        ]
        assembled = _run(command)
        usage = parse_ptxas_verbose(assembled.stderr + assembled.stdout).get(compiled.name)
        sass = _sass_counts(str(cubin_path))
    if assembled.returncode != 0 or usage is None:
        result.error = f"ptxas failed: {(assembled.stderr.strip().splitlines() or [''])[-1]}"
    else:
        result.registers = usage.registers
        result.spill_stores, result.spill_loads = usage.spill_stores, usage.spill_loads
        result.static_smem = usage.static_smem
        result.sass_tensor_core_count = sass.get(compiled.name)
    result.compile_seconds = time.perf_counter() - start
    return result


def _tool_versions() -> dict[str, str]:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    versions = {"triton": triton.__version__}
    for arch in (80, 90):
        tool = get_ptxas(arch)
        versions[f"ptxas sm_{arch}"] = f"{Path(tool.path).name} {tool.version}"
    return versions


def _source_digests(configs) -> dict[str, str]:
    """sha256 (12 hex) of every loaded module beside the kernels' sources.

    The kernels' own files and the helpers they imported from the same
    directory (kernels/_span_attention_tiles.py, ...): the record names exactly
    what it measured.
    """
    directories = {Path(inspect.getsourcefile(_unwrap_jit(c.kernel).fn)).parent for c in configs}
    paths = {
        Path(module.__file__)
        for module in list(sys.modules.values())
        if getattr(module, "__file__", None) and Path(module.__file__).parent in directories
    }
    digests = {}
    for path in sorted(paths):
        label = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        digests[f"source {label}"] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return digests


def _emit(message: dict) -> None:
    sys.stdout.write(_MARKER + json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main(providers: Sequence[str]) -> int:
    """Worker loop: list configs once, then compile each index the parent sends."""
    configs, notes, errors = [], [], []
    for provider in providers:
        found, note, error = _provider_configs(provider)
        configs += found
        notes += [note] if note else []
        errors += [error] if error else []
    _emit(
        {
            "listing": [_describe(c) for c in configs],
            "notes": notes,
            "errors": errors,
            "tools": {**_tool_versions(), **_source_digests(configs)},
        }
    )
    for line in sys.stdin:
        index = int(line)
        result = _compile_triton(configs[index])
        _emit({"index": index, "result": asdict(result)})
    return 0


# ----------------------------------------------------------------------------- parent side
class _Worker:
    """One compile subprocess with a clean environment, spoken to over pipes."""

    def __init__(self, providers: Sequence[str], env: dict[str, str]):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "metalm_fast.tools.gpu_readiness", "--worker", *providers],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            cwd=str(REPO_ROOT),
            env=env,
        )

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(_MARKER):
                return json.loads(line[len(_MARKER) :])
        self.process.wait()
        self.stderr.seek(0)
        tail = self.stderr.read().strip().splitlines()[-3:]
        raise RuntimeError(f"worker exited ({self.process.returncode}): {' | '.join(tail)}")

    def compile(self, index: int) -> dict:
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.stderr.close()


def worker_env(no_cache_dir: str | None = None) -> dict[str, str]:
    """The parent's environment without TRITON_INTERPRET, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, minus its warning
    if no_cache_dir:
        env["TRITON_CACHE_DIR"] = no_cache_dir
    return env


def representative(listing: Sequence[dict]) -> list[int]:
    """One config per (op, pass, arch, dtype width): the one with the largest tiles.

    fp16 and bf16 compile to the same code shape, so they share a group; fp32
    (tf32 dots, other tiles) is its own.

    "Largest" is the sum of integer constexprs (block sizes and head dim
    dominate it), the config most at risk of spilling or overflowing shared
    memory. A cheap subset for tests; the CLI checks every config by default.
    """
    chosen: dict[tuple, int] = {}
    for index, desc in enumerate(listing):
        width = re.search(r"\d+$", desc["dtype"])
        key = (desc["op"], desc["pass_name"], desc["arch"], width.group(0) if width else "")
        if key not in chosen or desc["tile_size"] > listing[chosen[key]]["tile_size"]:
            chosen[key] = index
    return sorted(chosen.values())


def _select(listing, archs, name_filter, subset) -> list[int]:
    indices = representative(listing) if subset else range(len(listing))
    selected = []
    for index in indices:
        desc = listing[index]
        text = " ".join(str(desc[key]) for key in ("op", "pass_name", "kernel", "label"))
        text += f" sm_{desc['arch']}"
        if desc["arch"] in archs and (not name_filter or name_filter in text):
            selected.append(index)
    return selected


def _drive(worker_slot: list, providers, env, work: queue.Queue, out: dict, log) -> None:
    """Feed configs to one worker until the queue is empty; replace it if it dies."""
    while True:
        try:
            index, desc = work.get_nowait()
        except queue.Empty:
            return
        try:
            message = worker_slot[0].compile(index)
            result = Result(**message["result"])
        except (RuntimeError, OSError) as error:  # died mid-config, or its pipe broke
            result = Result(
                op=desc["op"],
                pass_name=desc["pass_name"],
                kernel=desc["kernel"],
                label=desc["label"],
                arch=desc["arch"],
                error=f"crashed: {error}",
            )
            worker_slot[0].close()
            worker_slot[0] = _Worker(providers, env)
            worker_slot[0].read()  # its listing
        result.failures = check(result)
        out[index] = result
        log(
            f"  [{len(out)}/{work.maxsize}] {result.kernel} {result.label} sm_{result.arch}: "
            f"{result.status} ({result.compile_seconds:.1f} s)"
        )


def collect_triton(
    providers,
    archs=(80, 90),
    jobs=2,
    name_filter=None,
    subset=False,
    no_cache=False,
    log: Callable[[str], None] = print,
):
    """Compile the selected Triton configs in ``jobs`` workers: (results, listing message)."""
    with tempfile.TemporaryDirectory(prefix="gpu_readiness_cache_") as cache_dir:
        env = worker_env(cache_dir if no_cache else None)
        # One slot per worker: a thread swaps in a fresh worker when its own dies.
        slots = [[_Worker(providers, env)] for _ in range(max(1, jobs))]
        try:
            listings = [slot[0].read() for slot in slots]
            listing = listings[0]["listing"]
            selected = _select(listing, set(archs), name_filter, subset)
            work: queue.Queue = queue.Queue(maxsize=len(selected))
            for index in selected:
                work.put((index, listing[index]))
            out: dict[int, Result] = {}
            threads = [
                threading.Thread(target=_drive, args=(slot, providers, env, work, out, log))
                for slot in slots
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for slot in slots:
                slot[0].close()
    return [out[i] for i in selected], listings[0]


def compile_cuda_source(source: Path, arch: int, nvcc: str) -> list[Result]:
    """nvcc one .cu file for one arch; one Result per __global__ kernel in it."""
    with tempfile.TemporaryDirectory(prefix="gpu_readiness_nvcc_") as tmp:
        cubin = Path(tmp) / "out.cubin"
        command = [
            nvcc,
            "-cubin",
            "-O3",
            "--use_fast_math",
            "-std=c++17",
            "-gencode",
            NVCC_GENCODE[arch],
            "-Xptxas",
            "-v",
            "-I",
            str(source.parent),
            str(source),
            "-o",
            str(cubin),
        ]
        start = time.perf_counter()
        built = _run(command)
        seconds = time.perf_counter() - start
        if built.returncode != 0:
            error = (built.stderr.strip().splitlines() or ["?"])[-1]
            return [
                Result(
                    op=source.stem,
                    pass_name="cuda",
                    kernel="-",
                    label=source.name,
                    arch=arch,
                    source="cuda",
                    error=f"nvcc: {error}",
                    compile_seconds=seconds,
                    failures=[f"nvcc: {error}"],
                )
            ]
        usage = parse_ptxas_verbose(built.stderr + built.stdout)
        sass = _sass_counts(str(cubin))
    names = _demangle(usage)
    results = []
    for mangled, entry in usage.items():
        kernel, template = _short_name(names[mangled])
        result = Result(
            op=source.stem,
            pass_name="cuda",
            kernel=kernel,
            label=f"{source.name} {template}".strip(),
            arch=arch,
            source="cuda",
            registers=entry.registers,
            spill_stores=entry.spill_stores,
            spill_loads=entry.spill_loads,
            static_smem=entry.static_smem,
            sass_tensor_core_count=sass.get(mangled),
            compile_seconds=seconds,
            ptx_tensor_core="mma" if sass.get(mangled) else "none",
        )
        result.failures = check(result)
        results.append(result)
    return results


def collect_cuda(
    sources: Sequence[Path], archs=(80, 90), name_filter=None, jobs: int = 2
) -> list[Result]:
    """nvcc every (source, arch) in ``jobs`` parallel compiler processes."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    builds = [(source, arch) for source in sources for arch in archs]
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        per_build = pool.map(lambda build: compile_cuda_source(*build, nvcc), builds)
        results = [result for built in per_build for result in built]
    return [r for r in results if not name_filter or name_filter in f"{r.label} {r.kernel}"]


def _source_serves(source: Path, op: str) -> bool:
    # csrc/cuda/<name>.cu belongs to the op it names or prefixes (kv_cache.cu: kv_cache_append).
    return op.startswith(source.stem) or source.stem.startswith(op)


def collect(
    ops: Sequence[str] | None = None,
    archs: Sequence[int] = (80, 90),
    jobs: int = 2,
    name_filter: str | None = None,
    subset: bool = False,
    cuda: bool = True,
    no_cache: bool = False,
    log: Callable[[str], None] = print,
) -> Report:
    """Compile and check every selected configuration; the Python entry point.

    Parameters
    ----------
    ops : op names (modules in kernels/) or ``module:function`` specs; default ``OPS``.
    archs : compute capabilities to compile for (80, 90).
    jobs : worker processes compiling in parallel.
    name_filter : keep configs whose "op pass kernel label sm_XX" contains this.
    subset : only :func:`representative` configs (one per op/pass/arch/dtype width).
    cuda : also nvcc csrc/cuda/*.cu.
    no_cache : compile into a fresh Triton cache (honest compile times).
    """
    start = time.perf_counter()
    results, listing = collect_triton(
        list(ops or OPS), archs, jobs, name_filter, subset, no_cache, log
    )
    notes, tools = listing["notes"], listing["tools"]
    if cuda:
        sources = [
            source
            for source in sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu"))
            if ops is None or any(_source_serves(source, op) for op in ops)
        ]
        nvcc = find_nvcc()
        if not sources:
            notes.append("no csrc/cuda/*.cu for these ops: no CUDA kernels to check")
        elif nvcc is None:
            notes.append("nvcc not found: CUDA sources not checked")
        else:
            version = re.search(r"release [\d.]+, V[\d.]+", _run([nvcc, "--version"]).stdout)
            tools["nvcc"] = f"{nvcc} {version.group(0) if version else '?'}"
            results += collect_cuda(sources, archs, name_filter, jobs)
            for source in sources:
                digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
                tools[f"source {source.relative_to(REPO_ROOT)}"] = digest
    return Report(results, notes, listing["errors"], tools, time.perf_counter() - start)


# ----------------------------------------------------------------------------- output
_COLUMNS = (
    "op",
    "pass",
    "kernel",
    "configuration",
    "arch",
    "regs",
    "spill st/ld B",
    "smem B (static+dyn)",
    "tensor cores",
    "compile s",
    "status",
)


def _row(result: Result) -> list[str]:
    if result.error:
        return [
            result.op,
            result.pass_name,
            result.kernel,
            result.label,
            f"sm_{result.arch}",
            "-",
            "-",
            "-",
            "-",
            f"{result.compile_seconds:.1f}",
            result.status,
        ]
    dynamic = "?" if result.dynamic_smem is None else str(result.dynamic_smem)
    sass_name = {"wgmma": "HGMMA", "mma": "HMMA"}.get(result.ptx_tensor_core, "MMA")
    tensor = result.ptx_tensor_core
    if result.sass_tensor_core_count:
        tensor += f" ({sass_name} x{result.sass_tensor_core_count})"
    return [
        result.op,
        result.pass_name,
        result.kernel,
        result.label,
        f"sm_{result.arch}",
        str(result.registers),
        f"{result.spill_stores}/{result.spill_loads}",
        f"{result.shared_bytes} ({result.static_smem}+{dynamic})",
        tensor,
        f"{result.compile_seconds:.1f}",
        result.status,
    ]


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width text table, one row per result."""
    rows = [list(_COLUMNS)] + [_row(result) for result in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _config_notes(results: Sequence[Result]) -> list[str]:
    """The configs' own remarks (extra["note"]), each once, with the kernels it covers."""
    covered: dict[str, dict[str, set]] = {}
    for result in results:
        if result.note:
            archs = covered.setdefault(result.note, {}).setdefault(result.kernel, set())
            archs.add(f"sm_{result.arch}")
    if not covered:
        return []
    lines = ["notes from shipped_configs():"]
    for note, kernels in covered.items():
        where = ", ".join(
            f"{kernel} ({'/'.join(sorted(archs))})" for kernel, archs in kernels.items()
        )
        lines.append(f"  {note}  [{where}]")
    return [*lines, ""]


def format_report(report: Report, command: str) -> str:
    failed = sum(not r.ok for r in report.results)
    header = [
        "# GPU readiness report (AOT compile, no GPU)",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"host: {platform.node()} ({os.cpu_count()} CPUs), python {platform.python_version()}",
        *(f"{name}: {version}" for name, version in report.tools.items()),
        f"command: {command}",
        f"limits: shared memory per block sm_80 {SMEM_LIMIT_BYTES[80]} B, "
        f"sm_90 {SMEM_LIMIT_BYTES[90]} B; zero spills; mma on sm_80, wgmma on sm_90 for matmuls",
        f"wall time: {report.seconds:.1f} s",
        "",
    ]
    footer = [
        "",
        *_config_notes(report.results),
        *(f"note: {note}" for note in report.notes),
        *(f"FAIL: {error}" for error in report.errors),
        f"{len(report.results)} configurations, {len(report.results) - failed} OK, {failed} FAIL",
    ]
    return "\n".join(header) + format_table(report.results) + "\n" + "\n".join(footer) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metalm_fast.tools.gpu_readiness", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        default=None,
        help=f"ops to check (default: {' '.join(OPS)}) or module:function specs",
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        type=int,
        default=[80, 90],
        choices=[80, 90],
        help="compute capabilities to compile for (default: 80 90)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="compile worker processes")
    parser.add_argument(
        "--filter",
        dest="name_filter",
        default=None,
        help="only configs whose 'op pass kernel label sm_XX' contains this",
    )
    parser.add_argument(
        "--representative",
        action="store_true",
        help="one config per op/pass/arch/dtype (the largest tiles)",
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip csrc/cuda/*.cu")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="compile into a fresh Triton cache (honest compile times)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the report here")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    report = collect(
        args.ops,
        args.arch,
        args.jobs,
        args.name_filter,
        args.representative,
        not args.no_cuda,
        args.no_cache,
    )
    command = "python -m metalm_fast.tools.gpu_readiness " + shlex.join(argv or sys.argv[1:])
    text = format_report(report, command.strip())
    print("\n" + text, end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"written to {args.output}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
