"""``metalm-fast demo``: the main job, a few minutes on a CPU.

1. semi-causal pretraining of the tiny MetaLM on the embedded data (Python's
   documentation topics, and captioned scikit-learn digit scans), printing the
   loss as it falls;
2. digit VQA on held-out images before finetuning: zero-shot, k-shot with the
   demonstrations read by the decoder, and k-shot with them read by the
   non-causal encoder, each against chance;
3. a short finetuning on digit VQA, then the same zero-shot evaluation;
4. the finetuned model answers questions about a few held-out digits (drawn
   in ASCII), through the paged KV cache;
5. the language tasks on held-out pydoc paragraphs (topic, continuation,
   cloze, title: metalm_fast.evaluation.language): the pretrained model
   zero-shot and k-shot, then a copy of it after a short multitask finetuning;
6. the end-to-end throughput of the fast path against the HF-style path
   (benchmarks/bench_end_to_end.py --quick);
7. one summary: the digit table and the language table, chance beside each accuracy.

What it leaves in ``--out`` (default runs/demo)::

    runs/demo/                  the pretrained checkpoint (latest -> step-<steps>),
                                its metrics.jsonl and loss.png
    runs/demo/finetuned/        the finetuned checkpoint, its metrics.jsonl and loss.png
    runs/demo/language/         the language-finetuned checkpoint, likewise

``generate --checkpoint runs/demo/finetuned`` answers questions about digits;
``eval --checkpoint runs/demo/finetuned`` scores it.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from metalm_fast.commands._options import add_runtime_options, check_seed, runtime_device
from metalm_fast.commands.bench import BENCHMARKS, source_root
from metalm_fast.commands.evaluate import (
    FINETUNED_DIR,
    accuracy_table,
    check_language_shots,
    check_shots,
    finetune_on_language,
    finetune_on_vqa,
    format_table,
    run_language,
)
from metalm_fast.commands.evaluate import run as run_eval
from metalm_fast.commands.generate import run as run_generate
from metalm_fast.data.default_data import DefaultData
from metalm_fast.data.digits import QUESTIONS, load_digits
from metalm_fast.data.text_corpus import pydoc_documents
from metalm_fast.data.tokenizer import load_tokenizer
from metalm_fast.evaluation.digits_vqa import TaskAccuracy
from metalm_fast.evaluation.language import LANGUAGE_TASKS
from metalm_fast.models.metalm import PRESETS, MetaLM
from metalm_fast.training.command import data_problem
from metalm_fast.training.runtime import autocast
from metalm_fast.training.trainer import TrainConfig, TrainResult, train

__all__ = [
    "LANGUAGE_DIR",
    "add_arguments",
    "ascii_image",
    "demo_presets",
    "language_summary",
    "main",
    "summary_table",
]

#: where the language-finetuned checkpoint goes, under ``--out``
LANGUAGE_DIR = "language"

SHADES = " .:-=+*#%@"

CHANCE_NOTE = """\
chance = 1 / (number of candidate answers of the task): the model's answer is the candidate
it finds most likely, so guessing scores 10% on 'digit' (ten candidates) and 50% on the yes/no
tasks. Before finetuning, a model this small, pretrained for a few minutes, sits near chance
(on 'digit' at most a little above it, from captions that name the digit): pretraining has
not tied the image features to the answer words in the question-and-answer format, and
in-context demonstrations cannot teach a model this size that mapping; finetuning on the
format is what teaches it."""


def demo_presets() -> list[str]:
    """The presets the demo can run: those that read the digit images and the text spans."""
    return sorted(
        name
        for name, config in PRESETS.items()
        if data_problem(config, "default") is None and data_problem(config, "vqa") is None
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=demo_presets(),
        help="model size; only presets with a vision encoder for the 8x8 "
        "digits and a text encoder are offered (default tiny)",
    )
    parser.add_argument(
        "--steps", type=int, default=1500, help="semi-causal pretraining steps (default 1500)"
    )
    parser.add_argument(
        "--finetune-steps", type=int, default=200, help="digit VQA finetuning steps (default 200)"
    )
    parser.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=2048,
        help="tokens per training micro-batch (default 2048)",
    )
    parser.add_argument(
        "--language-steps",
        type=int,
        default=400,
        help="multitask language finetuning steps (default 400; 0 skips the language tasks)",
    )
    parser.add_argument(
        "--shots", type=int, default=4, help="demonstrations per in-context prompt (default 4)"
    )
    parser.add_argument(
        "--limit", type=int, default=200, help="held-out images per task (default 200)"
    )
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="run directory: pretrained checkpoint, metrics.jsonl and loss.png; "
        f"the finetuned ones go to <out>/{FINETUNED_DIR} (default runs/demo)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model, the data and the demonstration draws",
    )
    parser.add_argument("--no-bench", action="store_true", help="skip the throughput step")
    add_runtime_options(parser)


def ascii_image(image: torch.Tensor) -> list[str]:
    """Rows of characters for a [1, H, W] image in [0, 1], two characters per pixel.

    >>> ascii_image(torch.tensor([[[0.0, 1.0]]]))
    ['  @@']
    """
    levels = (image[0].clamp(0, 1) * (len(SHADES) - 1)).round().long()
    return ["".join(SHADES[v] * 2 for v in row.tolist()) for row in levels]


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


@dataclass
class _Stage:
    """A training stage's figures for the summary."""

    first_loss: float  # mean over the first 10% of steps
    last_loss: float  # mean over the last 10%
    steps: int
    seconds: float
    result: TrainResult


def _stage(result: TrainResult, seconds: float) -> _Stage:
    losses = result.losses
    tenth = max(1, len(losses) // 10)
    head, tail = losses[:tenth], losses[-tenth:]
    return _Stage(sum(head) / len(head), sum(tail) / len(tail), len(losses), seconds, result)


def _print_stage(stage: _Stage) -> None:
    result = stage.result
    print(
        f"loss {stage.first_loss:.3f} (first 10% of steps) -> {stage.last_loss:.3f} "
        f"(last 10%) in {stage.seconds:.0f} s, {result.tokens_per_second:,.0f} tokens/s"
    )
    print(f"checkpoint: {result.checkpoint}")
    plot = f", {result.loss_plot}" if result.loss_plot is not None else ""
    print(f"metrics: {result.metrics}{plot}")


def _demo_data(tokenizer, config, args) -> DefaultData:
    """The embedded data at ``--micro-batch-tokens`` per micro-batch; ValueError naming
    the flag when a micro-batch cannot hold a caption or a VQA document.

    Checked before pretraining: the finetuning stream would otherwise find out
    only after the minutes of pretraining.
    """
    try:
        data = DefaultData(
            tokenizer,
            config.tokens_per_image,
            token_budget=args.micro_batch_tokens,
            seed=args.seed,
        )
        next(data.vqa_micro_batches())
    except ValueError as error:
        raise ValueError(f"--micro-batch-tokens {args.micro_batch_tokens}: {error}") from error
    return data


def _pretrain(model, data: DefaultData, args) -> _Stage:
    config = TrainConfig(
        steps=args.steps,
        lr=2e-3,
        warmup_steps=max(1, args.steps // 20),
        seed=args.seed,
        out_dir=args.out,
        # the demo's own directory, rewritten on every run (README's command runs twice)
        overwrite=True,
        save_every=args.steps,
        progress=False,
        log_every=max(1, args.steps // 12),
        device=args.device,
        dtype=args.dtype,
    )
    start = time.perf_counter()
    result = train(model.config, config, data.micro_batches, model=model)
    return _stage(result, time.perf_counter() - start)


def _finetune(model, tokenizer, args) -> _Stage:
    start = time.perf_counter()
    result = finetune_on_vqa(
        model,
        tokenizer,
        args.finetune_steps,
        seed=args.seed,
        token_budget=args.micro_batch_tokens,
        progress=False,
        out_dir=Path(args.out) / FINETUNED_DIR,
        overwrite=True,
        device=args.device,
        dtype=args.dtype,
    )
    return _stage(result, time.perf_counter() - start)


def _language(model, tokenizer, device, args) -> tuple[list[TaskAccuracy], list[TaskAccuracy]]:
    """The language tasks: ``model`` (pretrained) zero-shot and k-shot, then finetuned on
    the four tasks mixed (saved in <out>/language) and zero-shot again."""
    _section("language tasks on held-out pydoc paragraphs (before finetuning)")
    started = time.perf_counter()
    options = dict(limit=args.limit, seed=args.seed)
    with torch.no_grad(), autocast(device, args.dtype):
        before = run_language(
            model, tokenizer, shots=(0, args.shots), encoder_demos=True, **options
        )
    print(format_table(before, "in-context learning"))
    _section(f"multitask finetuning on the language tasks ({args.language_steps} steps)")
    result = finetune_on_language(
        model,
        tokenizer,
        args.language_steps,
        seed=args.seed,
        token_budget=args.micro_batch_tokens,
        progress=False,
        out_dir=Path(args.out) / LANGUAGE_DIR,
        overwrite=True,
        device=args.device,
        dtype=args.dtype,
    )
    with torch.no_grad(), autocast(device, args.dtype):
        after = run_language(model, tokenizer, shots=(0,), **options)
    print(format_table(after, "after multitask finetuning"))
    seconds = time.perf_counter() - started
    print(f"checkpoint: {result.checkpoint}; the language tasks took {seconds:.0f} s")
    return before, after


def _answer_examples(model, tokenizer, count: int = 4) -> None:
    test = load_digits("test")
    for i in range(count):
        image, label = test.images[i], int(test.labels[i])
        prompts = [f"<image> question: {task.question} answer:" for task in QUESTIONS]
        answers = run_generate(
            model, tokenizer, prompts, [image] * len(QUESTIONS), max_new_tokens=3
        )
        print(f"held-out digit {i} (label {label}):")
        lines = ascii_image(image)
        qa = [
            f"  Q: {t.question:<28} A: {a.strip():<8} (truth: {t.answer_for(label)})"
            for t, a in zip(QUESTIONS, answers, strict=True)
        ]
        for row, text in zip(lines, qa + [""] * (len(lines) - len(qa)), strict=True):
            print(f"  {row}   {text}")


def _throughput() -> None:
    try:
        root = source_root()
    except FileNotFoundError as error:
        print(f"skipped: {error}")
        return
    subprocess.run(
        [sys.executable, BENCHMARKS["end_to_end"], "--quick", "--no-write"], cwd=root, check=False
    )


def summary_table(
    pretrain: _Stage,
    finetune: _Stage,
    before: list[TaskAccuracy],
    after: list[TaskAccuracy],
    out: str,
) -> str:
    """The demo's closing summary: losses, where the checkpoints are, accuracy vs chance."""
    finetuned_dir = Path(out) / FINETUNED_DIR
    images = before[0].total if before else 0
    shots = max((r.shots for r in before), default=0)
    facts = [
        (
            "pretraining",
            f"loss {pretrain.first_loss:.2f} -> {pretrain.last_loss:.2f} nats/token "
            f"(mean of the first -> last 10% of {pretrain.steps} steps), "
            f"{pretrain.seconds:.0f} s",
        ),
        (
            "finetuning",
            f"loss {finetune.first_loss:.2f} -> {finetune.last_loss:.2f} nats/answer "
            f"token (first -> last 10% of {finetune.steps} steps), "
            f"{finetune.seconds:.0f} s",
        ),
        ("pretrained model", f"{pretrain.result.checkpoint}  (--checkpoint {out})"),
        ("finetuned model", f"{finetune.result.checkpoint}  (--checkpoint {finetuned_dir})"),
        ("metrics", f"metrics.jsonl and loss.png in {out} and {finetuned_dir}"),
    ]
    width = max(len(name) for name, _ in facts)
    lines = [f"{name:<{width}}  {text}" for name, text in facts]
    lines += ["", f"digit VQA accuracy on {images} held-out images per task"]
    lines += accuracy_table(before, after)
    lines += [
        f"{shots}-shot, decoder/encoder: {shots} solved demonstrations before the question, "
        "read by the decoder",
        "or by the non-causal text encoder; finetuned: zero-shot after finetuning.",
    ]
    return "\n".join(lines)


def language_summary(before: list[TaskAccuracy], after: list[TaskAccuracy], steps: int) -> str:
    """The language table of the summary: held-out questions per task, chance, in-context
    and multitask-finetuned accuracy."""
    counts = ", ".join(f"{r.task} {r.total}" for r in before if r.shots == 0)
    lines = [f"language tasks on held-out pydoc paragraphs (questions: {counts})"]
    lines += accuracy_table(before, after)
    lines += [
        f"finetuned: zero-shot after {steps} multitask steps on the four tasks' training",
        "paragraphs (a copy of the pretrained model, not the digit-finetuned one);",
        "title is generated and scored by exact match (chance: a guess among the known titles).",
    ]
    return "\n".join(lines)


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("steps", "finetune_steps", "shots", "limit"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.language_steps < 0:
        raise ValueError(f"--language-steps must be >= 0, got {args.language_steps}")
    check_shots([args.shots])
    check_language_shots([args.shots], list(LANGUAGE_TASKS), args.seed)
    check_seed(args.seed)


def main(args: argparse.Namespace) -> int:
    _check_arguments(args)
    device = runtime_device(args)
    torch.manual_seed(args.seed)
    config = PRESETS[args.preset]
    _section("data")
    tokenizer = load_tokenizer(config.vocab_size)
    data = _demo_data(tokenizer, config, args)
    documents = pydoc_documents("train")
    digits = load_digits("train"), load_digits("test")
    print(
        f"text: {len(documents)} documentation topics, {sum(map(len, documents)):,} characters;"
        f" BPE tokenizer of {tokenizer.vocab_size} tokens; digits: {len(digits[0].labels)} "
        f"train / {len(digits[1].labels)} held-out 8x8 scans"
    )
    model = MetaLM(config)
    print(
        f"model: {args.preset} MetaLM, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {config.variant}, {config.tokens_per_image} tokens per image; "
        f"{device.type}, dtype {args.dtype}"
    )

    _section(f"semi-causal pretraining ({args.steps} steps)")
    pretrain = _pretrain(model, data, args)
    _print_stage(pretrain)
    # the language tasks start from the pretrained model, not the digit-finetuned one
    pretrained = copy.deepcopy(model) if args.language_steps else None

    _section("digit VQA before finetuning (candidate ranking, held-out images)")
    with torch.no_grad(), autocast(device, args.dtype):
        before = run_eval(
            model,
            tokenizer,
            shots=(0, args.shots),
            encoder_demos=True,
            limit=args.limit,
            seed=args.seed,
        )
    print(format_table(before, "in-context learning"))

    _section(f"finetuning on digit VQA ({args.finetune_steps} steps)")
    finetune = _finetune(model, tokenizer, args)
    _print_stage(finetune)
    with torch.no_grad(), autocast(device, args.dtype):
        after = run_eval(model, tokenizer, shots=(0,), limit=args.limit, seed=args.seed)
    print(format_table(after, "after finetuning"))

    _section("questions about held-out digits (greedy, paged KV cache)")
    with torch.no_grad(), autocast(device, args.dtype):
        _answer_examples(model.eval(), tokenizer)

    language = None
    if pretrained is not None:
        language = _language(pretrained, tokenizer, device, args)

    if not args.no_bench:
        _section("end-to-end throughput: fast path vs HF-style path")
        _throughput()

    _section("summary")
    print(summary_table(pretrain, finetune, before, after, args.out))
    if language is not None:
        print()
        print(language_summary(*language, args.language_steps))
    print()
    print(CHANCE_NOTE)
    return 0
