"""CPU: fused_linear_cross_entropy against the eager LM head + loss and its torch.compile.

One LM-head loss, ``cross_entropy(hidden @ weight.T, labels)`` (mean over all
rows, fp32), forward + backward (``loss.backward()`` reaching ``hidden.grad``
and ``weight.grad``), three ways:

- ``fused``: ``metalm_fast.fused_linear_cross_entropy(..., backend="cpu")``,
  row chunks of 16 MiB of logits (at least 256 rows: 256 rows here, 31-62 MiB)
  whose forward makes the gradients;
- ``eager``: ``F.cross_entropy(F.linear(hidden, weight).float(), labels)``,
  the [T, V] logits, their log-softmax and their gradient in memory;
- ``compiled``: ``torch.compile`` (inductor, static shapes) of that eager
  function. Its warm-up is the first full-size call, which compiles; the
  compile time is that call less the path's median step, reported separately
  and never timed with the rest (a recompile in the timed rounds is an error);
  it is approximate (a difference of two timings, with the step's noise), and
  inductor's on-disk cache may already hold the graphs of an earlier run.
  Not compiled on a short input with the rows marked dynamic: inductor's CPU
  reductions then guard on the row count (T <= 4096) and recompile at T=8192.

Sizes: T=8192 rows, D=1024, V in {32000, 64000}: eager logits of
T x V x 4 bytes = 1.0 and 2.0 GiB. Random inputs: hidden ~ N(0, 1), weight ~
N(0, 1/D) (logits ~ N(0, 1)), labels uniform in [0, V).

Time: one warm-up step per path (on ``warm_tokens`` rows; ``compiled`` at full
size, see above), then ``repeats``
rounds, each one step per path, the order reversed every other round, so load
drifts on a shared machine hit every path alike; a path's time is its median
step. Peak memory: one full-size step in a fresh process per (V, path) (forked
from a multiprocessing fork server that has only imported the modules),
VmHWM from /proc/self/status reset after setup, as growth over that baseline:
the inputs (and, for ``compiled``, the compiled code) are the baseline.

Criteria, at each V: the fused peak memory growth at most 1/4 of eager's; the
fused time no worse than eager's: eager ms / fused ms >= 1 - TIME_MARGIN (5%,
the run-to-run noise allowed for, fixed before measuring; the per-round ratios
are printed beside it so the actual spread is visible); the three losses agree
(relative difference <= LOSS_TOLERANCE). Before measuring, MemAvailable
(/proc/meminfo) is checked against an estimate of eager's peak
(EAGER_LOGIT_COPIES x the logits); a size that does not fit is skipped and
says so, and its criteria read SKIP (not PASS).

Run time: the sizes fix the work, 6*T*D*V FLOPs per step (1.6 and 3.2 TFLOP),
so on one core at ~90 GFLOP/s one step of the three paths at both sizes takes
~3.5 minutes, once per timed round and once more for the peak-memory processes
(two at a time where memory allows), plus the compiled path's full-size warm-up
in both: ~11 minutes with the default 2 rounds on a 2-core machine, ~7 with
``--repeats 1`` (no alternation then).

Threads: every path runs with the same intra-op thread count, 1 by default
(``--threads 0``: torch's default): on a shared 2-core machine a second OpenMP
thread waits for a busy core at every parallel region (see bench_end_to_end.py).

Usage: python benchmarks/bench_fused_ce.py [--quick] [--no-write] [--out FILE.md]
(``--quick``: tiny sizes, speed and memory ratios informational; writes
benchmarks/results/cpu_fused_ce_<date>.md and its .png chart unless --no-write
or --quick; with --quick only to --out). Importable: ``run(settings) -> Report``,
``render(report, settings)``; benchmarks/gpu/fused_ce_cases.py reuses the pieces.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_end_to_end import _proc_status_kib, _release_and_reset_peak  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Panel,
    add_run_arguments,
    machine_lines,
    run_settings,
    write_result,
)
from metalm_fast import fused_linear_cross_entropy  # noqa: E402

PATHS = ("fused", "eager", "compiled")
#: The fused time may be this much slower than eager's and still pass: run-to-run noise
#: of a matmul-bound step on a shared machine, fixed before measuring.
TIME_MARGIN = 0.05
#: eager peak growth / fused peak growth must reach this.
MEMORY_FACTOR = 4.0
#: Relative loss difference allowed between paths (fp32, summation order only).
LOSS_TOLERANCE = 1e-5
#: Eager's peak in [T, V] fp32 tensors (logits, log-softmax, its gradient, grad_logits
#: overlap in backward: 3, with room), for the free-memory check.
EAGER_LOGIT_COPIES = 3.5
#: Memory left to the rest of the machine when deciding what fits.
RESERVE_MIB = 2048


@dataclass(frozen=True)
class Settings:
    tokens: int = 8192
    dim: int = 1024
    vocabs: tuple[int, ...] = (32000, 64000)
    repeats: int = 2  # timed rounds (one step per path each); see the docstring on run time
    warm_tokens: int = 256  # rows of the warm-up step of fused and eager
    threads: int = 1  # intra-op threads for every path; 0: torch's default
    memory_jobs: int = 2  # peak-memory processes at a time (fewer if memory is short)
    seed: int = 0


QUICK = Settings(tokens=512, dim=64, vocabs=(1000, 4000), repeats=2, warm_tokens=64)


@dataclass
class VocabResult:
    """Everything measured at one vocabulary size (``skipped``: why it was not)."""

    vocab: int
    ms: dict[str, float] = field(default_factory=dict)  # median fwd+bwd step per path
    round_ratios: list[float] = field(default_factory=list)  # eager / fused, per round
    peak_mib: dict[str, float] = field(default_factory=dict)  # growth over the baseline
    baseline_mib: float | None = None  # the fused child's RSS baseline (inputs)
    loss: dict[str, float] = field(default_factory=dict)
    compile_s: float | None = None
    skipped: str = ""


@dataclass
class Criterion:
    text: str
    value: float | None  # None: not measured (the size was skipped)
    target: float
    shown: str
    speed: bool = True  # a speed or memory ratio (informational under --quick)
    at_most: bool = False

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target

    def line(self) -> str:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{word}: {self.text}: {self.shown}"


@dataclass
class Report:
    results: list[VocabResult]
    criteria: list[Criterion]
    available_mib: float
    memory_jobs: int


# ----------------------------------------------------------------------------- the paths
def make_inputs(tokens: int, dim: int, vocab: int, device="cpu", dtype=torch.float32, seed=0):
    """hidden [T, D] and weight [V, D] (leaves with requires_grad), labels [T]; logits ~ N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * dim**-0.5
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    hidden, weight = (t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight))
    return hidden, weight, labels.to(device)


def eager_loss(hidden, weight, labels):
    """The LM head then the loss, as transformers and MetaLM(fused_loss=False) run it."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def loss_functions(fused_backend: str = "cpu") -> dict[str, Callable]:
    """path -> loss(hidden, weight, labels); ``compiled`` is a fresh torch.compile."""
    return {
        "fused": fused_loss(fused_backend),
        "eager": eager_loss,
        "compiled": torch.compile(eager_loss, dynamic=False),
    }


def fused_loss(backend: str = "cpu") -> Callable:
    """fused_linear_cross_entropy on ``backend``, as loss(hidden, weight, labels)."""
    return lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend=backend)


def warm_inputs(hidden, weight, labels, rows: int):
    """The first ``rows`` rows as fresh leaves (the weight shared): a cheap first call."""
    return hidden[:rows].detach().clone().requires_grad_(), weight, labels[:rows].clone()


def warm_up(path: str, fn: Callable, hidden, weight, labels, settings: Settings) -> float:
    """The path's first call: seconds. ``compiled`` at full size (it compiles for that
    shape), the others on ``warm_tokens`` rows."""
    if path != "compiled":
        hidden, weight, labels = warm_inputs(hidden, weight, labels, settings.warm_tokens)
    return step(fn, hidden, weight, labels)[0]


def step(fn: Callable, hidden, weight, labels) -> tuple[float, float]:
    """One forward + backward: (seconds, loss); the gradients are dropped first."""
    hidden.grad = weight.grad = None
    begin = time.perf_counter()
    loss = fn(hidden, weight, labels)
    loss.backward()
    seconds = time.perf_counter() - begin
    return seconds, float(loss.detach())


# ----------------------------------------------------------------------------- memory budget
def available_mib() -> float:
    """MemAvailable from /proc/meminfo (inf where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def logits_mib(settings: Settings, vocab: int) -> float:
    return settings.tokens * vocab * 4 / 2**20


def eager_estimate_mib(settings: Settings, vocab: int) -> float:
    """Eager's expected peak: its [T, V] tensors plus the inputs and their gradients."""
    inputs = 2 * (settings.tokens + vocab) * settings.dim * 4 / 2**20
    return EAGER_LOGIT_COPIES * logits_mib(settings, vocab) + inputs


def plan_memory(settings: Settings, available: float) -> tuple[dict[int, str], int]:
    """(vocab -> why it is skipped, for the sizes that do not fit; peak-memory jobs)."""
    skipped = {}
    for vocab in settings.vocabs:
        need = eager_estimate_mib(settings, vocab) + RESERVE_MIB
        if need > available:
            skipped[vocab] = (
                f"skipped: eager needs ~{need - RESERVE_MIB:,.0f} MiB (+{RESERVE_MIB} MiB "
                f"reserve), MemAvailable {available:,.0f} MiB"
            )
    kept = [v for v in settings.vocabs if v not in skipped]
    largest = max((eager_estimate_mib(settings, v) for v in kept), default=0.0)
    jobs = settings.memory_jobs
    while jobs > 1 and jobs * largest + RESERVE_MIB > available:
        jobs -= 1  # two eager processes at once would not fit: measure one at a time
    return skipped, max(jobs, 1)


# ----------------------------------------------------------------------------- timing
def measure_times(settings: Settings, vocab: int, result: VocabResult, log) -> None:
    """Alternating rounds at one vocabulary size: medians, per-round ratios, losses."""
    torch._dynamo.reset()  # each V compiles anew (static shapes)
    hidden, weight, labels = make_inputs(settings.tokens, settings.dim, vocab, seed=settings.seed)
    functions = loss_functions()
    first = {
        path: warm_up(path, fn, hidden, weight, labels, settings) for path, fn in functions.items()
    }
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for round_index in range(settings.repeats):
            order = PATHS if round_index % 2 == 0 else PATHS[::-1]
            for path in order:
                spent, loss = step(functions[path], hidden, weight, labels)
                seconds[path].append(spent)
                result.loss.setdefault(path, loss)
            result.round_ratios.append(seconds["eager"][-1] / seconds["fused"][-1])
            log(
                f"  V={vocab} round {round_index}: "
                + ", ".join(f"{path} {seconds[path][-1]:.2f} s" for path in PATHS)
            )
    result.ms = {path: 1e3 * statistics.median(values) for path, values in seconds.items()}
    result.compile_s = max(first["compiled"] - result.ms["compiled"] / 1e3, 0.0)


# ----------------------------------------------------------------------------- memory
def peak_memory_child(settings: Settings, vocab: int, path: str) -> dict:
    """In a fresh process: peak RSS growth (MiB) of one full-size step of ``path``."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch._inductor.config.compile_threads = 1  # no compile workers from a pool process
    warnings.simplefilter("ignore")
    hidden, weight, labels = make_inputs(settings.tokens, settings.dim, vocab, seed=settings.seed)
    fn = loss_functions()[path]
    # The warm-up (the compile, for ``compiled``) makes the one-off allocations first.
    warm_up(path, fn, hidden, weight, labels, settings)
    hidden.grad = weight.grad = None
    baseline = _release_and_reset_peak()
    step(fn, hidden, weight, labels)
    peak = (_proc_status_kib("VmHWM") - baseline) / 1024
    return {"peak_mib": peak, "baseline_mib": baseline / 1024}


#: What the fork server imports once, so that no measuring process pays for it.
PRELOAD = ["benchmarks.bench_fused_ce", "torch._inductor.compile_fx"]


def measure_peaks(settings: Settings, vocabs: list[int], jobs: int) -> dict[tuple[int, str], dict]:
    """(vocab, path) -> {"peak_mib", "baseline_mib"}, each from its own process."""
    from benchmarks import bench_fused_ce  # by module name, also when run as a script

    keys = [(vocab, path) for vocab in vocabs for path in PATHS]
    if not keys:
        return {}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    # maxtasksperchild=1: a new process for every measurement.
    with context.Pool(jobs, maxtasksperchild=1) as pool:
        peaks = pool.starmap(bench_fused_ce.peak_memory_child, [(settings, *k) for k in keys])
    return dict(zip(keys, peaks))


# ----------------------------------------------------------------------------- criteria
def vocab_criteria(result: VocabResult) -> list[Criterion]:
    """Memory, time and loss agreement at one vocabulary size (SKIP when skipped)."""
    case = f"V={result.vocab}"
    if result.skipped:
        texts = (f"fused peak memory growth <= 1/4 of eager's, {case}", f"fused time, {case}")
        return [Criterion(text, None, 0.0, result.skipped) for text in texts]
    memory = result.peak_mib["eager"] / max(result.peak_mib["fused"], 1e-9)
    speed = result.ms["eager"] / result.ms["fused"]
    eager_loss_value = result.loss["eager"]
    worst = max(abs(v - eager_loss_value) / abs(eager_loss_value) for v in result.loss.values())
    low, high = min(result.round_ratios), max(result.round_ratios)
    return [
        Criterion(
            f"fused peak memory growth <= 1/4 of eager's, {case}",
            memory,
            MEMORY_FACTOR,
            f"{memory:.1f}x less ({result.peak_mib['fused']:,.0f} vs "
            f"{result.peak_mib['eager']:,.0f} MiB; target >= {MEMORY_FACTOR:g}x)",
        ),
        Criterion(
            f"fused time no worse than eager (eager / fused >= {1 - TIME_MARGIN:.2f}: "
            f"{TIME_MARGIN:.0%} noise margin), {case}",
            speed,
            1.0 - TIME_MARGIN,
            f"{speed:.2f}x (per round {low:.2f}..{high:.2f})",
        ),
        Criterion(
            f"losses agree (max relative diff vs eager <= {LOSS_TOLERANCE:g}), {case}",
            worst,
            LOSS_TOLERANCE,
            f"{worst:.1e}",
            speed=False,
            at_most=True,
        ),
    ]


# ----------------------------------------------------------------------------- run
def run(settings: Settings | None = None, *, log=print) -> Report:
    """Measure every vocabulary size that fits in memory; results and criteria."""
    settings = settings or Settings()
    available = available_mib()
    skipped, jobs = plan_memory(settings, available)
    log(f"MemAvailable {available:,.0f} MiB; peak-memory processes at a time: {jobs}")
    results = [VocabResult(vocab, skipped=skipped.get(vocab, "")) for vocab in settings.vocabs]
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for result in results:
                if result.skipped:
                    log(f"  V={result.vocab}: {result.skipped}")
                    continue
                measure_times(settings, result.vocab, result, log)
        measured = [result.vocab for result in results if not result.skipped]
        peaks = measure_peaks(
            dataclasses.replace(settings, threads=torch.get_num_threads()), measured, jobs
        )
    finally:
        torch.set_num_threads(threads)
    for result in results:
        for path in PATHS if not result.skipped else ():
            result.peak_mib[path] = peaks[(result.vocab, path)]["peak_mib"]
        if not result.skipped:
            result.baseline_mib = peaks[(result.vocab, "fused")]["baseline_mib"]
            log(f"  V={result.vocab} peak MiB over baseline: {result.peak_mib}")
    criteria = [criterion for result in results for criterion in vocab_criteria(result)]
    return Report(results, criteria, available, jobs)


# ----------------------------------------------------------------------------- report
def _ratio(eager: float, value: float) -> str:
    return f"{eager / value:.2f}x" if value > 0 else "-"


def render(report: Report, settings: Settings) -> tuple[str, str]:
    """The markdown table and notes, and the PASS/FAIL lines."""
    lines = [
        "| V | path | fwd+bwd ms | speedup vs eager | peak MiB over baseline | "
        "memory vs eager (eager / path) | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in report.results:
        if result.skipped:
            lines.append(f"| {result.vocab} | all | {result.skipped} | | | | |")
            continue
        for path in PATHS:
            ms, peak = result.ms[path], result.peak_mib[path]
            lines.append(
                f"| {result.vocab} | {path} | {ms:,.1f} | {_ratio(result.ms['eager'], ms)} | "
                f"{peak:,.1f} | {_ratio(result.peak_mib['eager'], peak)} | "
                f"{result.loss[path]:.6f} |"
            )
    lines.append("")
    for result in report.results:
        if result.skipped:
            continue
        rounds = ", ".join(f"{ratio:.2f}x" for ratio in result.round_ratios)
        lines.append(
            f"- V={result.vocab}: eager logits {logits_mib(settings, result.vocab):,.0f} MiB; "
            f"torch.compile compile time (first call less the median step, not timed above) "
            f"{result.compile_s:.1f} s; "
            f"eager / fused per round: {rounds}; baseline RSS {result.baseline_mib:,.0f} MiB"
        )
    lines.append(
        f"- T={settings.tokens}, D={settings.dim}, fp32, mean over all rows; "
        f"{settings.repeats} alternating rounds after a warm-up step on "
        f"{settings.warm_tokens} rows; peak memory: a fresh process per path, "
        f"{report.memory_jobs} at a time (MemAvailable {report.available_mib:,.0f} MiB at "
        f"start); intra-op threads {settings.threads or torch.get_num_threads()}"
    )
    return "\n".join(lines), "\n".join(criterion.line() for criterion in report.criteria)


def chart(report: Report) -> list[Panel]:
    """Time and peak memory per vocabulary size, fused as ours (skipped sizes: n/a)."""
    cases = [f"V={result.vocab}" for result in report.results]

    def series(values: Callable[[VocabResult], dict]) -> dict[str, list]:
        return {path: [values(r).get(path) for r in report.results] for path in PATHS}

    return [
        Panel("forward + backward", "time (ms)", cases, series(lambda r: r.ms), ours="fused"),
        Panel(
            "peak memory growth",
            "MiB over baseline",
            cases,
            series(lambda r: r.peak_mib),
            ours="fused",
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(
        parser,
        stem="cpu_fused_ce",
        quick_help="tiny sizes, ratios informational",
        paths="every path",
    )
    args = parser.parse_args(argv)
    settings = run_settings(args, QUICK, Settings())
    today = datetime.date.today().isoformat()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    start = time.perf_counter()
    report = run(settings)
    table, checks = render(report, settings)
    title = f"CPU fused_linear_cross_entropy vs eager and torch.compile ({today})"
    judged = [c for c in report.criteria if not (args.quick and c.speed)]
    if args.quick:
        # The criteria are stated for the full sizes; at tiny sizes one chunk holds all the
        # logits and per-call overhead dominates: the run only shows the plumbing.
        checks = "\n".join(
            [c.line() for c in judged]
            + ["(--quick: tiny sizes, time and memory ratios informational)"]
        )
    elapsed = time.perf_counter() - start
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(title, table, checks, sep="\n\n")
    print(f"({elapsed:.0f} s; load average {load[0]:.1f} at start, {end_load:.1f} at the end)")
    if not args.no_write and (args.out or not args.quick):
        machine = (
            f"{machine_lines()}\n- load average {load[0]:.1f} at start (5 min: {load[1]:.1f}), "
            f"{end_load:.1f} at the end; the run took {elapsed:.0f} s\n"
            "- the machine is shared: compare ratios within this table only"
        )
        write_result(
            f"cpu_fused_ce_{today}",
            title,
            f"{machine}\n\n{table}\n\n## Acceptance criteria\n\n```\n{checks}\n```",
            "python benchmarks/bench_fused_ce.py",
            path=args.out,
            chart=chart(report),
        )
    return 0 if all(c.passed for c in judged) else 1


if __name__ == "__main__":
    sys.exit(main())
