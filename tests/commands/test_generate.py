"""``metalm-fast generate``: devices, dtypes, errors through the command line."""

import pytest

from metalm_fast.cli import main
from metalm_fast.data.digits import load_digits


def test_greedy_generation_prints_each_prompt(tiny_checkpoint, capsys):
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tiny_checkpoint),
                "--prompt",
                "the for",
                "--prompt",
                "<image> question: is it even? answer:",
                "--image",
                "digit:3",
                "--max-new-tokens",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    label = int(load_digits("test").labels[3])
    assert "> the for\n" in out
    # a digit image's label is printed beside its prompt, so a reader can check the answer
    assert f"> <image> question: is it even? answer:   (image labelled {label})\n" in out


def test_bf16_generation_matches_the_prompt_count(tiny_checkpoint, capsys):
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tiny_checkpoint),
                "--prompt",
                "the for",
                "--max-new-tokens",
                "2",
                "--dtype",
                "bf16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("> the for") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "<image> what is it?"], "'<image>' markers"),
        (["--prompt", "<image> what?", "--image", "digit:x"], "--image digit:x"),
        (["--prompt", "<image> what?", "--image", "digit:99999"], "held-out digits are 0.."),
    ],
)
def test_bad_input_is_a_clear_error(tiny_checkpoint, capsys, argv, message):
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
