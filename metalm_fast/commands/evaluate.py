"""``metalm-fast eval``: digit VQA accuracy against chance, zero-shot, k-shot, finetuned.

Example::

    metalm-fast eval --checkpoint runs/demo/finetuned --shots 0 --limit 200
    metalm-fast eval --checkpoint runs/demo --shots 0 4 --encoder-demos --limit 200
    metalm-fast eval --checkpoint runs/demo --finetune-steps 200   # saves runs/demo/finetuned

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
from metalm_fast.training.pretrained import run_tokenizer
from metalm_fast.training.runtime import autocast
from metalm_fast.training.trainer import TrainConfig, TrainResult, train

__all__ = [
    "FINETUNED_DIR",
    "add_arguments",
    "check_shots",
    "finetune_on_vqa",
    "finetune_out",
    "format_table",
    "main",
    "run",
]

#: where a finetuned checkpoint goes, under the checkpoint it started from (or the demo's --out)
FINETUNED_DIR = "finetuned"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint to evaluate: a run directory (train/demo --out, "
        "its latest step) or a step-N directory",
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
        help="finetune on digit VQA for this many steps first, and save the "
        "result in --out (default 0: evaluate as loaded)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where --finetune-steps saves the finetuned checkpoint "
        f"(default <checkpoint>/{FINETUNED_DIR})",
    )
    parser.add_argument(
        "--limit", type=int, default=200, help="held-out images per task (default 200)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the demonstration draws and the finetuning data",
    )
    add_runtime_options(parser)


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
    config = TrainConfig(
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
    return train(model.config, config, data.vqa_micro_batches, model=model)


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
    check_shots(args.shots)
    check_seed(args.seed)
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
    if args.encoder_demos and (config.variant != "two_stack" or config.encoder_layers == 0):
        raise ValueError(
            f"--encoder-demos needs a text encoder to read the demonstrations; the model "
            f"of {name} has none ({config.variant}, encoder_layers={config.encoder_layers})"
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


def main(args: argparse.Namespace) -> int:
    _check_arguments(args)
    device = runtime_device(args)
    out = finetune_out(args) if args.finetune_steps else None
    model = checkpoint_model(args.checkpoint).to(device)
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
