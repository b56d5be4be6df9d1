"""Training never loses work: a SIGINT or SIGTERM mid-run leaves a checkpoint that resumes
to the losses of the uninterrupted run, in one process and across 2 gloo ranks.

Each run goes through the real command line (``python -m metalm_fast train``,
torchrun), signalled once metrics.jsonl shows a given step, with
``--save-every 0``: the checkpoint the resume starts from is the one the stop wrote.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import metalm_fast
from metalm_fast.training.command import main
from tests.training.conftest import free_port

REPO_ROOT = Path(metalm_fast.__file__).resolve().parent.parent
STEPS = 10  # the signal lands within a step of SIGNAL_AFTER_STEP: the run must stop early
SIGNAL_AFTER_STEP = 2
COMMON = [
    "--data",
    "synthetic",
    "--preset",
    "tiny",
    "--steps",
    str(STEPS),
    "--micro-batch-tokens",
    "128",
    "--device",
    "cpu",
    "--no-progress",
    "--warmup-steps",
    "1",
    "--lr",
    "3e-3",
    "--save-every",
    "0",
]


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory):
    """Accumulation 2 in one process: the global batch of 2 ranks x accumulation 1."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main([*COMMON, "--grad-accum", "2", "--out", str(run)]) == 0
    return _losses(run)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    complete = [line for line in lines if line.endswith("}")]
    return json.loads(complete[-1])["step"] if complete else 0


def _interrupt(command: list[str], run: Path, signum: int, target) -> subprocess.CompletedProcess:
    """Start ``command``; once ``run``'s metrics show SIGNAL_AFTER_STEP, signal the pid
    ``target(process)`` returns; wait for the exit."""
    process = subprocess.Popen(
        command,
        cwd=run.parent,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while _logged_step(run) < SIGNAL_AFTER_STEP:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never logged its first steps"
            time.sleep(0.05)
        os.kill(target(process), signum)
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _stopped_step(run: Path, done: subprocess.CompletedProcess) -> int:
    """The step the stop saved: latest names it, and metrics.jsonl ends there."""
    step = int((run / "latest").read_text().strip().removeprefix("step-"))
    assert SIGNAL_AFTER_STEP <= step < STEPS, (step, done.stderr[-2000:])
    assert _logged_step(run) == step
    return step


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_and_the_resume_matches_the_uninterrupted_run(
    signum, status, tmp_path, uninterrupted_losses, capsys
):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "metalm_fast", "train", *COMMON, "--grad-accum", "2"]
    done = _interrupt([*command, "--out", str(run)], run, signum, lambda process: process.pid)
    assert done.returncode == status, done.stderr[-3000:]
    step = _stopped_step(run, done)
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step {step}: checkpoint {run / f'step-{step}'}" in done.stderr

    assert main([*COMMON, "--grad-accum", "2", "--out", str(run), "--resume"]) == 0
    assert f"resuming from {run / f'step-{step}'} at step {step} of {STEPS}" in (
        capsys.readouterr().err
    )
    # CPU fp32 in one process is deterministic: the losses are bit-identical.
    assert _losses(run) == uninterrupted_losses


def _worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (read from /proc)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {launcher.pid}")


def _torchrun(run: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "metalm_fast.training.command",
        *COMMON, "--grad-accum", "1", "--parallel", "ddp", "--out", str(run), *extra,
    ]  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks in /proc")
def test_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path, uninterrupted_losses):
    """SIGINT to rank 1 alone: the ranks agree to stop (rank 0 would otherwise block in
    the next step's all-reduce), rank 0 saves, and the resumed 2-rank run reproduces the
    losses (to 1e-5: 2 ranks sum the same gradients in another order than 1 process)."""
    run = tmp_path / "run"
    done = _interrupt(
        _torchrun(run), run, signal.SIGINT, lambda launcher: _worker_of_rank(launcher, 1)
    )
    assert done.returncode != 0, done.stderr[-3000:]  # torchrun reports the failed ranks
    step = _stopped_step(run, done)
    assert f"stopped by SIGINT after step {step}" in done.stderr, done.stderr[-3000:]

    resumed = subprocess.run(
        _torchrun(run, "--resume"), cwd=tmp_path, env=_environment(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / f'step-{step}'} at step {step}" in resumed.stderr
    assert _losses(run) == pytest.approx(uninterrupted_losses, rel=1e-5)
