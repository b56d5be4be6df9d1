"""The training loop: one process or torchrun (DDP / FSDP2), accumulation, checkpoints, resume.

Data contract
-------------
``micro_batches()`` returns the full deterministic stream of micro-batches, the
same on every rank. Global step ``s`` consumes the micro-batches with index in
``[p + s*W*A, p + (s+1)*W*A)`` (``W`` ranks, ``A = grad_accum``, ``p`` the
position a resumed run starts from); rank ``r`` takes those with index
``= r (mod W)``. A resumed run skips the consumed ones, so it sees exactly the
batches the uninterrupted run would have seen.

Loss normalisation
------------------
Every step divides by the *global* number of scored tokens ``n`` (summed over
the ``A`` micro-batches of every rank): each micro-batch backpropagates
``sum_loss * W / n`` (``W`` because DDP and FSDP2 average gradients over ranks),
so the gradient is that of the global mean loss whatever ``W`` and ``A`` are,
and a 2-rank run equals a 1-rank run with twice the accumulation. The reported
loss is the global mean: the all-reduced sum of the losses over ``n``.

Never losing work
-----------------
A checkpoint every ``save_every`` steps (the last ``keep_checkpoints`` kept)
bounds what a crash loses; SIGINT and SIGTERM stop the run after the current
step with a checkpoint at it (:mod:`metalm_fast.training.stopping`). An
``out_dir`` that already holds a run is refused unless the call resumes it or
asks to overwrite it: a fresh run would otherwise repoint ``latest`` away
from the old one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalm_fast.models.metalm import IGNORE_INDEX, MetaLM, MetaLMConfig
from metalm_fast.training.checkpoint import (
    LATEST_FILE,
    OPTIMIZER_FILE,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from metalm_fast.training.distributed import (
    DEVICES,
    PARALLEL_MODES,
    DistributedContext,
    all_reduce_max,
    all_reduce_sum,
    gradient_sync,
    init_distributed,
    shutdown,
    unwrap_model,
    wrap_model,
)
from metalm_fast.training.metrics import LOSS_PLOT_FILE, METRICS_FILE, MetricsLog, plot_loss_curve
from metalm_fast.training.runtime import DTYPES, autocast, move_batch
from metalm_fast.training.stopping import StopRequest, TrainingInterrupted

__all__ = [
    "ExistingRunError",
    "TrainConfig",
    "TrainResult",
    "accumulate_gradients",
    "claim_out_dir",
    "learning_rate",
    "rank_micro_batches",
    "TrainingInterrupted",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``grad_accum`` counts micro-batches per rank per step.

    The learning rate warms up linearly over ``warmup_steps`` to ``lr``, then
    follows a cosine down to ``lr * min_lr_ratio`` at ``steps``. ``out_dir=None``
    writes no checkpoint; otherwise one every ``save_every`` steps (0: only at
    the end), at the end, and at the step a SIGINT or SIGTERM stops; the
    newest ``keep_checkpoints`` are kept (0: all). ``resume`` continues from
    ``out_dir``'s latest; without it an ``out_dir`` holding a run is refused
    (:class:`ExistingRunError`) unless ``overwrite`` deletes that run's files.
    With ``out_dir``, rank 0 also writes the run's metrics.jsonl and loss.png
    there (:mod:`metalm_fast.training.metrics`). ``dtype`` is the forward's
    precision (:mod:`metalm_fast.training.runtime`: "bf16" autocast, also on the CPU).
    """

    steps: int = 200
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"
    parallel: str = "none"  # "none" | "ddp" | "fsdp"
    out_dir: str | None = None
    save_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = False
    # an out_dir that already holds a run is refused unless resume or overwrite:
    # overwrite clears its checkpoints and metrics first (demo/eval rerun into one)
    overwrite: bool = False
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        _check(self.steps >= 0, "steps", "must be >= 0", self.steps)
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1", self.grad_accum)
        _check(self.lr > 0, "lr", "must be > 0", self.lr)
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)", self.grad_clip)
        _check(self.device in DEVICES, "device", f"must be one of {DEVICES}", self.device)
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}", self.dtype)
        _check(
            self.parallel in PARALLEL_MODES,
            "parallel",
            f"must be one of {PARALLEL_MODES}",
            self.parallel,
        )
        _check(self.save_every >= 0, "save_every", "must be >= 0", self.save_every)
        _check(
            self.keep_checkpoints >= 0,
            "keep_checkpoints",
            "must be >= 0 (0 keeps every one)",
            self.keep_checkpoints,
        )
        _check(self.log_every >= 1, "log_every", "must be >= 1", self.log_every)
        _check(
            not self.resume or self.out_dir is not None,
            "resume",
            "needs out_dir (the directory to resume from)",
            self.resume,
        )
        _check(
            not (self.resume and self.overwrite),
            "overwrite",
            "cannot be combined with resume (overwrite starts over, resume continues)",
            self.overwrite,
        )


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


class ExistingRunError(ValueError):
    """``out_dir`` already holds a run, and the call neither resumes nor overwrites it."""

    def __init__(self, out_dir: Path, found: list[str]):
        self.out_dir = out_dir
        self.found = found
        super().__init__(
            f"{out_dir} already holds a run ({', '.join(found)}); continue it with --resume "
            f"(resume=True) or replace it with --overwrite (overwrite=True)"
        )


@dataclass
class TrainResult:
    """What a run did. ``losses`` are the global mean losses of the steps this call ran."""

    losses: list[float]
    tokens: int  # decoder tokens processed by all ranks in this call
    tokens_per_second: float
    step: int  # optimizer steps completed, counting those before a resume
    model: nn.Module  # unwrapped (under FSDP2: the sharded module, its group destroyed)
    # out_dir's latest checkpoint: this call's last save, else the one already there
    # (no step ran: --steps 0, or a resume past the end); None without one
    checkpoint: Path | None = None
    metrics: Path | None = None  # out_dir/metrics.jsonl (rank 0, with out_dir)
    loss_plot: Path | None = None  # out_dir/loss.png (rank 0, with out_dir and matplotlib)
    resumed_from: Path | None = None  # the checkpoint a resume started from


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: linear warmup, then cosine to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def rank_micro_batches(stream: Iterable, start: int, rank: int, world_size: int) -> Iterator:
    """This rank's share of ``stream`` from global micro-batch index ``start`` on."""
    return itertools.islice(stream, start + rank, None, world_size)


def scored_tokens(batches: Iterable) -> int:
    """Positions that carry loss, over ``batches``."""
    return sum(int((batch.labels != IGNORE_INDEX).sum()) for batch in batches)


def accumulate_gradients(
    model: nn.Module,
    batches: list,
    global_scored: int,
    *,
    gradient_scale: float = 1.0,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """Backpropagate ``sum_loss * gradient_scale / global_scored`` for each micro-batch.

    Cross-rank gradient sync is skipped on all but the last micro-batch.

    Parameters
    ----------
    model : plain, DDP or FSDP2 model; ``model(batch, reduction="sum")`` -> scalar.
    batches : this rank's micro-batches of the step.
    global_scored : scored positions over all ranks' micro-batches of the step (>= 1).
    gradient_scale : world size under DDP/FSDP2 (they average gradients over ranks).
    autocast : a context-manager factory around each forward (bf16 autocast on CUDA).

    Returns
    -------
    float32 scalar: the summed (not normalised) loss of ``batches``, detached.
    """
    total = torch.zeros((), dtype=torch.float32)
    for index, batch in enumerate(batches):
        with gradient_sync(model, enabled=index == len(batches) - 1):
            with autocast():
                loss_sum = model(batch, reduction="sum")
            (loss_sum * (gradient_scale / global_scored)).backward()
        total = total.to(loss_sum.device) + loss_sum.detach().float()
    return total


def _build_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    # Matrices decay; norms and biases do not (the usual AdamW recipe).
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused on CUDA; elsewhere torch's default (foreach where supported).
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused)


@dataclass
class _Run:
    """Everything the loop carries between steps."""

    context: DistributedContext
    model: nn.Module  # as driven (wrapped)
    optimizer: torch.optim.Optimizer
    stream: Iterator
    start_step: int
    data_position: int
    resumed_from: Path | None = None


def _prepare(
    model_config: MetaLMConfig,
    config: TrainConfig,
    micro_batches,
    model,
    context: DistributedContext,
) -> _Run:
    torch.manual_seed(config.seed)
    if model is None:
        model = MetaLM(model_config)
    elif getattr(model, "config", model_config) != model_config:
        raise ValueError("model.config differs from model_config")
    claim_out_dir(config, context.is_main)
    start_step, data_position, optimizer_state, directory = 0, 0, None, None
    if config.resume:
        directory = latest_checkpoint(config.out_dir)
        # Verified whole and checked against model_config before the model changes.
        model, optimizer_state, meta = load_checkpoint(directory, model)
        start_step, data_position = meta["step"], meta["data_position"]
        if context.is_main:
            print(
                f"resuming from {directory} at step {start_step} of {config.steps}",
                file=sys.stderr,
                flush=True,
            )
    wrapped = wrap_model(model.to(context.device), context)
    optimizer = _build_optimizer(wrapped, config, context.device)
    if optimizer_state is not None:
        load_optimizer_state(wrapped, optimizer, optimizer_state, source=directory / OPTIMIZER_FILE)
    stream = rank_micro_batches(micro_batches(), data_position, context.rank, context.world_size)
    return _Run(context, wrapped, optimizer, stream, start_step, data_position, directory)


def _previous_run(out_dir: Path) -> list[str]:
    """The names in ``out_dir`` that a training run writes (checkpoints, pointer, metrics)."""
    if not out_dir.is_dir():
        return []
    run_files = {LATEST_FILE, METRICS_FILE, LOSS_PLOT_FILE}
    return sorted(
        entry.name
        for entry in out_dir.iterdir()
        if entry.name in run_files
        or entry.name.startswith("step-")
        or (entry.name.startswith((".step-", f".{LATEST_FILE}")))
    )


def claim_out_dir(config: TrainConfig, is_main: bool) -> None:
    """Refuse an ``out_dir`` holding a run, unless resuming; ``overwrite`` deletes that run.

    Only the run's own files go: ``out_dir`` may hold other things (or be ``.``).
    """
    if config.out_dir is None or config.resume:
        return
    out_dir = Path(config.out_dir)
    found = _previous_run(out_dir)
    if not found:
        return
    if not config.overwrite:
        raise ExistingRunError(out_dir, found)
    if is_main:
        for name in found:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _next_batches(run: _Run, count: int, step: int) -> list:
    batches = list(itertools.islice(run.stream, count))
    if len(batches) < count:
        raise ValueError(
            f"micro_batches() ran out at step {step}: it must yield at least "
            f"steps * world_size * grad_accum micro-batches"
        )
    return [move_batch(batch, run.context.device) for batch in batches]


def _train_step(run: _Run, config: TrainConfig, step: int) -> tuple[float, int]:
    """One optimizer step; returns (global mean loss, global decoder tokens)."""
    context = run.context
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(step, config)
    batches = _next_batches(run, config.grad_accum, step)
    counts = torch.tensor(
        [scored_tokens(batches), sum(b.input_ids.numel() for b in batches)],
        dtype=torch.int64,
        device=context.device,
    )
    global_scored, tokens = all_reduce_sum(counts, context).tolist()
    scale = float(context.world_size) if context.parallel != "none" else 1.0
    loss_sum = accumulate_gradients(
        run.model,
        batches,
        max(global_scored, 1),
        gradient_scale=scale,
        autocast=lambda: autocast(context.device, config.dtype),
    )
    loss_sum = all_reduce_sum(loss_sum.to(context.device), context)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(loss_sum) / max(global_scored, 1), int(tokens)


def _progress_bar(config: TrainConfig, start_step: int, is_main: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (is_main and config.progress),
        dynamic_ncols=True,
    )


def _report(record: dict, config: TrainConfig, bar, is_main: bool) -> None:
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:,.0f}")
    bar.update(1)
    step = record["step"]
    if is_main and not config.progress and (step % config.log_every == 0 or step == config.steps):
        print(
            f"step {step}/{config.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"tokens/s {record['tokens_per_second']:,.0f}",
            flush=True,
        )


def _due(step: int, config: TrainConfig) -> bool:
    periodic = config.save_every > 0 and step % config.save_every == 0
    return config.out_dir is not None and (periodic or step == config.steps)


def _save(run: _Run, model_config: MetaLMConfig, config: TrainConfig, done: int) -> Path:
    """Checkpoint ``done`` completed steps (every rank calls: gathering is collective)."""
    position = (
        run.data_position + (done - run.start_step) * run.context.world_size * config.grad_accum
    )
    return save_checkpoint(
        config.out_dir,
        done,
        run.model,
        run.optimizer,
        model_config=model_config,
        train_config=config,
        data_position=position,
        is_main=run.context.is_main,
        keep_last=config.keep_checkpoints,
    )


def _agreed_stop(stop: StopRequest, context: DistributedContext) -> int:
    """The signal this step ends the run on, the same on every rank (0: go on).

    One small all-reduce per step: ranks that got no signal learn of another's,
    so all stop after the same step and can save it together.
    """
    flag = torch.tensor([stop.signum], dtype=torch.int64, device=context.device)
    return int(all_reduce_max(flag, context).item())


def _loop(run: _Run, model_config: MetaLMConfig, config: TrainConfig, on_log) -> TrainResult:
    context = run.context
    losses: list[float] = []
    tokens, checkpoint = 0, None
    bar = _progress_bar(config, run.start_step, context.is_main)
    started = time.perf_counter()
    try:
        with StopRequest() as stop:
            for step in range(run.start_step, config.steps):
                loss, step_tokens = _train_step(run, config, step)
                losses.append(loss)
                tokens += step_tokens
                done = step + 1
                saved = _due(done, config)
                if saved:
                    checkpoint = _save(run, model_config, config, done)
                _log_step(run, config, bar, on_log, done, loss, tokens, started)
                signum = _agreed_stop(stop, context) if done < config.steps else 0
                if signum:
                    if config.out_dir is not None and not saved:
                        checkpoint = _save(run, model_config, config, done)
                    raise TrainingInterrupted(signum, done, checkpoint)
    finally:
        bar.close()
    elapsed = max(time.perf_counter() - started, 1e-9)
    if checkpoint is None and config.out_dir is not None:
        checkpoint = _existing_checkpoint(config.out_dir)
    return TrainResult(
        losses,
        tokens,
        tokens / elapsed,
        max(run.start_step, config.steps),
        unwrap_model(run.model),
        checkpoint,
        resumed_from=run.resumed_from,
    )


def _log_step(
    run: _Run,
    config: TrainConfig,
    bar,
    on_log,
    done: int,
    loss: float,
    tokens: int,
    started: float,
) -> None:
    """Report step ``done`` (the bar or a line) and hand its record to ``on_log``."""
    record = {
        "step": done,
        "loss": loss,
        "lr": learning_rate(done - 1, config),
        "tokens": tokens,
        "tokens_per_second": tokens / max(time.perf_counter() - started, 1e-9),
    }
    _report(record, config, bar, run.context.is_main)
    if on_log is not None:
        on_log(record)


def _existing_checkpoint(out_dir: str) -> Path | None:
    try:
        return latest_checkpoint(out_dir)
    except FileNotFoundError:
        return None


def _with_metrics(run: _Run, config: TrainConfig, on_log, body) -> TrainResult:
    """Run ``body(on_log)`` with rank 0 logging every step to out_dir/metrics.jsonl,
    then draw out_dir/loss.png (skipped, with a note on stderr, without matplotlib)."""
    if config.out_dir is None or not run.context.is_main:
        return body(on_log)
    log = MetricsLog(config.out_dir, resume_step=run.start_step if config.resume else None)

    def log_and_forward(record: dict) -> None:
        log(record)
        if on_log is not None:
            on_log(record)

    try:
        result = body(log_and_forward)
    finally:
        log.close()
    result.metrics = log.path
    if log.path.stat().st_size:
        try:
            result.loss_plot = plot_loss_curve(
                log.path,
                Path(config.out_dir) / LOSS_PLOT_FILE,
                title=f"training loss ({config.out_dir})",
            )
        except ImportError as error:
            print(f"{LOSS_PLOT_FILE} not drawn: {error}", file=sys.stderr)
    return result


def train(
    model_config: MetaLMConfig,
    train_config: TrainConfig,
    micro_batches: Callable[[], Iterable],
    *,
    model: nn.Module | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a MetaLM in this process, or as one rank of a torchrun job.

    Parameters
    ----------
    model_config : the model to build (seeded with ``train_config.seed``) and to
        record in checkpoints.
    train_config : see :class:`TrainConfig`.
    micro_batches : returns the full deterministic stream of SemiCausalBatch
        micro-batches, identical on every rank (see the module docstring).
    model : a plain model to train instead of building one (its ``config`` must
        equal ``model_config``); with ``resume`` its weights are replaced.
    on_log : called after every step, on every rank, with ``{"step", "loss",
        "lr", "tokens", "tokens_per_second"}`` (``step`` counts completed steps).

    Returns
    -------
    TrainResult. Under torchrun the process group this call started is
    destroyed before it returns.

    Raises
    ------
    TrainingInterrupted
        after a SIGINT or SIGTERM: the run stopped after the step it was in,
        saved there (with ``out_dir``); its ``exit_status`` is 130 or 143.
    ExistingRunError
        ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    CheckpointError
        (resume) a checkpoint file missing, damaged, or of another model.

    Example
    -------
    >>> from metalm_fast.models import PRESETS
    >>> from metalm_fast.training.command import synthetic_micro_batches
    >>> config = PRESETS["tiny"]
    >>> result = train(config, TrainConfig(steps=2, device="cpu"),  # bar on stderr
    ...                lambda: synthetic_micro_batches(config.vocab_size, 256, seed=0))
    >>> len(result.losses)
    2
    """
    context = init_distributed(train_config.parallel, train_config.device)
    try:
        run = _prepare(model_config, train_config, micro_batches, model, context)
        return _with_metrics(
            run, train_config, on_log, lambda log: _loop(run, model_config, train_config, log)
        )
    finally:
        shutdown(context)
