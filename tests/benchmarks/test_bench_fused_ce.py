"""The fused cross-entropy benchmark (benchmarks/bench_fused_ce.py) at tiny sizes: every
path runs forward + backward on the same inputs with the same loss, peak memory comes
from fresh processes, the free-memory plan skips what does not fit, and the GPU suite
(benchmarks/gpu/fused_ce_cases.py) dry-runs on CPU through run_gpu_benchmarks.py.
No timing is asserted: the machine is shared."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_fused_ce
from metalm_fast.commands.bench import BENCHMARKS

ROOT = Path(bench_fused_ce.__file__).resolve().parents[1]
TINY = dataclasses.replace(bench_fused_ce.QUICK, vocabs=(1000,), repeats=1)


@pytest.fixture(scope="module")
def tiny_report():
    """One tiny measurement (every path, peak memory in child processes), shared below."""
    return bench_fused_ce.run(TINY, log=lambda line: None)


def test_tiny_run_structure_and_losses_agree(tiny_report):
    (result,) = tiny_report.results
    assert result.vocab == 1000 and not result.skipped
    for measured in (result.ms, result.peak_mib, result.loss):
        assert list(measured) == list(bench_fused_ce.PATHS)
    assert all(value > 0 for value in result.ms.values())
    assert result.baseline_mib > 0 and result.compile_s >= 0
    assert len(result.round_ratios) == TINY.repeats
    eager = result.loss["eager"]
    for path, loss in result.loss.items():
        assert abs(loss - eager) <= bench_fused_ce.LOSS_TOLERANCE * abs(eager), path
    texts = [criterion.text for criterion in tiny_report.criteria]
    assert [text.split(",")[0].split(" (")[0] for text in texts] == [
        "fused peak memory growth <= 1/4 of eager's",
        "fused time no worse than eager",
        "losses agree",
    ]
    assert tiny_report.criteria[-1].passed
    panels = bench_fused_ce.chart(tiny_report)
    assert [panel.title for panel in panels] == ["forward + backward", "peak memory growth"]
    assert all(panel.ours == "fused" and panel.cases == ["V=1000"] for panel in panels)


def test_the_paths_make_the_same_gradients():
    hidden, weight, labels = bench_fused_ce.make_inputs(48, 16, 300)
    grads = {}
    for path, fn in bench_fused_ce.loss_functions().items():
        bench_fused_ce.step(fn, hidden, weight, labels)
        grads[path] = (hidden.grad.clone(), weight.grad.clone())
    for path in ("fused", "compiled"):
        for got, expected in zip(grads[path], grads["eager"]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=path)


def test_quick_main_prints_the_table_and_judges_losses_only(tiny_report, monkeypatch, capsys):
    monkeypatch.setattr(bench_fused_ce, "run", lambda settings: tiny_report)  # measured above
    status = bench_fused_ce.main(["--quick", "--no-write"])
    out = capsys.readouterr().out
    assert status == 0  # --quick judges only the loss agreement
    for path in bench_fused_ce.PATHS:
        assert f"| 1000 | {path} |" in out
    assert "torch.compile compile time (first call less the median step" in out
    assert "PASS: losses agree" in out and "FAIL" not in out
    assert "ratios informational" in out and "load average" in out


def test_memory_plan_skips_sizes_that_do_not_fit():
    settings = bench_fused_ce.Settings()  # T=8192: eager logits of 1000 / 2000 MiB
    small, large = settings.vocabs
    need_large = bench_fused_ce.eager_estimate_mib(settings, large)
    assert need_large > bench_fused_ce.EAGER_LOGIT_COPIES * 2000
    roomy = 2 * need_large + bench_fused_ce.RESERVE_MIB
    assert bench_fused_ce.plan_memory(settings, roomy) == ({}, 2)
    skipped, jobs = bench_fused_ce.plan_memory(settings, need_large + bench_fused_ce.RESERVE_MIB)
    assert skipped == {} and jobs == 1  # both sizes fit, but not two processes at once
    skipped, jobs = bench_fused_ce.plan_memory(settings, need_large)
    assert list(skipped) == [large] and "MemAvailable" in skipped[large] and jobs >= 1
    result = bench_fused_ce.VocabResult(large, skipped=skipped[large])
    lines = [criterion.line() for criterion in bench_fused_ce.vocab_criteria(result)]
    assert len(lines) == 2 and all(line.startswith("SKIP: ") for line in lines)


def test_registered_in_metalm_fast_bench():
    assert BENCHMARKS["fused_ce"] == "benchmarks/bench_fused_ce.py"
    assert (ROOT / BENCHMARKS["fused_ce"]).is_file()


def test_gpu_suite_formulas():
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    try:
        import fused_ce_cases
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "gpu"))
    assert fused_ce_cases.flops(2, 3, 5, with_backward=False) == 2 * 2 * 3 * 5
    assert fused_ce_cases.flops(2, 3, 5, with_backward=True) == 6 * 2 * 3 * 5
    read = (2 + 5) * 3 * 2 + 8 * 2  # hidden + weight in bf16, int64 labels
    assert fused_ce_cases.min_bytes(2, 3, 5, 2, with_backward=False) == read
    assert fused_ce_cases.min_bytes(2, 3, 5, 2, with_backward=True) == read + (2 + 5) * 3 * 2


def test_gpu_suite_dry_runs_on_cpu(tmp_path):
    script = ROOT / "benchmarks" / "gpu" / "run_gpu_benchmarks.py"
    command = [sys.executable, str(script), "--dry-run", "--suites", "fused_ce"]
    done = subprocess.run(
        command + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (payload,) = [json.loads(path.read_text()) for path in tmp_path.glob("*_dry_run.json")]
    rows = payload["fused_ce"]
    assert [(row["impl"], row["pass_name"]) for row in rows] == [
        (impl, pass_name)
        for pass_name in ("fwd", "fwd+bwd")
        for impl in ("fused", "eager", "compiled", "liger")
    ]
    measured = [row for row in rows if row["impl"] != "liger"]
    assert all(row["device"] == "cpu" and row["ms"] > 0 and row["tflops"] > 0 for row in measured)
    for pass_name in ("fwd", "fwd+bwd"):
        losses = [row["loss"] for row in measured if row["pass_name"] == pass_name]
        assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert all("needs a CUDA device" in row["note"] for row in rows if row["impl"] == "liger")
    (markdown,) = [path.read_text() for path in tmp_path.glob("*_dry_run.md")]
    assert "## fused_linear_cross_entropy" in markdown and "not GPU figures" in markdown
