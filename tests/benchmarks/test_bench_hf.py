"""The transformers benchmark (benchmarks/bench_hf.py): its inputs say what transformers'
collators say, ``--quick`` runs end to end with every path on the same weights (losses
and greedy tokens agree), and its GPU suite dry-runs on CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import bench_hf  # noqa: E402

DOCUMENTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def test_packed_inputs_are_the_flattening_collators_layout():
    inputs = bench_hf.packed_inputs(DOCUMENTS, flash_kwargs=True)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert inputs["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 11, 12, 13]]
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["max_length_q"] == 4 and inputs["use_cache"] is False
    assert "cu_seq_lens_q" not in bench_hf.packed_inputs(DOCUMENTS)


def test_padded_inputs_mask_and_ignore_the_padding():
    inputs = bench_hf.padded_inputs(DOCUMENTS)
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert inputs["labels"][1].tolist() == [8, 9, -100, -100]
    ids, mask = bench_hf.left_padded(DOCUMENTS)
    assert ids[1].tolist() == [0, 0, 8, 9] and mask[1].tolist() == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def quick_report():
    """One ``--quick`` measurement (every config and path), shared by the tests below."""
    return bench_hf.run(bench_hf.QUICK, log=lambda line: None)


def test_quick_report_structure_and_identical_tokens(quick_report):
    settings = bench_hf.QUICK
    assert [(r.family, r.path) for r in quick_report.training] == [
        (family, path) for family in bench_hf.FAMILIES for path in bench_hf.TRAIN_PATHS
    ]
    assert all(r.tokens_per_s > 0 and r.peak_mib is not None for r in quick_report.training)
    # Same weights, same tokens: every path's first-step loss is native's.
    assert all(r.loss_relative_diff <= bench_hf.LOSS_TOLERANCE for r in quick_report.training)
    assert [(r.family, r.path) for r in quick_report.generation] == [
        (family, path) for family in bench_hf.FAMILIES for path in bench_hf.GEN_PATHS
    ]
    for row in quick_report.generation:
        assert row.generated == settings.prompts * settings.new_tokens
        assert row.matching == row.generated, (row.family, row.path, row.note)
    assert [panel.title for panel in bench_hf.chart(quick_report)] == [
        "training (fwd+bwd+AdamW)",
        "training peak memory",
        "generation (incl. prefill)",
    ]


def test_quick_main_prints_tables_and_judges_correctness_only(quick_report, monkeypatch, capsys):
    monkeypatch.setattr(bench_hf, "run", lambda settings: quick_report)  # measured once above
    status = bench_hf.main(["--quick", "--no-write"])
    out = capsys.readouterr().out
    assert status == 0  # --quick judges only correctness (losses, tokens), not speed
    for heading in ("### Training (fwd + bwd + AdamW)", "### Generation (greedy"):
        assert heading in out
    assert "transformers' fastest training path" in out
    for family in bench_hf.FAMILIES:
        for path in bench_hf.TRAIN_PATHS:
            assert f"| {family} | {path} |" in out
        assert f"PASS: {family}: training losses agree" in out
        for path in bench_hf.GEN_PATHS[1:]:
            assert f"PASS: {family}: greedy tokens identical, native vs {path}" in out
    assert "FAIL" not in out and "speed ratios informational" in out


def test_gpu_hf_suite_dry_runs_on_cpu():
    path = Path(bench_hf.__file__).parent / "gpu" / "hf_cases.py"
    spec = importlib.util.spec_from_file_location("hf_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_cases"] = module  # its dataclasses resolve their module through this
    spec.loader.exec_module(module)
    rows = module.run(None, device="cpu", log=lambda line: None)
    assert [(row.family, row.quantity) for row in rows] == [
        (family, quantity)
        for family in bench_hf.FAMILIES
        for quantity in (module.TRAINING, module.MEMORY, module.GENERATION)
    ]
    assert all(row.device == "cpu" for row in rows)
    generation = [row for row in rows if row.quantity == module.GENERATION]
    generated = bench_hf.QUICK.prompts * bench_hf.QUICK.new_tokens
    assert all(f"sdpa {generated}/{generated} tokens" in row.note for row in generation)
    assert "not GPU figures" in module.to_markdown(rows)
    assert [panel.title for panel in module.chart(rows)] == [
        f"hf: {module.TRAINING}",
        f"hf: {module.GENERATION}",
    ]
