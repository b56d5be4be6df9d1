"""The command line: `python -m metalm_fast info` and the gpu-readiness pass-through."""

import argparse
import re

import pytest

from metalm_fast.cli import main


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for backend in ("triton", "cuda", "cpu", "reference"):
        assert backend in out


def test_gpu_readiness_options_reach_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu-readiness", "--help"])
    assert exit_info.value.code == 0
    assert "--ops" in capsys.readouterr().out


def test_every_command_has_help(capsys):
    for command in ("demo", "generate", "eval", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage" in capsys.readouterr().out


def _parsers():
    """Every parser of the command line: the top level, each command's, and train's own."""
    from metalm_fast.cli import COMMANDS, build_parser
    from metalm_fast.training.command import build_parser as build_train_parser

    pending = [build_parser(load=list(COMMANDS)), build_train_parser()]
    while pending:
        parser = pending.pop()
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += action.choices.values()


def test_every_option_of_every_command_has_help_text():
    missing = []
    seen = 0
    for parser in _parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 40  # every command's options were loaded
    assert not missing, f"options without help text: {missing}"


@pytest.mark.parametrize("command", ["train", "generate", "eval", "demo"])
def test_device_and_dtype_on_every_model_command(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--device {auto,cpu,cuda}" in text and "--dtype {auto,fp32,bf16}" in text


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo cut to a few steps: it trains, evaluates, finetunes, answers, and saves."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(
            [
                "demo",
                "--steps",
                "4",
                "--finetune-steps",
                "2",
                "--micro-batch-tokens",
                "512",
                "--limit",
                "3",
                "--shots",
                "1",
                "--no-bench",
                "--out",
                str(out),
            ]
        )
    return code, buffer.getvalue(), out


def test_demo_runs_every_stage_and_leaves_both_checkpoints(demo_run):
    code, text, out = demo_run
    assert code == 0
    for heading in (
        "semi-causal pretraining",
        "before finetuning",
        "after finetuning",
        "questions about held-out digits",
        "== summary ==",
    ):
        assert heading in text
    # the 1-shot runs with the demonstrations read by the decoder and by the encoder
    assert re.search(r"\s1 decoder\s", text) and re.search(r"\s1 encoder\s", text)
    assert (out / "latest").read_text().strip() == "step-4"
    assert (out / "finetuned" / "latest").read_text().strip() == "step-2"
    for run in (out, out / "finetuned"):
        assert (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()
    summary = text[text.index("== summary ==") :]
    assert f"{out / 'finetuned' / 'step-2'}  (--checkpoint {out / 'finetuned'})" in summary
    assert "chance = 1 / (number of candidate answers" in summary
    assert "{" not in summary  # no raw Python dicts


def test_generate_and_eval_read_the_demo_checkpoints(demo_run, capsys):
    _, _, out = demo_run
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out),
                "--prompt",
                "the for statement",
                "--prompt",
                "<image> question: is it even? answer:",
                "--image",
                "digit:1",
                "--max-new-tokens",
                "3",
                "--top-p",
                "0.9",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out / "finetuned"),
                "--prompt",
                "<image> question: what digit is this? answer:",
                "--image",
                "digit:0",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(["eval", "--checkpoint", str(out / "finetuned"), "--shots", "0", "--limit", "2"]) == 0
    )
    text = capsys.readouterr().out
    assert "> the for statement" in text and "digit VQA" in text


def test_a_command_error_is_one_line_naming_the_flag(demo_run, capsys):
    _, _, out = demo_run
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out),
                "--prompt",
                "<image> what?",
                "--image",
                "digit:x",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("metalm-fast generate: error: --image digit:x")


def test_demo_runs_again_into_the_same_out(demo_run, tmp_path):
    """README's command twice in a row: the second run replaces the first run's
    checkpoints and metrics in --out (and in <out>/finetuned) instead of being refused."""
    import contextlib
    import io
    import shutil

    from metalm_fast.training.metrics import read_metrics

    _, _, first = demo_run
    out = tmp_path / "demo"
    shutil.copytree(first, out)  # the first run, left for the other tests as it was
    argv = ["demo", "--steps", "1", "--finetune-steps", "1", "--micro-batch-tokens", "256"]
    argv += ["--limit", "1", "--shots", "1", "--no-bench", "--device", "cpu", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    assert (out / "latest").read_text().strip() == "step-1"
    assert not (out / "step-4").exists()  # the first run's checkpoint went
    assert (out / "finetuned" / "latest").read_text().strip() == "step-1"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert [r["step"] for r in read_metrics(out / "finetuned" / "metrics.jsonl")] == [1]
