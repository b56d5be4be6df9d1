"""The design comparison (benchmarks/compare_language_designs.py) runs end to end on a
subset of designs, and its table rows are the designs asked for."""

from __future__ import annotations

import pytest

from benchmarks import compare_language_designs as compare


def test_one_design_runs_and_prints_only_its_rows(capsys):
    argv = "--designs two_stack --steps 2 --finetune-steps 1 --limit 2 --shots 1 --no-write"
    assert compare.main(argv.split()) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    designs = {
        line.split("|")[3].strip() for line in rows if line.split("|")[1].strip() in compare.TASKS
    }
    assert designs == {"two_stack"}
    # every task has its row: topic, continuation, cloze, title
    assert sum(line.split("|")[1].strip() in compare.TASKS for line in rows) == len(compare.TASKS)
    assert "| two_stack | 334,400 |" in table


def test_an_unknown_design_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--designs", "three_stack", "--no-write"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'three_stack'" in capsys.readouterr().err


def test_a_subset_run_writes_its_own_file_not_the_three_design_table():
    full, _ = compare.result_name(list(compare.DESIGNS), "2026-12-02")
    subset, title = compare.result_name(["two_stack", "decoder_only"], "2026-12-02")
    assert full == "cpu_language_designs_2026-12-02"
    assert subset == "cpu_language_designs_two_stack_decoder_only_2026-12-02"
    assert title.startswith("two_stack, decoder_only ")
