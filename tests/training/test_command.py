"""``metalm-fast train``: flags, default data, 2-rank torchrun (gloo, CPU) == one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import metalm_fast
from metalm_fast.training.command import main
from tests.training.conftest import free_port

REPO_ROOT = Path(metalm_fast.__file__).resolve().parent.parent
# 3 steps of 4 micro-batches of 256 tokens: 2 ranks x grad_accum 2, or 1 process x grad_accum 4.
COMMON = [
    "--data",
    "synthetic",
    "--preset",
    "tiny",
    "--steps",
    "3",
    "--micro-batch-tokens",
    "256",
    "--device",
    "cpu",
    "--no-progress",
    "--warmup-steps",
    "1",
    "--lr",
    "3e-3",
]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    metrics = tmp_path_factory.mktemp("single") / "metrics.json"
    assert main([*COMMON, "--grad-accum", "4", "--metrics-json", str(metrics)]) == 0
    return json.loads(metrics.read_text())["losses"]


def _torchrun(parallel: str, tmp_path: Path) -> subprocess.CompletedProcess:
    metrics = tmp_path / "metrics.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "metalm_fast.training.command",
        *COMMON,
        "--grad-accum",
        "2",
        "--parallel",
        parallel,
        "--out",
        str(tmp_path / "run"),
        "--metrics-json",
        str(metrics),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(parallel, tmp_path, single_process_losses):
    """Same global batch (4 micro-batches a step) -> the same per-step losses; the
    checkpoint written by rank 0 holds the full (gathered) model."""
    done = _torchrun(parallel, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = json.loads((tmp_path / "metrics.json").read_text())["losses"]
    assert losses == pytest.approx(single_process_losses, rel=1e-5)
    from metalm_fast.training.checkpoint import load_model

    model = load_model(tmp_path / "run")
    assert model.lm_head.weight is model.embedding.weight


def test_parallel_outside_torchrun_is_a_clear_error(capsys):
    assert main(["--parallel", "ddp", "--data", "synthetic"]) == 2
    assert "needs torchrun" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--resume", "--out", str(tmp_path / "empty"), "--data", "synthetic"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["--resume", "--data", "synthetic"]) == 2
    assert "resume needs out_dir" in capsys.readouterr().err


def test_bad_numbers_are_clear_errors(capsys):
    assert main(["--grad-accum", "0", "--data", "synthetic"]) == 2
    assert "grad_accum must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects unknown choices itself
        main(["--parallel", "zero"])


def test_default_data_trains_and_saves(tmp_path, capsys):
    pytest.importorskip("metalm_fast.data.default_data")
    out = tmp_path / "run"
    argv = [
        "--data",
        "default",
        "--steps",
        "1",
        "--micro-batch-tokens",
        "512",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "final loss" in printed and str(out / "step-1") in printed
    assert (out / "latest").read_text().strip() == "step-1"


def test_variant_flag_trains_the_single_stack_model(tmp_path):
    from metalm_fast.training.checkpoint import load_model

    out = tmp_path / "single"
    assert main([*COMMON, "--steps", "1", "--variant", "single_stack", "--out", str(out)]) == 0
    model = load_model(out)
    assert model.config.variant == "single_stack" and not model.has_text_encoder


def test_out_holds_metrics_jsonl_and_a_loss_png(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COMMON, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"step", "loss", "lr", "tokens_per_second", "tokens"}
    assert records[-1]["tokens"] == 3 * 256 and records[0]["lr"] == pytest.approx(3e-3)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"metrics: {out / 'metrics.jsonl'}, {out / 'loss.png'}" in capsys.readouterr().out


def test_steps_0_and_a_resume_past_the_end_report_the_existing_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COMMON, "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*COMMON, "--steps", "2", "--out", str(out), "--resume"]) == 0
    assert f"checkpoint: {out / 'step-2'} (already there; no step ran)" in capsys.readouterr().out
    assert main([*COMMON, "--steps", "0", "--out", str(out), "--resume"]) == 0
    assert f"checkpoint: {out / 'step-2'} (already there" in capsys.readouterr().out
    assert main([*COMMON, "--steps", "0", "--out", str(tmp_path / "fresh")]) == 0
    assert "checkpoint: none in" in capsys.readouterr().out


def test_a_resumed_run_extends_the_metrics(tmp_path):
    out = tmp_path / "run"
    assert main([*COMMON, "--steps", "2", "--out", str(out)]) == 0
    assert main([*COMMON, "--steps", "3", "--out", str(out), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_bf16_on_cpu_trains_to_a_finite_loss(tmp_path):
    metrics = tmp_path / "metrics.json"
    assert main([*COMMON, "--dtype", "bf16", "--metrics-json", str(metrics)]) == 0
    losses = json.loads(metrics.read_text())["losses"]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)


def test_unavailable_device_names_the_flag(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main([*COMMON, "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset, data, message",
    [
        ("small", "vqa", "no vision encoder"),
        ("paper_vision_language", "synthetic", "no text encoder"),
    ],
)
def test_a_preset_that_cannot_read_the_data_is_a_clear_error(preset, data, message, capsys):
    assert main(["--preset", preset, "--data", data]) == 2
    err = capsys.readouterr().err
    assert f"--preset {preset} cannot train on --data {data}" in err and message in err


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(directory.rglob("*"))
    }


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COMMON, "--steps", "2", "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*COMMON, "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} already holds a run (latest, " in err
    assert "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before  # nothing written, latest still names step-2

    (out / "notes.txt").write_text("kept")  # --overwrite deletes only the run's own files
    assert main([*COMMON, "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "latest",
        "loss.png",
        "metrics.jsonl",
        "notes.txt",
        "step-1",
    ]
    assert main([*COMMON, "--resume", "--overwrite", "--out", str(out)]) == 2
    assert "overwrite cannot be combined with resume" in capsys.readouterr().err


def test_resume_into_another_presets_checkpoint_names_the_file_and_the_mismatch(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COMMON, "--steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    argv = [*COMMON, "--preset", "small", "--steps", "2", "--out", str(out), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{out / 'step-1' / 'config.json'}: written for another model: " in err
    assert "decoder_dim" in err and "in the file" in err


def test_periodic_saves_keep_the_newest_checkpoints(tmp_path):
    out = tmp_path / "run"
    argv = [*COMMON, "--steps", "5", "--save-every", "1", "--keep-checkpoints", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("step-*")) == ["step-4", "step-5"]
    assert (out / "latest").read_text().strip() == "step-5"
