"""``metalm-fast eval``: the finetuned checkpoint is saved where it says, bad flags are clear."""

import re

import pytest
import torch

from metalm_fast.cli import main
from metalm_fast.training.checkpoint import latest_checkpoint, load_model
from metalm_fast.training.metrics import read_metrics

FAST = ["--shots", "0", "--limit", "2", "--device", "cpu"]


def test_finetune_saves_in_the_default_place_and_says_where(tiny_checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--finetune-steps", "1", *FAST]) == 0
    out = capsys.readouterr().out
    finetuned = tiny_checkpoint / "finetuned"
    assert latest_checkpoint(finetuned) == finetuned / "step-1"
    assert f"finetuned checkpoint: {finetuned / 'step-1'}" in out
    assert "after 1 finetuning steps" in out
    assert [r["step"] for r in read_metrics(finetuned / "metrics.jsonl")] == [1]
    assert (finetuned / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved weights are the finetuned ones, not the pretrained ones
    pretrained, tuned = load_model(tiny_checkpoint), load_model(finetuned)
    assert not torch.equal(pretrained.lm_head.weight, tuned.lm_head.weight)


def test_finetune_saves_in_out(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "tuned"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tiny_checkpoint),
                "--finetune-steps",
                "1",
                "--out",
                str(target),
                *FAST,
            ]
        )
        == 0
    )
    assert (target / "latest").read_text().strip() == "step-1"
    assert str(target / "step-1") in capsys.readouterr().out


def test_eval_prints_accuracy_against_chance(tiny_checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), *FAST]) == 0
    out = capsys.readouterr().out
    assert re.search(r"digit\s+0\s+-\s+\d+\.\d%\s+10\.0%\s+2", out), out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "x"], "--out is where --finetune-steps saves"),
        (["--finetune-steps", "-1"], "--finetune-steps must be >= 0"),
        (["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_bad_flags_are_clear_errors(tiny_checkpoint, capsys, argv, message):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bf16_eval_runs_on_cpu(tiny_checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--dtype", "bf16", *FAST]) == 0
    assert "digit VQA" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_unavailable_device_names_the_flag(tiny_checkpoint, capsys, command):
    extra = ["--prompt", "hello"] if command == "generate" else []
    assert main([command, "--checkpoint", str(tiny_checkpoint), *extra, "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err
