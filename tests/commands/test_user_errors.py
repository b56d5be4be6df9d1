"""Every ordinary mistake is one line naming the argument and exit status 2, never a
traceback; a genuine bug still shows its traceback."""

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from metalm_fast.cli import main
from metalm_fast.training.checkpoint import latest_checkpoint

CPU = ["--device", "cpu"]


def one_line_error(capsys, argv) -> str:
    """The command's stderr, checked to be one ``metalm-fast <command>: error:`` line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"metalm-fast {argv[0]}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def damaged(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint with ``name`` (a file of its step) overwritten."""

    def damage(name: str, data: bytes):
        copy = tmp_path / "damaged"
        shutil.copytree(tiny_checkpoint, copy)
        (latest_checkpoint(copy) / name).write_bytes(data)
        return copy

    return damage


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_missing_checkpoint(command, tmp_path, capsys):
    extra = ["--prompt", "x"] if command == "generate" else []
    err = one_line_error(capsys, [command, "--checkpoint", str(tmp_path / "none"), *extra])
    assert f"--checkpoint {tmp_path / 'none'}: no checkpoint at" in err


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_corrupted_checkpoint_names_the_flag_and_the_file(command, name, damaged, capsys):
    copy = damaged(name, b"{not what was saved")
    extra = ["--prompt", "x"] if command == "generate" else []
    err = one_line_error(capsys, [command, "--checkpoint", str(copy), *extra, *CPU])
    assert f"--checkpoint {copy}: " in err and name in err


@pytest.mark.parametrize(
    "spec, make, message",
    [
        ("missing.npy", None, "No such file"),
        ("pickled.npy", lambda p: np.save(p, np.array([{}]), allow_pickle=True), "pickled"),
        ("garbage.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "expected digit:N or"),
        ("strings.npy", lambda p: np.save(p, np.array(["a", "b"])), "numeric .npy array"),
    ],
)
def test_bad_image_file_names_the_flag(tiny_checkpoint, tmp_path, capsys, spec, make, message):
    path = tmp_path / spec
    if make is not None:
        make(path)
    argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "<image> what?"]
    err = one_line_error(capsys, [*argv, "--image", str(path), *CPU])
    assert f"--image {path}: " in err and message in err


@pytest.mark.parametrize("spec", ["digit:abc", "digit:-1", "digit:"])
def test_bad_digit_names_the_flag(tiny_checkpoint, capsys, spec):
    argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "<image> what?"]
    assert f"--image {spec}: expected digit:N" in one_line_error(capsys, [*argv, "--image", spec])


#: stands for ``--checkpoint <the tiny checkpoint>`` in an argv below
CHECKPOINT = "CHECKPOINT"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["demo", "--steps", "-1", "--no-bench"], "--steps"),
        (["demo", "--finetune-steps", "-1", "--no-bench"], "--finetune-steps"),
        (["eval", CHECKPOINT, "--finetune-steps", "-1"], "--finetune-steps"),
        (["eval", CHECKPOINT, "--shots", "0", "-2"], "--shots"),
        (["eval", CHECKPOINT, "--shots", "100000"], "--shots"),
        (["eval", CHECKPOINT, "--seed", str(2**64)], "--seed"),
        (["demo", "--shots", "100000", "--no-bench"], "--shots"),
        (["generate", CHECKPOINT, "--prompt", "x", "--seed", str(2**70)], "--seed"),
        (["generate", CHECKPOINT, "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", CHECKPOINT, "--prompt", "x", "--top-p", "1.5"], "--top-p"),
        (
            ["generate", CHECKPOINT, "--prompt", "x", "--top-p", ".9", "--temperature", "0"],
            "--temperature",
        ),
    ],
)
def test_bad_counts_name_the_flag(tiny_checkpoint, capsys, argv, flag):
    checkpoint = ["--checkpoint", str(tiny_checkpoint)]
    argv = [word for arg in argv for word in (checkpoint if arg == CHECKPOINT else [arg])]
    assert f"error: {flag} must" in one_line_error(capsys, argv)


def test_eval_limit_zero_is_refused_not_zero_percent(tiny_checkpoint, capsys):
    err = one_line_error(capsys, ["eval", "--checkpoint", str(tiny_checkpoint), "--limit", "0"])
    assert "--limit must be >= 1, got 0" in err


def test_an_image_for_a_model_without_vision_encoder(text_only_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(text_only_checkpoint), "--prompt", "<image> what?"]
    err = one_line_error(capsys, [*argv, "--image", "digit:0", *CPU])
    assert "--image digit:0: " in err and "no vision encoder" in err


def test_eval_of_a_model_without_vision_encoder(text_only_checkpoint, capsys):
    err = one_line_error(capsys, ["eval", "--checkpoint", str(text_only_checkpoint), *CPU])
    assert f"--checkpoint {text_only_checkpoint} cannot answer digit questions" in err


def test_encoder_demos_for_a_model_without_text_encoder(no_text_encoder_checkpoint, capsys):
    argv = ["eval", "--checkpoint", str(no_text_encoder_checkpoint), "--encoder-demos", *CPU]
    assert "--encoder-demos needs a text encoder" in one_line_error(capsys, argv)


def test_resume_with_another_presets_shapes(tiny_checkpoint, tmp_path, capsys):
    """train --resume of a tiny run as the small preset: refused before any step, the
    run left as it was."""
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    before = sorted(p.name for p in run.iterdir())
    argv = ["train", "--preset", "small", "--data", "synthetic", "--resume", "--out", str(run)]
    err = one_line_error(capsys, [*argv, "--steps", "2", "--no-progress", *CPU])
    assert "config.json" in err and "written for another model" in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_max_new_tokens_past_memory_fails_fast(tiny_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", *CPU]
    start = time.perf_counter()
    err = one_line_error(capsys, [*argv, "--max-new-tokens", str(10**9)])
    assert time.perf_counter() - start < 5  # the checkpoint loads; the 1 TB pool is never tried
    assert "--max-new-tokens 1000000000: the KV pool" in err and " bytes" in err


def test_demo_micro_batch_too_small_is_refused_before_pretraining(capsys, tmp_path):
    argv = ["demo", "--micro-batch-tokens", "20", "--no-bench", "--out", str(tmp_path / "d")]
    assert "--micro-batch-tokens 20: " in one_line_error(capsys, argv)
    assert not (tmp_path / "d").exists()  # nothing trained, nothing written


def test_eval_out_may_not_erase_the_checkpoint_it_reads(tiny_checkpoint, capsys):
    run = str(tiny_checkpoint)
    argv = ["eval", "--checkpoint", f"{run}/step-1", "--finetune-steps", "1", "--out", run]
    assert f"--out {run} holds --checkpoint" in one_line_error(capsys, argv)


def test_the_process_exits_2_with_one_line(damaged):
    """The same through a real process: ``python -m metalm_fast``, not main()."""
    copy = damaged("model.safetensors", b"\0" * 16)
    argv = ["generate", "--checkpoint", str(copy), "--prompt", "x", *CPU]
    done = subprocess.run(
        [sys.executable, "-m", "metalm_fast", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "model.safetensors" in done.stderr


def test_a_bug_keeps_its_traceback(tiny_checkpoint, monkeypatch):
    """Only the errors that mean "your input is wrong" become a line; a bug propagates."""
    import metalm_fast.commands.generate as generate_command

    def broken(*args, **kwargs):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(generate_command, "generate", broken)
    with pytest.raises(KeyError):
        main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", *CPU])
