"""``metalm-fast demo``: the presets it offers, its closing summary."""

from pathlib import Path

import pytest

from metalm_fast.cli import main
from metalm_fast.commands.demo import _Stage, demo_presets, summary_table
from metalm_fast.evaluation.digits_vqa import TaskAccuracy
from metalm_fast.models.metalm import PRESETS
from metalm_fast.training.trainer import TrainResult


def test_only_presets_that_read_the_digits_are_offered():
    offered = demo_presets()
    assert offered == ["tiny"]
    for name in offered:
        assert PRESETS[name].vision_layers > 0
    with pytest.raises(SystemExit):  # argparse rejects a preset without a digit vision encoder
        main(["demo", "--preset", "small"])


def test_bad_counts_are_clear_errors(capsys):
    assert main(["demo", "--steps", "0", "--no-bench"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def _stage(first, last, steps, checkpoint):
    result = TrainResult([first] * steps, 0, 0.0, steps, None, Path(checkpoint))
    return _Stage(first, last, steps, 12.0, result)


def test_summary_puts_chance_beside_every_accuracy():
    before = [
        TaskAccuracy("digit", 0, False, 21, 200, 0.1),
        TaskAccuracy("even", 0, False, 101, 200, 0.5),
        TaskAccuracy("digit", 4, False, 23, 200, 0.1),
        TaskAccuracy("even", 4, False, 99, 200, 0.5),
        TaskAccuracy("digit", 4, True, 25, 200, 0.1),
        TaskAccuracy("even", 4, True, 97, 200, 0.5),
    ]
    after = [
        TaskAccuracy("digit", 0, False, 180, 200, 0.1),
        TaskAccuracy("even", 0, False, 190, 200, 0.5),
    ]
    text = summary_table(
        _stage(6.9, 3.1, 1500, "runs/demo/step-1500"),
        _stage(2.0, 0.4, 200, "runs/demo/finetuned/step-200"),
        before,
        after,
        "runs/demo",
    )
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("task"))
    assert header.split() == [
        "task",
        "candidates",
        "chance",
        "zero-shot",
        "4-shot,",
        "decoder",
        "4-shot,",
        "encoder",
        "finetuned",
    ]
    rows = lines[lines.index(header) + 2 :]  # after the header and its rule
    digit = next(line for line in rows if line.startswith("digit "))
    assert digit.split() == ["digit", "10", "10.0%", "10.5%", "11.5%", "12.5%", "90.0%"]
    even = next(line for line in rows if line.startswith("even "))
    assert even.split() == ["even", "2", "50.0%", "50.5%", "49.5%", "48.5%", "95.0%"]
    assert "loss 6.90 -> 3.10 nats/token" in text and "1500 steps" in text
    assert "runs/demo/finetuned/step-200  (--checkpoint runs/demo/finetuned)" in text
    assert "{" not in text  # no raw Python dicts
