"""``metalm-fast eval --task``: the language tasks against chance, finetuning, clear errors."""

import re

import pytest

from metalm_fast.cli import main
from metalm_fast.training.checkpoint import latest_checkpoint

FAST = ["--limit", "2", "--device", "cpu"]


def _row(out: str, task: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [task])


def test_one_task_zero_shot_against_chance(tiny_checkpoint, capsys):
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--task", "topic", "--shots", "0"]
    assert main([*argv, *FAST]) == 0
    out = capsys.readouterr().out
    assert "language tasks on held-out pydoc paragraphs" in out
    row = _row(out, "topic")
    assert row[:3] == ["topic", "4", "25.0%"] and re.fullmatch(r"\d+\.\d%", row[3]), out
    assert "digit" not in out


def test_every_task_k_shot_encoder_demos_and_multitask_finetuning(
    tiny_checkpoint, tmp_path, capsys
):
    out_dir = tmp_path / "tuned"
    argv = [
        "eval",
        "--checkpoint",
        str(tiny_checkpoint),
        "--task",
        "language",
        "--shots",
        "0",
        "1",
        "--encoder-demos",
        "--finetune-steps",
        "1",
        "--out",
        str(out_dir),
    ]
    assert main([*argv, *FAST]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("task"))
    assert header.split() == [
        "task",
        "candidates",
        "chance",
        "zero-shot",
        "1-shot,",
        "decoder",
        "1-shot,",
        "encoder",
        "finetuned",
    ]
    assert _row(out, "continuation")[:3] == ["continuation", "4", "25.0%"]
    assert _row(out, "cloze")[:3] == ["cloze", "4", "25.0%"]
    assert _row(out, "title")[:3] == ["title", "generated", "1.6%"]
    assert latest_checkpoint(out_dir) == out_dir / "step-1"
    assert "after 1 multitask steps" in out


def test_a_text_only_checkpoint_reads_the_language_tasks(text_only_checkpoint, capsys):
    argv = ["eval", "--checkpoint", str(text_only_checkpoint), "--task", "cloze", "--shots", "0"]
    assert main([*argv, *FAST]) == 0
    assert _row(capsys.readouterr().out, "cloze")[:3] == ["cloze", "4", "25.0%"]


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metalm-fast eval: error: "), err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "poetry"], "--task must be one of digits, topic, continuation, cloze"),
        (["--task", "topic", "--shots", "100000"], "--shots must all lie in [0, "),
        (["--task", "language", "--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_bad_language_flags_are_one_line_errors(tiny_checkpoint, capsys, extra, message):
    err = _one_line_error(capsys, ["eval", "--checkpoint", str(tiny_checkpoint), *FAST, *extra])
    assert message in err


def test_encoder_demos_need_the_text_encoder(no_text_encoder_checkpoint, capsys):
    argv = ["eval", "--checkpoint", str(no_text_encoder_checkpoint), "--task", "topic"]
    err = _one_line_error(capsys, [*argv, "--shots", "1", "--encoder-demos", *FAST])
    assert "--encoder-demos needs a text encoder" in err
