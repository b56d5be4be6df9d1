"""``metalm-fast eval``: accuracy against chance, zero-shot, k-shot, finetuned.

Example::

    metalm-fast eval --checkpoint runs/demo/finetuned --shots 0 --limit 200
    metalm-fast eval --checkpoint runs/demo --shots 0 4 --encoder-demos --limit 200
    metalm-fast eval --checkpoint runs/demo --finetune-steps 200   # saves runs/demo/finetuned
    metalm-fast eval --checkpoint runs/demo --task language --shots 0 2 --finetune-steps 300

``--task`` picks the tasks: ``digits`` (the default: digit VQA on held-out
images) or a language task on held-out pydoc paragraphs (``topic``,
``continuation``, ``cloze``, ``title``; ``language`` is all four:
metalm_fast.evaluation.language). A language run evaluates the model as
loaded, then, with ``--finetune-steps N``, finetunes it on the *four* language
tasks' training splits mixed (multitask) and evaluates it again, zero-shot;
one table puts every figure beside chance.

``--shots`` lists the k of each in-context run (0 = zero-shot); with
``--encoder-demos`` every k > 0 also runs with the demonstrations read by the
non-causal text encoder. ``--finetune-steps N`` first finetunes the model on
the digit VQA training split (N optimizer steps), saves the finetuned
checkpoint (with its metrics.jsonl and loss.png) in ``--out`` (default
``<checkpoint>/finetuned``), then evaluates. Chance is 1 / the number of
candidate answers of each task: the model's answer is its most likely candidate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metalm_fast.commands._checkpoint import checkpoint_model
from metalm_fast.commands._options import add_runtime_options, check_seed, runtime_device
from metalm_fast.data.default_data import DefaultData
from metalm_fast.data.digits import load_digits
from metalm_fast.evaluation.digits_vqa import TaskAccuracy, evaluate
from metalm_fast.evaluation.language import (
    LANGUAGE_TASKS,
    TASKS,
    LanguageFinetuneData,
    evaluate_language,
    reads_spans,
)
from metalm_fast.training.pretrained import run_tokenizer
from metalm_fast.training.runtime import autocast
from metalm_fast.training.trainer import TrainConfig, TrainResult, train

__all__ = [
    "FINETUNED_DIR",
    "TASK_CHOICES",
    "accuracy_table",
    "add_arguments",
    "check_language_shots",
    "check_shots",
    "finetune_on_language",
    "finetune_on_vqa",
    "finetune_out",
    "format_table",
    "main",
    "run",
    "run_language",
    "task_names",
]

#: where a finetuned checkpoint goes, under the checkpoint it started from (or the demo's --out)
FINETUNED_DIR = "finetuned"
#: ``--task`` values: digit VQA, each language task, or every language task.
TASK_CHOICES = ("digits", *LANGUAGE_TASKS, "language")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint to evaluate: a run directory (train/demo --out, "
        "its latest step) or a step-N directory",
    )
    parser.add_argument(
        "--task",
        default="digits",
        help=f"what to evaluate: {', '.join(TASK_CHOICES)} (language = every "
        "language task; default digits)",
    )
    parser.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=[0, 4],
        help="k of each in-context run, 0 = zero-shot (default 0 4)",
    )
    parser.add_argument(
        "--encoder-demos",
        action="store_true",
        help="also run k-shot with demonstrations read by the text encoder",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="finetune for this many steps (digit VQA, or the four language tasks "
        "mixed) and save the result in --out (default 0: evaluate as loaded)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where --finetune-steps saves the finetuned checkpoint "
        f"(default <checkpoint>/{FINETUNED_DIR})",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=200,
        help="held-out images (or language questions) per task (default 200)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the demonstration draws and the finetuning data",
    )
    add_runtime_options(parser)


def _finetune_config(steps, lr, seed, progress, out_dir, overwrite, device, dtype) -> TrainConfig:
    """The finetuning runs' TrainConfig: warmup a tenth of the steps, five progress lines."""
    return TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        seed=seed,
        progress=progress,
        log_every=max(1, steps // 5),
        out_dir=None if out_dir is None else str(out_dir),
        overwrite=overwrite,
        device=device,
        dtype=dtype,
    )


def finetune_on_vqa(
    model,
    tokenizer,
    steps: int,
    *,
    seed: int = 0,
    lr: float = 1e-3,
    token_budget: int = 2048,
    progress: bool = True,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> TrainResult:
    """Finetune ``model`` in place on the digit VQA training split for ``steps`` steps.

    With ``out_dir`` the finetuned checkpoint (``out_dir/step-<steps>``, ``latest``)
    and the run's metrics.jsonl and loss.png are written there; a directory that
    already holds a run is refused unless ``overwrite`` (TrainConfig's rule).
    """
    data = DefaultData(
        tokenizer, model.config.tokens_per_image, token_budget=token_budget, seed=seed
    )
    config = _finetune_config(steps, lr, seed, progress, out_dir, overwrite, device, dtype)
    return train(model.config, config, data.vqa_micro_batches, model=model)


def finetune_on_language(
    model,
    tokenizer,
    steps: int,
    *,
    seed: int = 0,
    lr: float = 2e-3,
    token_budget: int = 2048,
    progress: bool = True,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> TrainResult:
    """Finetune ``model`` in place on the four language tasks' training splits, mixed.

    Passages are spans when the model reads spans (as the evaluation reads them);
    only answers are scored. ``out_dir`` and ``overwrite`` as :func:`finetune_on_vqa`.
    """
    data = LanguageFinetuneData(
        tokenizer, encode_passages=reads_spans(model), token_budget=token_budget, seed=seed
    )
    config = _finetune_config(steps, lr, seed, progress, out_dir, overwrite, device, dtype)
    return train(model.config, config, data.micro_batches, model=model)


def run(
    model, tokenizer, *, shots=(0,), encoder_demos: bool = False, limit: int = 200, seed: int = 0
) -> list[TaskAccuracy]:
    test, pool = load_digits("test"), load_digits("train")
    results = []
    for k in shots:
        results += evaluate(model, tokenizer, test, pool, shots=k, limit=limit, seed=seed)
        if encoder_demos and k > 0 and model.config.variant == "two_stack":
            results += evaluate(
                model, tokenizer, test, pool, shots=k, encoder_demos=True, limit=limit, seed=seed
            )
    return results


def run_language(
    model,
    tokenizer,
    tasks=LANGUAGE_TASKS,
    *,
    shots=(0,),
    encoder_demos: bool = False,
    limit: int | None = 200,
    seed: int = 0,
) -> list[TaskAccuracy]:
    """Language accuracy for every k of ``shots``; with ``encoder_demos`` every k > 0
    also with the demonstrations read by the text encoder (when the model has one)."""
    results = []
    for k in shots:
        results += evaluate_language(model, tokenizer, tasks, shots=k, limit=limit, seed=seed)
        if encoder_demos and k > 0 and model.has_text_encoder:
            results += evaluate_language(
                model, tokenizer, tasks, shots=k, encoder_demos=True, limit=limit, seed=seed
            )
    return results


def _column(result: TaskAccuracy) -> str:
    if result.shots == 0:
        return "zero-shot"
    return f"{result.shots}-shot, {'encoder' if result.encoder_demos else 'decoder'}"


def accuracy_table(before: list[TaskAccuracy], after: list[TaskAccuracy]) -> list[str]:
    """Lines of one table: a row per task (its candidates and chance), a column per
    in-context setting of ``before``, and ``finetuned`` (zero-shot, from ``after``)."""
    columns = list(dict.fromkeys(_column(r) for r in before))
    if after:
        columns.append("finetuned")
    cells: dict[str, dict[str, str]] = {}
    tasks: dict[str, TaskAccuracy] = {}
    for results, finetuned in ((before, False), (after, True)):
        for r in results:
            tasks.setdefault(r.task, r)
            column = "finetuned" if finetuned else _column(r)
            cells.setdefault(r.task, {})[column] = r.accuracy_text()
    headers = ["task", "candidates", "chance", *columns]
    rows = [
        [
            task,
            _candidates(r),
            f"{r.chance:.1%}",
            *(cells[task].get(c, "-") for c in columns),
        ]
        for task, r in tasks.items()
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    return [line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def _candidates(result: TaskAccuracy) -> str:
    """The candidate count, or "generated" for an exact-match task (chance: a guess
    among its known answers)."""
    task = TASKS.get(result.task)
    if task is not None and task.generative:
        return "generated"
    return str(round(1 / result.chance))


def format_table(results: list[TaskAccuracy], title: str) -> str:
    lines = [
        title,
        f"  {'task':<18} {'shots':>5} {'demos read by':<14} {'accuracy':>9} {'chance':>7} {'n':>5}",
    ]
    for r in results:
        reader = "encoder" if r.encoder_demos else ("decoder" if r.shots else "-")
        lines.append(
            f"  {r.task:<18} {r.shots:>5} {reader:<14} {r.accuracy_text():>9} "
            f"{r.chance:>7.1%} {r.total:>5}"
        )
    return "\n".join(lines)


def task_names(task: str) -> list[str]:
    """The language tasks ``--task`` names ([] for digits); ValueError naming ``--task``."""
    if task not in TASK_CHOICES:
        raise ValueError(f"--task must be one of {', '.join(TASK_CHOICES)}, got {task!r}")
    if task == "digits":
        return []
    return list(LANGUAGE_TASKS) if task == "language" else [task]


def check_language_shots(shots: list[int], tasks: list[str], seed: int = 0) -> None:
    """ValueError naming ``--shots`` unless every k is in [0, the smallest training split
    of ``tasks``] (each k-shot prompt draws k distinct training examples)."""
    pool = min(len(TASKS[name].examples("train", seed)) for name in tasks)
    if any(not 0 <= k <= pool for k in shots):
        raise ValueError(
            f"--shots must all lie in [0, {pool}] (the training examples the "
            f"demonstrations are drawn from), got {' '.join(map(str, shots))}"
        )


def check_shots(shots: list[int]) -> None:
    """ValueError naming ``--shots`` unless every k is in [0, the training images]
    (each k-shot prompt draws k distinct demonstrations from the training split)."""
    pool = len(load_digits("train").labels)
    if any(not 0 <= k <= pool for k in shots):
        raise ValueError(
            f"--shots must all lie in [0, {pool}] (the training images the "
            f"demonstrations are drawn from), got {' '.join(map(str, shots))}"
        )


def _check_arguments(args: argparse.Namespace) -> None:
    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    check_seed(args.seed)
    language = task_names(args.task)
    if language:
        check_language_shots(args.shots, language, args.seed)
    else:
        check_shots(args.shots)
    if args.out is not None and not args.finetune_steps:
        raise ValueError(
            "--out is where --finetune-steps saves its checkpoint; give --finetune-steps N as well"
        )


def _check_model_reads_digits(model, args: argparse.Namespace) -> None:
    """Digit VQA shows 8x8 digit images (and, with --encoder-demos, gives the text
    encoder the demonstrations): a checkpoint whose model lacks the encoder is
    named here, before any work, rather than failing in the first batch."""
    config, name = model.config, f"--checkpoint {args.checkpoint}"
    digit_shape = tuple(load_digits("test").images.shape[1:])
    shape = (config.image_channels, config.image_size, config.image_size)
    if config.vision_layers == 0:
        raise ValueError(f"{name} cannot answer digit questions: no vision encoder")
    if shape != digit_shape and config.vision_encoder is None:  # a pretrained one resizes
        raise ValueError(
            f"{name} cannot answer digit questions: its vision encoder reads images "
            f"{shape}, the digits are {digit_shape}"
        )
    _check_encoder_demos(model, args)


def _check_encoder_demos(model, args: argparse.Namespace) -> None:
    config = model.config
    if args.encoder_demos and not model.has_text_encoder:
        raise ValueError(
            f"--encoder-demos needs a text encoder to read the demonstrations; the model "
            f"of --checkpoint {args.checkpoint} has none ({config.variant}, "
            f"encoder_layers={config.encoder_layers})"
        )


def finetune_out(args: argparse.Namespace) -> Path:
    """Where ``--finetune-steps`` saves: ``--out``, or ``<checkpoint>/finetuned``.

    The save rewrites that directory, so it may not be the checkpoint being
    evaluated nor a directory holding it: that would erase the model it started from.
    """
    if args.out is None:
        return Path(args.checkpoint) / FINETUNED_DIR
    out, source = Path(args.out), Path(args.checkpoint).resolve()
    if out.resolve() in (source, *source.parents):
        raise ValueError(
            f"--out {args.out} holds --checkpoint {args.checkpoint}: saving the finetuned "
            f"model there would erase the one it started from; give another --out"
        )
    return out


def _main_language(model, tokenizer, device, out: Path | None, args) -> int:
    """Evaluate the language tasks as loaded, finetune (with ``out``), evaluate again."""
    tasks = task_names(args.task)
    _check_encoder_demos(model, args)
    options = dict(limit=args.limit, seed=args.seed)
    with torch.no_grad(), autocast(device, args.dtype):
        before = run_language(
            model, tokenizer, tasks, shots=args.shots, encoder_demos=args.encoder_demos, **options
        )
    after: list[TaskAccuracy] = []
    if out is not None:
        result = finetune_on_language(
            model,
            tokenizer,
            args.finetune_steps,
            seed=args.seed,
            out_dir=out,
            overwrite=True,  # the finetuned copy is this command's output, as for digits
            device=args.device,
            dtype=args.dtype,
        )
        print(f"finetuned checkpoint: {result.checkpoint} (metrics: {result.metrics})")
        with torch.no_grad(), autocast(device, args.dtype):
            after = run_language(model, tokenizer, tasks, shots=(0,), **options)
    suffix = f", finetuned: after {args.finetune_steps} multitask steps" if after else ""
    print(f"language tasks on held-out pydoc paragraphs{suffix}")
    print("\n".join("  " + line for line in accuracy_table(before, after)))
    return 0


def main(args: argparse.Namespace) -> int:
    _check_arguments(args)
    device = runtime_device(args)
    out = finetune_out(args) if args.finetune_steps else None
    model = checkpoint_model(args.checkpoint).to(device)
    if task_names(args.task):
        tokenizer = run_tokenizer(args.checkpoint, model.config.vocab_size)
        return _main_language(model, tokenizer, device, out, args)
    _check_model_reads_digits(model, args)
    tokenizer = run_tokenizer(args.checkpoint, model.config.vocab_size)
    if out is not None:
        result = finetune_on_vqa(
            model,
            tokenizer,
            args.finetune_steps,
            seed=args.seed,
            out_dir=out,
            # the finetuned copy is this command's output, rewritten on every run
            overwrite=True,
            device=args.device,
            dtype=args.dtype,
        )
        print(f"finetuned checkpoint: {result.checkpoint} (metrics: {result.metrics})")
        print(
            f"  try: metalm-fast generate --checkpoint {out} --prompt "
            f'"<image> question: what digit is this? answer:" --image digit:0'
        )
    with torch.no_grad(), autocast(device, args.dtype):
        results = run(
            model,
            tokenizer,
            shots=args.shots,
            encoder_demos=args.encoder_demos,
            limit=args.limit,
            seed=args.seed,
        )
    suffix = f", after {args.finetune_steps} finetuning steps" if args.finetune_steps else ""
    print(format_table(results, f"digit VQA on held-out images{suffix}"))
    return 0
