"""``metalm-fast eval``: digit VQA accuracy against chance, zero-shot, k-shot, finetuned.

Example::

    metalm-fast eval --checkpoint runs/demo --shots 0 4 --encoder-demos --limit 200
    metalm-fast eval --checkpoint runs/demo --finetune-steps 100

``--shots`` lists the k of each in-context run (0 = zero-shot); with
``--encoder-demos`` every k > 0 also runs with the demonstrations read by the
non-causal text encoder. ``--finetune-steps N`` first finetunes the model on
the digit VQA training split (N optimizer steps), then evaluates.
"""

from __future__ import annotations

import argparse

from metalm_fast.data.default_data import DefaultData
from metalm_fast.data.digits import load_digits
from metalm_fast.data.tokenizer import load_tokenizer
from metalm_fast.evaluation.digits_vqa import TaskAccuracy, evaluate
from metalm_fast.training.checkpoint import load_model
from metalm_fast.training.trainer import TrainConfig, train

__all__ = ["add_arguments", "finetune_on_vqa", "format_table", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (train --out)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--encoder-demos", action="store_true",
                        help="also run k-shot with demonstrations read by the text encoder")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--limit", type=int, default=200, help="held-out images per task")
    parser.add_argument("--seed", type=int, default=0)


def finetune_on_vqa(model, tokenizer, steps: int, *, seed: int = 0, lr: float = 1e-3,
                    token_budget: int = 2048, progress: bool = True):
    """Finetune ``model`` in place on the digit VQA training split for ``steps`` steps."""
    data = DefaultData(tokenizer, model.config.tokens_per_image, token_budget=token_budget,
                       seed=seed)
    config = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), seed=seed,
                         progress=progress, log_every=max(1, steps // 5))
    return train(model.config, config, data.vqa_micro_batches, model=model)


def run(model, tokenizer, *, shots=(0,), encoder_demos: bool = False, limit: int = 200,
        seed: int = 0) -> list[TaskAccuracy]:
    test, pool = load_digits("test"), load_digits("train")
    results = []
    for k in shots:
        results += evaluate(model, tokenizer, test, pool, shots=k, limit=limit, seed=seed)
        if encoder_demos and k > 0 and model.config.variant == "two_stack":
            results += evaluate(model, tokenizer, test, pool, shots=k, encoder_demos=True,
                                limit=limit, seed=seed)
    return results


def format_table(results: list[TaskAccuracy], title: str) -> str:
    lines = [title, f"  {'task':<18} {'shots':>5} {'demos read by':<14} {'accuracy':>9} "
                    f"{'chance':>7} {'n':>5}"]
    for r in results:
        reader = "encoder" if r.encoder_demos else ("decoder" if r.shots else "-")
        lines.append(f"  {r.task:<18} {r.shots:>5} {reader:<14} {r.accuracy:>9.1%} "
                     f"{r.chance:>7.1%} {r.total:>5}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint)
    tokenizer = load_tokenizer(model.config.vocab_size)
    if args.finetune_steps:
        finetune_on_vqa(model, tokenizer, args.finetune_steps, seed=args.seed)
    results = run(model, tokenizer, shots=args.shots, encoder_demos=args.encoder_demos,
                  limit=args.limit, seed=args.seed)
    suffix = f", after {args.finetune_steps} finetuning steps" if args.finetune_steps else ""
    print(format_table(results, f"digit VQA on held-out images{suffix}"))
    return 0
