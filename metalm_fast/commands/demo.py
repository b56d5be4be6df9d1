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
5. the end-to-end throughput of the fast path against the HF-style path
   (benchmarks/bench_end_to_end.py --quick).

The pretrained checkpoint is left in ``--out`` for ``generate`` and ``eval``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from metalm_fast.commands.bench import BENCHMARKS, source_root
from metalm_fast.commands.evaluate import finetune_on_vqa, format_table
from metalm_fast.commands.evaluate import run as run_eval
from metalm_fast.commands.generate import run as run_generate
from metalm_fast.data.default_data import DefaultData
from metalm_fast.data.digits import QUESTIONS, load_digits
from metalm_fast.data.text_corpus import pydoc_documents
from metalm_fast.data.tokenizer import load_tokenizer
from metalm_fast.models.metalm import PRESETS, MetaLM
from metalm_fast.training.trainer import TrainConfig, train

__all__ = ["add_arguments", "ascii_image", "main"]

SHADES = " .:-=+*#%@"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=1500, help="pretraining steps")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--limit", type=int, default=200, help="held-out images per task")
    parser.add_argument("--out", default="runs/demo", help="checkpoint directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bench", action="store_true", help="skip the throughput step")


def ascii_image(image: torch.Tensor) -> list[str]:
    """Rows of characters for a [1, H, W] image in [0, 1], two characters per pixel."""
    levels = (image[0].clamp(0, 1) * (len(SHADES) - 1)).round().long()
    return ["".join(SHADES[v] * 2 for v in row.tolist()) for row in levels]


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _pretrain(model, tokenizer, args) -> None:
    data = DefaultData(tokenizer, model.config.tokens_per_image,
                       token_budget=args.micro_batch_tokens, seed=args.seed)
    config = TrainConfig(steps=args.steps, lr=2e-3, warmup_steps=max(1, args.steps // 20),
                         seed=args.seed, out_dir=args.out, save_every=args.steps,
                         progress=False, log_every=max(1, args.steps // 12))
    start = time.perf_counter()
    result = train(model.config, config, data.micro_batches, model=model)
    seconds = time.perf_counter() - start
    losses = result.losses
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    first, last = sum(head) / len(head), sum(tail) / len(tail)
    print(f"loss {first:.3f} (first 10% of steps) -> {last:.3f} (last 10%) in {seconds:.0f} s, "
          f"{result.tokens_per_second:,.0f} tokens/s; checkpoint in {args.out}")


def _answer_examples(model, tokenizer, count: int = 4) -> None:
    test = load_digits("test")
    for i in range(count):
        image, label = test.images[i], int(test.labels[i])
        prompts = [f"<image> question: {task.question} answer:" for task in QUESTIONS]
        answers = run_generate(model, tokenizer, prompts, [image] * len(QUESTIONS),
                               max_new_tokens=3)
        print(f"held-out digit {i} (label {label}):")
        lines = ascii_image(image)
        qa = [f"  Q: {t.question:<28} A: {a.strip():<8} (truth: {t.answer_for(label)})"
              for t, a in zip(QUESTIONS, answers, strict=True)]
        for row, text in zip(lines, qa + [""] * (len(lines) - len(qa)), strict=True):
            print(f"  {row}   {text}")


def _throughput() -> None:
    try:
        root = source_root()
    except FileNotFoundError as error:
        print(f"skipped: {error}")
        return
    subprocess.run([sys.executable, BENCHMARKS["end_to_end"], "--quick", "--no-write"],
                   cwd=root, check=False)


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    config = PRESETS[args.preset]
    if config.vision_layers == 0:
        raise ValueError(f"--preset {args.preset} has no vision encoder; the demo needs one")
    _section("data")
    tokenizer = load_tokenizer(config.vocab_size)
    documents = pydoc_documents("train")
    digits = load_digits("train"), load_digits("test")
    print(f"text: {len(documents)} documentation topics, {sum(map(len, documents)):,} characters;"
          f" BPE tokenizer of {tokenizer.vocab_size} tokens; digits: {len(digits[0].labels)} "
          f"train / {len(digits[1].labels)} held-out 8x8 scans")
    model = MetaLM(config)
    print(f"model: {args.preset} MetaLM, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {config.variant}, {config.tokens_per_image} tokens per image")

    _section(f"semi-causal pretraining ({args.steps} steps)")
    _pretrain(model, tokenizer, args)

    _section("digit VQA before finetuning (candidate ranking, held-out images)")
    results = run_eval(model, tokenizer, shots=(0, args.shots), encoder_demos=True,
                       limit=args.limit, seed=args.seed)
    print(format_table(results, "in-context learning"))

    _section(f"finetuning on digit VQA ({args.finetune_steps} steps)")
    finetune_on_vqa(model, tokenizer, args.finetune_steps, seed=args.seed, progress=False)
    results = run_eval(model, tokenizer, shots=(0,), limit=args.limit, seed=args.seed)
    print(format_table(results, "after finetuning"))

    _section("questions about held-out digits (greedy, paged KV cache)")
    _answer_examples(model.eval(), tokenizer)

    if not args.no_bench:
        _section("end-to-end throughput: fast path vs HF-style path")
        _throughput()
    return 0
