"""GPU: fused_linear_cross_entropy against eager, torch.compile and Liger-Kernel.

The GPU counterpart of benchmarks/bench_fused_ce.py: one LM-head loss,
``cross_entropy(hidden @ weight.T, labels)`` (mean over all rows), four ways:

- ``fused``: ``metalm_fast.fused_linear_cross_entropy(..., backend="triton")``
  (its row kernel on fp32 logits from bf16 matmuls with fp32 output);
- ``eager``: ``F.cross_entropy(F.linear(hidden, weight).float(), labels)``, the
  bf16 logits upcast to fp32 as transformers' loss does;
- ``compiled``: ``torch.compile`` of that eager function (static shapes; the
  first call of each pass, the compile, is reported separately);
- ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss()(weight,
  hidden, labels)`` where ``liger_kernel`` imports (else a row saying why not).

Entry point for benchmarks/gpu/run_gpu_benchmarks.py (shares its deadline)::

    rows = fused_ce_cases.run(deadline, device="cuda", dtype=torch.bfloat16)
    text = fused_ce_cases.to_markdown(rows)

Case: T=16384 rows, D=2048, V=64000, bf16; random inputs with logits ~ N(0, 1).
Passes: ``fwd`` (under no_grad, inputs not requiring grad: the loss only) and
``fwd+bwd`` (``loss.backward()`` reaching hidden and weight). Per measurement:
the median of 20 calls after 5 warm-up calls (benchmarks/gpu/gpu_timing.py,
CUDA events); peak memory: ``torch.cuda.max_memory_allocated()`` over one call
minus ``memory_allocated()`` before it (the inputs; gradients dropped first).

Formulas (T rows, D width, V vocabulary, e bytes per input element):

- FLOPs: the three matmuls only, ``2*T*D*V`` forward (the logits) and
  ``4*T*D*V`` backward (grad_hidden and grad_weight), so fwd = 2*T*D*V and
  fwd+bwd = 6*T*D*V whichever pass computes them (the fused op and Liger make
  the gradients in their forward); the softmax's O(T*V) work is not counted.
- Bytes: what any implementation must move: read hidden (T*D*e), weight
  (V*D*e) and labels (8*T); fwd+bwd also writes grad_hidden (T*D*e) and
  grad_weight (V*D*e). The logits need never reach memory, so they are not
  counted: GB/s is this minimum over the time, and a path that writes [T, V]
  logits moves more than it is credited with.
- TFLOP/s = FLOPs / time / 1e12; GB/s = bytes / time / 1e9.

The dry run (device="cpu") uses tiny sizes in fp32, the ``cpu`` backend for
``fused`` (``triton`` under TRITON_INTERPRET=1) and records Liger as
unavailable; its rows are CPU dry-run figures, never GPU ones.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

# Sibling modules of benchmarks/gpu, however this file is started (script, module, by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import median_ms  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # benchmarks.* from the source tree, however this is loaded
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_fused_ce  # noqa: E402

IMPLEMENTATIONS = ("fused", "eager", "compiled", "liger")
PASSES = ("fwd", "fwd+bwd")
GPU_CASE = ("T16384_D2048_V64000", 16384, 2048, 64000)
DRY_RUN_CASE = ("dry_run", 256, 64, 1000)


@dataclasses.dataclass
class FusedCERow:
    device: str
    case: str
    impl: str
    pass_name: str
    ms: float | None = None  # None: not measured (see note)
    tflops: float | None = None
    gbps: float | None = None
    peak_mib: float | None = None  # over the inputs, one call
    speedup_vs_eager: float | None = None  # eager ms / this ms
    memory_vs_eager: float | None = None  # eager peak / this peak
    loss: float | None = None
    note: str = ""


# ----------------------------------------------------------------------------- formulas
def flops(tokens: int, dim: int, vocab: int, with_backward: bool) -> float:
    """Matmul FLOPs: 2*T*D*V forward, 4*T*D*V more with the backward."""
    return (6.0 if with_backward else 2.0) * tokens * dim * vocab


def min_bytes(tokens: int, dim: int, vocab: int, element: int, with_backward: bool) -> float:
    """Read hidden, weight and the int64 labels; with the backward, write both gradients."""
    read = (tokens + vocab) * dim * element + 8 * tokens
    return read + ((tokens + vocab) * dim * element if with_backward else 0)


# ----------------------------------------------------------------------------- paths
def _liger_loss() -> Callable:
    """Liger-Kernel's fused linear cross-entropy, as (hidden, weight, labels) -> loss."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()  # mean over rows, ignore_index -100
    return lambda hidden, weight, labels: module(weight, hidden, labels)


def implementations(device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    """(impl -> loss function, impl -> why it is unavailable)."""
    from metalm_fast.ops._backend import triton_interpreting, unavailable_reason

    backend = "triton" if device.type == "cuda" or triton_interpreting() else "cpu"
    functions, unavailable = {}, {}
    reason = unavailable_reason(backend, device)
    if reason is None:
        functions["fused"] = bench_fused_ce.fused_loss(backend)
    else:
        unavailable["fused"] = f"backend {backend}: {reason}"
    functions["eager"] = bench_fused_ce.eager_loss
    functions["compiled"] = torch.compile(bench_fused_ce.eager_loss)
    if device.type != "cuda":
        unavailable["liger"] = "Liger-Kernel needs a CUDA device (CPU dry run)"
    else:
        try:
            functions["liger"] = _liger_loss()
        except Exception as error:  # noqa: BLE001 -- any import failure is the reason shown
            unavailable["liger"] = f"liger_kernel does not import: {type(error).__name__}: {error}"
    return functions, unavailable


def _call(fn: Callable, hidden, weight, labels, with_backward: bool) -> torch.Tensor:
    if not with_backward:
        with torch.no_grad():
            return fn(hidden, weight, labels)
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(call: Callable, device: torch.device) -> float | None:
    """max_memory_allocated over one call, less what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


# ----------------------------------------------------------------------------- measuring
def _measure(impl, fn, inputs, with_backward, device, warmup, repeats) -> FusedCERow:
    """One implementation and pass: its first call (compiles), peak memory, median time."""
    hidden, weight, labels = inputs
    call = lambda: _call(fn, hidden, weight, labels, with_backward)  # noqa: E731
    _sync(device)
    begin = time.perf_counter()
    loss = float(call().detach())
    _sync(device)
    first_s = time.perf_counter() - begin
    peak = _peak_mib(call, device)
    ms = median_ms(call, device.type, warmup=warmup, repeats=repeats)
    note = f"first call (compile) {first_s:.1f} s" if impl == "compiled" else ""
    return FusedCERow(device.type, "", impl, "", ms, peak_mib=peak, loss=loss, note=note)


def _fill_rates(rows: list[FusedCERow], sizes, element: int, with_backward: bool) -> None:
    """TFLOP/s, GB/s and the ratios to eager, from the formulas of the module docstring."""
    _, tokens, dim, vocab = sizes
    eager = next((r for r in rows if r.impl == "eager" and r.ms is not None), None)
    for row in rows:
        if row.ms is None:
            continue
        seconds = row.ms / 1e3
        row.tflops = flops(tokens, dim, vocab, with_backward) / seconds / 1e12
        row.gbps = min_bytes(tokens, dim, vocab, element, with_backward) / seconds / 1e9
        if eager is not None:
            row.speedup_vs_eager = eager.ms / row.ms
            if eager.peak_mib and row.peak_mib:
                row.memory_vs_eager = eager.peak_mib / row.peak_mib


def _run_pass(sizes, pass_name, functions, unavailable, device, dtype, deadline, log):
    name, tokens, dim, vocab = sizes
    with_backward = pass_name == "fwd+bwd"
    hidden, weight, labels = bench_fused_ce.make_inputs(tokens, dim, vocab, device, dtype)
    if not with_backward:  # the loss only: nothing asks for a gradient
        hidden, weight = hidden.detach(), weight.detach()
    warmup, repeats = (5, 20) if device.type == "cuda" else (1, 2)
    rows = []
    for impl in IMPLEMENTATIONS:
        if impl in unavailable:
            rows.append(FusedCERow(device.type, name, impl, pass_name, note=unavailable[impl]))
            continue
        if deadline is not None and not deadline.has_room():
            rows.append(FusedCERow(device.type, name, impl, pass_name, note="skipped (deadline)"))
            continue
        try:
            row = _measure(
                impl, functions[impl], (hidden, weight, labels), with_backward, device, warmup,
                repeats,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 -- one failing peer must not end the run
            row = FusedCERow(device.type, name, impl, pass_name)
            row.note = f"error: {type(error).__name__}: {error}"[:300]
        row.case, row.pass_name = name, pass_name
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # each peak starts from the inputs alone
    _fill_rates(rows, sizes, hidden.element_size(), with_backward)
    for row in rows:
        shown = f"{row.ms:.3f} ms" if row.ms is not None else row.note
        log(f"  fused_ce {name} {pass_name:7s} {row.impl:8s} {shown}")
    return rows


def run(
    deadline=None, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, log=print
) -> list[FusedCERow]:
    """Every implementation and pass at the GPU size; a CPU device is the dry run."""
    device = torch.device(device)
    sizes = GPU_CASE if device.type == "cuda" else DRY_RUN_CASE
    if device.type != "cuda":
        dtype = torch.float32
    _, tokens, dim, vocab = sizes
    log(f"  fused_ce: T={tokens}, D={dim}, V={vocab}, {str(dtype).replace('torch.', '')}")
    rows: list[FusedCERow] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        functions, unavailable = implementations(device)
        for pass_name in PASSES:
            context = (functions, unavailable, device, dtype, deadline, log)
            rows += _run_pass(sizes, pass_name, *context)
    return rows


# ----------------------------------------------------------------------------- report
def _number(value: float | None, spec: str = ",.1f") -> str:
    return "" if value is None else format(value, spec)


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def to_markdown(rows: list[FusedCERow], title: str = "fused_linear_cross_entropy") -> str:
    lines = [f"## {title}", ""]
    if any(row.device != "cuda" for row in rows):
        lines += ["CPU dry run (tiny sizes, fp32): plumbing only; these are not GPU figures.", ""]
    lines += [
        "TFLOP/s: matmul FLOPs only (2*T*D*V forward, 4*T*D*V backward); GB/s: the minimum "
        "bytes (read hidden, weight, labels; fwd+bwd also write grad_hidden and grad_weight) "
        "over the time; peak: max_memory_allocated over one call above the inputs.",
        "",
        "| case | pass | impl | ms | TFLOP/s | GB/s | peak MiB | speedup vs eager | "
        "memory vs eager | loss | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.pass_name} | {r.impl} | {_number(r.ms, '.3f')} | "
            f"{_number(r.tflops)} | {_number(r.gbps, ',.0f')} | {_number(r.peak_mib, ',.0f')} | "
            f"{_times(r.speedup_vs_eager)} | {_times(r.memory_vs_eager)} | "
            f"{_number(r.loss, '.5f')} | {r.note} |"
        )
    return "\n".join(lines)


def chart(rows: list[FusedCERow]):
    """Time per pass and peak memory per pass, fused as ours (benchmarks/charts.py)."""
    from benchmarks.charts import Panel

    passes = [p for p in PASSES if any(r.pass_name == p and r.ms is not None for r in rows)]
    if not passes or not any(r.impl == "fused" and r.ms is not None for r in rows):
        return []

    def series(value: Callable[[FusedCERow], float | None]) -> dict[str, list]:
        table = {(r.impl, r.pass_name): value(r) for r in rows}
        return {impl: [table.get((impl, p)) for p in passes] for impl in IMPLEMENTATIONS}

    panels = [Panel("fused_ce: time", "time (ms)", passes, series(lambda r: r.ms), ours="fused")]
    if any(r.peak_mib is not None for r in rows):
        panels.append(
            Panel(
                "fused_ce: peak memory",
                "MiB over the inputs",
                passes,
                series(lambda r: r.peak_mib),
                ours="fused",
            )
        )
    return panels
