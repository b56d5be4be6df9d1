"""One bounded GPU benchmark run: span attention against its peers, written to files.

A machine with a CUDA GPU (an H200 is the target) runs it as is::

    python benchmarks/gpu/run_gpu_benchmarks.py --out DIR

It installs nothing, stops starting new measurements once its budget
(``--budget-s``, default 480 s = 8 minutes, including start-up) is nearly
spent and prints every measurement it skipped; a watchdog ends the process at
the budget, after writing what it has. Results are written after every case, as
``gpu_bench_<gpu>_<date>.md``, ``.json`` and a ``.png`` chart of the span
attention times in ``--out`` (default benchmarks/results/).

Cases (T=16384 packed tokens, H=16 heads, D in {64, 128}, bf16):

- ``encoder``: packed spans of random length 64..128, bidirectional in each span;
- ``decoder``: four documents of T/4 = 4096 tokens, causal;
- ``semi_causal``: four documents, causal plus bidirectional spans of 64..128
  tokens covering ~25% of each document.

Implementations: ours (``metalm_fast.span_attention(..., backend="triton")``),
FlexAttention (compiled; compile and create_block_mask times reported
separately), flash-attn varlen (for the masks it can express, when installed)
and SDPA on per-document batches. Forward and forward+backward; median ms,
TFLOP/s over allowed (query, key) pairs (docs/ARCHITECTURE.md, "Performance method"), the
speedup of ours over each peer, and the H200 roofline. Correctness is checked
once per case against FlexAttention (max abs diff).

Without a CUDA device it prints a message and exits 0. ``--dry-run`` builds the
cases at a tiny size on CPU and runs the CPU-capable parts (ours with the
``reference`` backend, FlexAttention eager, SDPA) to prove the plumbing.

Suites (``--suites``, in order): ``attention`` (above), ``decode`` (paged
decode attention and KV-cache append against their peers, in GB/s:
benchmarks/gpu/decode_cases.py), ``embed_scatter`` (GB/s against HBM and the
ratio to the eager paths: benchmarks/gpu/embed_scatter_cases.py) and ``e2e``
(MetaLM training and generation throughput, fast path vs an HF-style path:
benchmarks/gpu/e2e_cases.py) and ``hf`` (transformers with sdpa and metalm_span
against the same weights as a native MetaLM: benchmarks/gpu/hf_cases.py) and
``fused_ce`` (fused linear cross-entropy vs eager, torch.compile and Liger-Kernel:
benchmarks/gpu/fused_ce_cases.py), all under the same deadline and written into
the same files.

Extending: a case is a function in ``CASES`` (name -> builder of a Case); an
implementation is a function in ``IMPLEMENTATIONS`` (name -> runner factory).
Another op adds a suite as a module beside this script, named in ``EXTRA_SUITES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

_PROCESS_START = time.monotonic()  # the budget counts imports: torch alone takes seconds

import torch  # noqa: E402

# Sibling modules of benchmarks/gpu, however this file is started (script, module, by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_chart import write_chart_or_note  # noqa: E402
from gpu_timing import median_ms  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
try:
    import metalm_fast  # noqa: F401, E402 - installed (pip install -e .): its kernels resolve
except ImportError:  # a bare checkout: import the package from the tree
    sys.path.insert(0, str(REPO_ROOT))

# H200 SXM, NVIDIA datasheet: 989 TFLOP/s dense BF16/FP16 tensor core (1979 is with
# 2:4 sparsity), 4.8 TB/s HBM3e. Used for the roofline column only.
H200_PEAK_BF16_TFLOPS = 989.0
H200_HBM_TBPS = 4.8
#: Backward FLOPs relative to forward (docs/ARCHITECTURE.md: 2.5x).
BACKWARD_FLOP_RATIO = 2.5
#: Seconds kept free before the budget for writing files and a last measurement.
BUDGET_RESERVE_S = 30.0


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    num_tokens: int = 16384
    num_heads: int = 16
    head_dims: tuple[int, ...] = (64, 128)
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    span_range: tuple[int, int] = (64, 128)
    num_documents: int = 4
    span_fraction: float = 0.25
    compile_flex: bool = True
    warmup: int = 5
    repeats: int = 20
    seed: int = 0


def dry_run_settings() -> Settings:
    """Tiny CPU sizes: plumbing only, no meaningful numbers."""
    return Settings(
        num_tokens=512,
        num_heads=2,
        head_dims=(32,),
        dtype=torch.float32,
        device="cpu",
        span_range=(16, 32),
        compile_flex=False,
        warmup=1,
        repeats=2,
    )


class Deadline:
    """The global time budget; measurements start only while it has room left."""

    def __init__(self, budget_s: float, start: float = _PROCESS_START):
        self.start = start
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def has_room(self) -> bool:
        return self.elapsed() < self.budget_s - BUDGET_RESERVE_S


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One mask over packed tokens, with what the peers need to express it."""

    name: str
    description: str
    cu_seqlens: torch.Tensor  # int32 [docs + 1], the documents (or encoder spans)
    mask: object  # metalm_fast.SpanMask
    causal: bool | None  # flash-attn/SDPA expressibility: True causal, False full, None neither
    pairs: int = 0  # allowed (query, key) pairs

    def __post_init__(self):
        self.pairs = int((self.mask.kv_end.long() - self.mask.kv_start.long()).sum())


def _random_lengths(total: int, low: int, high: int, generator) -> list[int]:
    """Lengths in [low, high] summing to ``total``; the last one may be shorter."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    return [length for length in lengths if length > 0]


def _cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def _document_spans(doc_start: int, doc_len: int, settings: Settings, generator):
    """Non-overlapping spans of span_range tokens covering ~span_fraction of one document."""
    low, high = settings.span_range
    count = max(1, round(settings.span_fraction * doc_len / ((low + high) / 2)))
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    free = doc_len - sum(lengths)
    cuts = sorted(torch.randint(0, free + 1, (count,), generator=generator).tolist())
    starts, ends, offset, previous_cut = [], [], doc_start, 0
    for length, cut in zip(lengths, cuts, strict=True):
        offset += cut - previous_cut  # the gap before this span
        starts.append(offset)
        ends.append(offset + length)
        offset, previous_cut = offset + length, cut
    return starts, ends


def encoder_case(settings: Settings, generator) -> Case:
    from metalm_fast import SpanMask

    lengths = _random_lengths(settings.num_tokens, *settings.span_range, generator)
    cu = _cu_seqlens(lengths, settings.device)
    return Case(
        "encoder",
        f"{len(lengths)} packed spans of {settings.span_range[0]}.."
        f"{settings.span_range[1]} tokens, bidirectional",
        cu,
        SpanMask.bidirectional(cu),
        causal=False,
    )


def decoder_case(settings: Settings, generator) -> Case:
    from metalm_fast import SpanMask

    doc_len = settings.num_tokens // settings.num_documents
    cu = _cu_seqlens([doc_len] * settings.num_documents, settings.device)
    return Case(
        "decoder",
        f"{settings.num_documents} documents of {doc_len} tokens, causal",
        cu,
        SpanMask.causal(cu),
        causal=True,
    )


def semi_causal_case(settings: Settings, generator) -> Case:
    from metalm_fast import SpanMask

    doc_len = settings.num_tokens // settings.num_documents
    cu = _cu_seqlens([doc_len] * settings.num_documents, settings.device)
    starts, ends = [], []
    for doc in range(settings.num_documents):
        doc_starts, doc_ends = _document_spans(doc * doc_len, doc_len, settings, generator)
        starts += doc_starts
        ends += doc_ends
    covered = sum(e - s for s, e in zip(starts, ends, strict=True)) / settings.num_tokens
    return Case(
        "semi_causal",
        f"{settings.num_documents} documents of {doc_len} tokens, "
        f"{len(starts)} spans covering {covered:.0%}, semi-causal",
        cu,
        SpanMask.semi_causal(cu, starts, ends),
        causal=None,
    )


CASES: dict[str, Callable[[Settings, torch.Generator], Case]] = {
    "encoder": encoder_case,
    "decoder": decoder_case,
    "semi_causal": semi_causal_case,
}


# ----------------------------------------------------------------------------- implementations
# A factory takes (case, settings, timings) and returns fn(q, k, v) -> out [T, H, D], or
# raises Unavailable. ``timings`` receives one-off costs (compile, block mask) in ms.
class Unavailable(Exception):
    """This implementation cannot run this case here; the message says why."""


def ours_factory(case: Case, settings: Settings, timings: dict) -> Callable:
    import metalm_fast
    from metalm_fast.tools.gpu_readiness import import_kernel_module

    # From a source tree, metalm_fast.kernels (setup.py package_dir) needs registering.
    import_kernel_module("span_attention")

    # On CPU the triton kernels run only under the interpreter (slow, but it proves the wiring).
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    backend = "triton" if settings.device == "cuda" or interpreting else "reference"
    timings["backend"] = backend
    return lambda q, k, v: metalm_fast.span_attention(q, k, v, case.mask, backend=backend)


def flex_factory(case: Case, settings: Settings, timings: dict) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kv_start, kv_end = case.mask.kv_start, case.mask.kv_end

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx >= kv_start[q_idx]) & (kv_idx < kv_end[q_idx])

    start = time.perf_counter()
    block_mask = create_block_mask(
        mask_mod, None, None, settings.num_tokens, settings.num_tokens, device=settings.device
    )
    _sync(settings)
    timings["block_mask_ms"] = (time.perf_counter() - start) * 1e3
    attend = flex_attention
    if settings.compile_flex:  # eager flex materialises scores: only for the CPU dry run
        # Every case and head dim is a new graph; past dynamo's default cache size
        # (8) it would silently fall back to eager flex and time that instead.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        attend = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        # flex_attention takes [B, H, T, D]; ours are packed [T, H, D].
        out = attend(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), block_mask=block_mask)
        return out.squeeze(0).transpose(0, 1)

    return run


def flash_attn_factory(case: Case, settings: Settings, timings: dict) -> Callable:
    if case.causal is None:
        raise Unavailable("flash-attn cannot express a semi-causal mask")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise Unavailable(f"flash-attn not importable ({error})") from None
    cu = case.cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return lambda q, k, v: flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, causal=case.causal
    )


def sdpa_factory(case: Case, settings: Settings, timings: dict) -> Callable:
    """SDPA on per-document batches: documents of one length share a call.

    Causal and bidirectional documents use is_causal / no mask (the fused
    kernels); semi-causal documents need a dense boolean mask per document.
    """
    import torch.nn.functional as F

    bounds = case.cu_seqlens.tolist()
    groups: dict[int, list[int]] = {}
    for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if hi > lo:
            groups.setdefault(hi - lo, []).append(doc)
    masks = {}
    if case.causal is None:  # dense per-document masks from the intervals
        for length, docs in groups.items():
            local = torch.arange(length, device=settings.device)
            rows = [
                (case.mask.kv_start[bounds[d] : bounds[d] + length, None] - bounds[d] <= local)
                & (local < case.mask.kv_end[bounds[d] : bounds[d] + length, None] - bounds[d])
                for d in docs
            ]
            masks[length] = torch.stack(rows)[:, None]  # [B, 1, L, L]
    index = {
        length: torch.tensor([bounds[d] for d in docs], device=settings.device)[:, None]
        + torch.arange(length, device=settings.device)
        for length, docs in groups.items()
    }

    def run(q, k, v):
        out = torch.empty_like(q)
        for length, rows in index.items():
            batch = [x[rows].transpose(1, 2) for x in (q, k, v)]  # [B, H, L, D]
            result = F.scaled_dot_product_attention(
                *batch, attn_mask=masks.get(length), is_causal=bool(case.causal)
            )
            out[rows] = result.transpose(1, 2)
        return out

    return run


IMPLEMENTATIONS: dict[str, Callable[[Case, Settings, dict], Callable]] = {
    "ours": ours_factory,
    "flex": flex_factory,
    "flash_attn": flash_attn_factory,
    "sdpa": sdpa_factory,
}
REFERENCE_IMPLEMENTATION = "flex"


# ----------------------------------------------------------------------------- measuring
def _sync(settings: Settings) -> None:
    if settings.device == "cuda":
        torch.cuda.synchronize()


def attention_flops(case: Case, head_dim: int, num_heads: int, backward: bool) -> float:
    """4 * pairs * D * H forward; backward adds 2.5x that (docs/ARCHITECTURE.md)."""
    forward = 4.0 * case.pairs * head_dim * num_heads
    return forward * (1.0 + BACKWARD_FLOP_RATIO) if backward else forward


def roofline_ms(case: Case, settings: Settings, head_dim: int, backward: bool) -> float:
    """H200 lower bound: max(FLOPs / tensor peak, bytes / HBM bandwidth).

    Bytes: forward reads q, k, v and writes out (+ lse); backward also reads
    out, dout, lse and writes dq, dk, dv.
    """
    element = torch.tensor([], dtype=settings.dtype).element_size()
    tensor_bytes = settings.num_tokens * settings.num_heads * head_dim * element
    lse_bytes = settings.num_tokens * settings.num_heads * 4
    moved = 4 * tensor_bytes + lse_bytes
    if backward:
        moved += 5 * tensor_bytes + lse_bytes
    flops = attention_flops(case, head_dim, settings.num_heads, backward)
    return max(flops / (H200_PEAK_BF16_TFLOPS * 1e12), moved / (H200_HBM_TBPS * 1e12)) * 1e3


@dataclass
class Measurement:
    case: str
    head_dim: int
    implementation: str
    mode: str  # "fwd" or "fwd+bwd"
    ms: float | None = None
    tflops: float | None = None
    skipped: str | None = None
    one_off: dict = field(default_factory=dict)  # first-call ms, block-mask ms, backend


def _inputs(settings: Settings, head_dim: int, generator, requires_grad: bool):
    shape = (settings.num_tokens, settings.num_heads, head_dim)
    tensors = [
        torch.randn(shape, generator=generator).to(settings.device, settings.dtype)
        for _ in range(3)
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _forward_backward(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def _timed_first_call(call, settings: Settings) -> float:
    """ms of a first call: it includes compilation, JIT and autotuning, whoever does them."""
    start = time.perf_counter()
    call()
    _sync(settings)
    return (time.perf_counter() - start) * 1e3


def measure(name, fn, case, settings, head_dim, mode, generator, one_off) -> Measurement:
    """Time one implementation in one mode (median ms), after a timed first call."""
    backward = mode == "fwd+bwd"
    q, k, v = _inputs(settings, head_dim, generator, requires_grad=backward)
    grad_out = torch.randn_like(q) if backward else None
    call = (lambda: _forward_backward(fn, q, k, v, grad_out)) if backward else (lambda: fn(q, k, v))
    one_off[f"first_{mode}_call_ms"] = _timed_first_call(call, settings)
    ms = median_ms(call, settings.device, settings.warmup, settings.repeats)
    flops = attention_flops(case, head_dim, settings.num_heads, backward)
    return Measurement(case.name, head_dim, name, mode, ms, flops / (ms * 1e9), None, dict(one_off))


def check_against_reference(case, settings, head_dim, runners, generator) -> dict[str, float]:
    """Max |out - FlexAttention out| per implementation, forward, one draw of inputs."""
    if REFERENCE_IMPLEMENTATION not in runners:
        return {}
    q, k, v = _inputs(settings, head_dim, generator, requires_grad=False)
    with torch.no_grad():
        expected = runners[REFERENCE_IMPLEMENTATION](q, k, v).float()
        return {
            name: float((fn(q, k, v).float() - expected).abs().max())
            for name, fn in runners.items()
            if name != REFERENCE_IMPLEMENTATION
        }


# ----------------------------------------------------------------------------- running
@dataclass
class CaseReport:
    case: str
    description: str
    head_dim: int
    pairs: int
    roofline_ms: dict
    max_abs_diff_vs_flex: dict = field(default_factory=dict)
    unavailable: dict = field(default_factory=dict)
    measurements: list = field(default_factory=list)


def _build_runners(case, settings, timings_by_impl, report: CaseReport) -> dict[str, Callable]:
    runners = {}
    for name, factory in IMPLEMENTATIONS.items():
        timings = timings_by_impl.setdefault(name, {})
        try:
            runners[name] = factory(case, settings, timings)
        except Unavailable as reason:
            report.unavailable[name] = str(reason)
            print(f"    {name}: unavailable: {reason}")
    return runners


def new_case_report(case: Case, settings: Settings, head_dim: int) -> CaseReport:
    return CaseReport(
        case.name,
        case.description,
        head_dim,
        case.pairs,
        {
            mode: roofline_ms(case, settings, head_dim, mode == "fwd+bwd")
            for mode in ("fwd", "fwd+bwd")
        },
    )


def run_attention_case(
    case, settings, head_dim, deadline, generator, report: CaseReport
) -> CaseReport:
    """Fill ``report`` in place, so a watchdog flush mid-case still writes what is done."""
    timings_by_impl: dict[str, dict] = {}
    runners = _build_runners(case, settings, timings_by_impl, report)
    for mode in ("fwd", "fwd+bwd"):
        for name, fn in runners.items():
            if not deadline.has_room():
                report.measurements.append(
                    Measurement(case.name, head_dim, name, mode, skipped="deadline")
                )
                print(f"    {name} {mode}: skipped (deadline, {deadline.elapsed():.0f} s)")
                continue
            try:
                result = measure(
                    name, fn, case, settings, head_dim, mode, generator, timings_by_impl[name]
                )
            except NotImplementedError as error:  # e.g. flex backward on CPU: a known gap
                result = Measurement(
                    case.name, head_dim, name, mode, skipped=f"unsupported: {error}"[:200]
                )
            except Exception as error:  # noqa: BLE001 - one failing peer must not end the run
                result = Measurement(
                    case.name,
                    head_dim,
                    name,
                    mode,
                    skipped=f"error: {type(error).__name__}: {error}"[:300],
                )
                traceback.print_exc(limit=2)
            report.measurements.append(result)
            status = (
                f"{result.ms:.3f} ms, {result.tflops:.4g} TFLOP/s"
                if result.ms is not None
                else result.skipped
            )
            print(f"    {name} {mode}: {status}")
        if mode == "fwd" and deadline.has_room():  # after the first calls: compiles land there
            _check(report, case, settings, head_dim, runners, generator)
    return report


def _check(report, case, settings, head_dim, runners, generator) -> None:
    try:
        report.max_abs_diff_vs_flex = check_against_reference(
            case, settings, head_dim, runners, generator
        )
        print(f"    max |out - flex|: {report.max_abs_diff_vs_flex}")
    except Exception as error:  # noqa: BLE001 - a failed check is reported, the run goes on
        report.unavailable["correctness check"] = f"{type(error).__name__}: {error}"[:300]
        print(f"    correctness check failed: {error}")


def run_attention(
    settings: Settings,
    deadline: Deadline,
    on_case_done,
    case_names: list[str],
    reports: list[CaseReport],
) -> list[CaseReport]:
    """Run the cases in order, appending to ``reports`` (shared with the writers)."""
    for name in case_names:
        build = CASES[name]
        for head_dim in settings.head_dims:
            generator = torch.Generator().manual_seed(settings.seed)
            if not deadline.has_room():
                print(f"  {name} D={head_dim}: skipped (deadline)")
                reports.append(
                    CaseReport(
                        name, "skipped (deadline)", head_dim, 0, {}, unavailable={"all": "deadline"}
                    )
                )
                continue
            case = build(settings, generator)
            print(f"  {name} D={head_dim}: {case.description}, {case.pairs:,} allowed pairs")
            reports.append(new_case_report(case, settings, head_dim))
            run_attention_case(case, settings, head_dim, deadline, generator, reports[-1])
            on_case_done(reports)
    return reports


#: Suites beyond attention: name -> file beside this script. Each module has
#: run(deadline, device=, dtype=) -> rows (dataclasses) and to_markdown(rows).
EXTRA_SUITES = {
    "decode": "decode_cases.py",
    "embed_scatter": "embed_scatter_cases.py",
    "e2e": "e2e_cases.py",
    "hf": "hf_cases.py",
    "fused_ce": "fused_ce_cases.py",
}


def run_extra_suite(name: str, settings: Settings, deadline: Deadline, results: dict) -> None:
    """Run one EXTRA_SUITES suite under the shared deadline; results[name] = (module, rows)."""
    module = load_suite(EXTRA_SUITES[name])
    if module is None:
        print(f"{name} suite: benchmarks/gpu/{EXTRA_SUITES[name]} not found, skipped")
        return
    if not deadline.has_room():
        print(f"{name} suite: skipped (deadline)")
        return
    print(f"{name} suite (benchmarks/gpu/{EXTRA_SUITES[name]})")
    results[name] = (module, [])
    results[name] = (module, module.run(deadline, device=settings.device, dtype=settings.dtype))


#: Benchmark suites, run in the order given by --suites.
SUITES = ("attention", *EXTRA_SUITES)


# ----------------------------------------------------------------------------- output
def environment(settings: Settings) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": settings.device,
    }
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    for module in ("triton", "flash_attn"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "not installed"
    return info


def _format_one_off(one_off: dict) -> str:
    items = [f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in one_off.items()]
    return ", ".join(items) or "-"


def _ratio(ours: Measurement | None, peer: Measurement) -> str:
    if ours is None or ours.ms is None or peer.ms is None:
        return "-"
    return f"{peer.ms / ours.ms:.2f}x"


def to_markdown(env: dict, settings: Settings, reports: list[CaseReport]) -> str:
    lines = [
        "# GPU benchmark: span attention",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        f"- sizes: T={settings.num_tokens}, H={settings.num_heads}, "
        f"D={list(settings.head_dims)}, {str(settings.dtype).replace('torch.', '')}",
        f"- roofline: H200 {H200_PEAK_BF16_TFLOPS:.0f} TFLOP/s bf16 dense, "
        f"{H200_HBM_TBPS} TB/s HBM; FLOPs over allowed pairs, backward 2.5x forward",
        "- speedup = peer ms / ours ms (> 1: ours is faster)",
        "",
    ]
    for report in reports:
        lines += [f"## {report.case}, D={report.head_dim}", "", report.description, ""]
        if report.max_abs_diff_vs_flex:
            lines.append(f"max |out - flex|: {report.max_abs_diff_vs_flex}")
        lines += [f"unavailable: {name}: {why}" for name, why in report.unavailable.items()]
        lines += [
            "",
            "| impl | mode | ms | TFLOP/s | speedup of ours | % of roofline | one-off |",
            "|---|---|---|---|---|---|---|",
        ]
        ours = {m.mode: m for m in report.measurements if m.implementation == "ours"}
        for m in report.measurements:
            if m.ms is None:
                lines.append(f"| {m.implementation} | {m.mode} | {m.skipped} | | | | |")
                continue
            roof = report.roofline_ms.get(m.mode)
            lines.append(
                f"| {m.implementation} | {m.mode} | {m.ms:.3f} | {m.tflops:.4g} | "
                f"{_ratio(ours.get(m.mode), m) if m.implementation != 'ours' else '-'} | "
                f"{100 * roof / m.ms:.0f}% | "
                f"{_format_one_off(m.one_off)} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_results(
    out_dir: Path, env: dict, settings: Settings, reports, tag: str, extra=None
) -> list[Path]:
    """Write the .json and .md; ``extra`` maps suite name -> (module, its rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = env.get("gpu", "cpu-dry-run")
    slug = "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()
    stem = out_dir / f"gpu_bench_{slug}_{env['date'][:10]}{tag}"
    payload = {
        "environment": env,
        "settings": {**asdict(settings), "dtype": str(settings.dtype)},
        "cases": [asdict(report) for report in reports],
    }
    markdown = to_markdown(env, settings, reports)
    for name, (module, rows) in (extra or {}).items():
        if rows:
            payload[name] = [asdict(row) for row in rows]
            markdown += "\n" + module.to_markdown(rows) + "\n"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(payload, indent=2, default=str))
    paths[1].write_text(markdown)
    suites = [(module, rows) for module, rows in (extra or {}).values() if rows]
    chart = write_chart(stem.with_suffix(".png"), f"GPU benchmarks ({gpu})", reports, suites)
    return paths + ([chart] if chart else [])


def span_chart(reports: list[CaseReport]):
    """Forward and forward+backward ms per case and head dim, ours against each peer."""
    from benchmarks.charts import Panel

    panels = []
    for mode in ("fwd", "fwd+bwd"):
        cases = [f"{report.case} D={report.head_dim}" for report in reports]
        series: dict[str, list] = {}
        for index, report in enumerate(reports):
            for m in report.measurements:
                if m.mode == mode:
                    series.setdefault(m.implementation, [None] * len(reports))[index] = m.ms
        if "ours" in series:
            panels.append(
                Panel(
                    "forward" if mode == "fwd" else "forward + backward",
                    "time (ms)",
                    cases,
                    series,
                    ours="ours",
                )
            )
    return panels


def write_chart(path: Path, title: str, reports: list[CaseReport], suites=()) -> Path | None:
    """The PNG beside the .md: span attention, then the panels of each (module, rows)
    suite whose module has ``chart(rows)``; None, with a note, when there is nothing
    to draw or no matplotlib (gpu_chart.py)."""
    panels = span_chart(reports)
    for module, rows in suites:
        panels += module.chart(rows) if hasattr(module, "chart") else []
    return write_chart_or_note(path, title, panels)


def load_suite(filename: str):
    """A suite module beside this script, loaded by path; None if absent.

    By path, so it works however this script is started (as a file or a module).
    """
    path = Path(__file__).with_name(filename)
    if not path.exists():
        return None
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses resolve their module through this
    spec.loader.exec_module(module)
    return module


def _start_watchdog(budget_s: float, deadline: Deadline, flush: Callable[[], None]) -> None:
    """End the process at the budget even if one measurement hangs, after writing results."""

    def fire():
        print(f"watchdog: {budget_s:.0f} s budget spent; writing partial results and exiting")
        try:
            flush()
        finally:
            os._exit(0)

    timer = threading.Timer(max(budget_s - deadline.elapsed(), 0.0), fire)
    timer.daemon = True
    timer.start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results/; a temp dir for --dry-run)",
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time budget (s)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny CPU sizes, CPU-capable implementations: checks the plumbing",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="cases to run, in this order (default: all)",
    )
    parser.add_argument(
        "--head-dims",
        nargs="+",
        type=int,
        default=None,
        help="head dims (default 64 128; 32 for --dry-run)",
    )
    parser.add_argument(
        "--suites",
        nargs="+",
        choices=SUITES,
        default=list(SUITES),
        help="attention (span attention vs peers), decode (paged decode and "
        "KV append, decode_cases.py), embed_scatter (embed_scatter_cases.py),"
        " e2e (MetaLM fast path vs HF-style, e2e_cases.py), hf (transformers sdpa and "
        "metalm_span vs native MetaLM, hf_cases.py), fused_ce (fused linear cross-entropy "
        "vs eager, torch.compile, Liger, fused_ce_cases.py); run in this order",
    )
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (use --dry-run to check the plumbing)")
        return 0
    settings = dry_run_settings() if args.dry_run else Settings()
    if args.head_dims:
        settings = dataclasses.replace(settings, head_dims=tuple(args.head_dims))
    out_dir = args.out or (
        Path(tempfile.mkdtemp(prefix="gpu_bench_dry_"))
        if args.dry_run
        else REPO_ROOT / "benchmarks" / "results"
    )
    env = environment(settings)
    tag = "_dry_run" if args.dry_run else ""
    reports: list[CaseReport] = []
    extra: dict = {}  # suite name -> (module, rows), filled as each extra suite runs

    def flush():
        return write_results(out_dir, env, settings, reports, tag, dict(extra))

    def on_case_done(_reports):
        flush()

    _start_watchdog(args.budget_s, deadline, flush)
    print(f"GPU benchmarks on {env.get('gpu', 'CPU (dry run)')}, budget {args.budget_s:.0f} s")
    for suite in args.suites:
        if suite == "attention":
            run_attention(settings, deadline, on_case_done, args.cases, reports)
        else:
            run_extra_suite(suite, settings, deadline, extra)
        flush()
    paths = flush()
    print(f"done in {deadline.elapsed():.0f} s; wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
