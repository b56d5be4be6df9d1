"""The command line: `python -m metalm_fast info` and the gpu-readiness pass-through."""

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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo cut to a few steps: it trains, evaluates, finetunes, answers, and saves."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--steps", "4", "--finetune-steps", "2", "--micro-batch-tokens",
                     "512", "--limit", "3", "--shots", "1", "--no-bench", "--out", str(out)])
    return code, buffer.getvalue(), out


def test_demo_runs_every_stage_and_leaves_a_checkpoint(demo_run):
    code, text, out = demo_run
    assert code == 0
    for heading in ("semi-causal pretraining", "before finetuning", "after finetuning",
                    "questions about held-out digits"):
        assert heading in text
    # the 1-shot runs with the demonstrations read by the decoder and by the encoder
    assert re.search(r"\s1 decoder\s", text) and re.search(r"\s1 encoder\s", text)
    assert (out / "latest").exists()


def test_generate_and_eval_read_the_demo_checkpoint(demo_run, capsys):
    _, _, out = demo_run
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the for statement",
                 "--prompt", "<image> question: is it even? answer:", "--image", "digit:1",
                 "--max-new-tokens", "3", "--top-p", "0.9"]) == 0
    assert main(["eval", "--checkpoint", str(out), "--shots", "0", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "> the for statement" in text and "digit VQA" in text


def test_generate_rejects_a_marker_without_an_image(demo_run):
    _, _, out = demo_run
    with pytest.raises(ValueError, match="'<image>' markers"):
        main(["generate", "--checkpoint", str(out), "--prompt", "<image> what is it?"])


def test_generate_rejects_a_bad_image_spec(demo_run):
    _, _, out = demo_run
    with pytest.raises(ValueError, match="--image digit:x"):
        main(["generate", "--checkpoint", str(out), "--prompt", "<image> what?",
              "--image", "digit:x"])
