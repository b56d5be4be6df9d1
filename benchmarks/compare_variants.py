"""Two-stack vs single-stack MetaLM on the same semi-causal batches.

The two designs of the paper's objective, trained from the same seed on the
same stream of the embedded default data (Python documentation topics and
captioned digits, spans of 64..128 tokens over ~25 % of each text document):

- ``two_stack``: a bidirectional text encoder reads the spans, a connector
  scatters its rows into the causal decoder's input;
- ``single_stack``: one transformer reads every token with
  SpanMask.semi_causal (bidirectional inside spans, causal elsewhere).

Both score exactly the same positions (the collator's loss rule), so their
losses compare directly. Prints the mean training loss per window of steps
and the final held-out loss on the validation split, and writes the table to
benchmarks/results/cpu_compare_variants_<date>.md with its .png chart
(``--no-write`` skips both).

Usage: python benchmarks/compare_variants.py [--steps 600] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Panel, machine_lines, write_result  # noqa: E402
from metalm_fast.data.default_data import DefaultData  # noqa: E402
from metalm_fast.data.tokenizer import load_tokenizer  # noqa: E402
from metalm_fast.models.metalm import PRESETS  # noqa: E402
from metalm_fast.training.trainer import TrainConfig, train  # noqa: E402

VARIANTS = ("two_stack", "single_stack")


@torch.no_grad()
def held_out_loss(model, data: DefaultData, batches: int) -> float:
    """Mean loss over the scored positions of the first ``batches`` validation micro-batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in itertools.islice(data.micro_batches(), batches):
        total += float(model(batch, reduction="sum"))
        count += int(batch.loss_mask.sum())
    model.train()
    return total / max(count, 1)


def run(steps: int, token_budget: int, seed: int, windows: int) -> dict[str, dict]:
    results = {}
    for variant in VARIANTS:
        config = dataclasses.replace(PRESETS["tiny"], variant=variant)
        tokenizer = load_tokenizer(config.vocab_size)
        data = DefaultData(tokenizer, config.tokens_per_image, token_budget=token_budget, seed=seed)
        torch.manual_seed(seed)
        train_config = TrainConfig(
            steps=steps,
            lr=2e-3,
            warmup_steps=max(1, steps // 20),
            seed=seed,
            progress=False,
            log_every=max(1, steps // 4),
        )
        result = train(config, train_config, data.micro_batches)
        validation = DefaultData(
            tokenizer,
            config.tokens_per_image,
            token_budget=token_budget,
            seed=seed,
            text_split="validation",
            digits_split="test",
        )
        width = max(1, steps // windows)
        curve = [
            sum(result.losses[i : i + width]) / len(result.losses[i : i + width])
            for i in range(0, steps, width)
        ]
        results[variant] = {
            "parameters": sum(p.numel() for p in result.model.parameters()),
            "curve": curve,
            "width": width,
            "held_out": held_out_loss(result.model, validation, batches=8),
            "tokens_per_second": result.tokens_per_second,
        }
    return results


def render(results: dict[str, dict], steps: int, token_budget: int, seed: int) -> str:
    width = results[VARIANTS[0]]["width"]
    windows = len(results[VARIANTS[0]]["curve"])
    header = (
        "| variant | parameters | "
        + " | ".join(f"steps {i * width + 1}-{min((i + 1) * width, steps)}" for i in range(windows))
        + " | held-out loss | tokens/s |"
    )
    lines = [header, "|" + "---|" * (windows + 4)]
    for variant, r in results.items():
        curve = " | ".join(f"{loss:.3f}" for loss in r["curve"])
        lines.append(
            f"| {variant} | {r['parameters']:,} | {curve} | {r['held_out']:.3f} | "
            f"{r['tokens_per_second']:,.0f} |"
        )
    note = (
        f"tiny preset, seed {seed}, {steps} steps of {token_budget}-token micro-batches of the "
        "embedded default data (same stream for both); mean training loss per window; "
        "held-out: 8 validation micro-batches (validation topics, held-out digits); "
        f"tokens/s on a shared machine (load average {os.getloadavg()[0]:.1f} at the end), "
        "so compare losses, not speed"
    )
    return "\n".join(lines) + "\n\n" + note


def chart(results: dict[str, dict], steps: int) -> list[Panel]:
    """The loss curve per window and the held-out loss, both variants side by side (no
    ratios: neither is the baseline), and tokens/s (single-stack against two-stack)."""
    width = results[VARIANTS[0]]["width"]
    windows = [
        f"{i * width + 1}-{min((i + 1) * width, steps)}"
        for i in range(len(results[VARIANTS[0]]["curve"]))
    ]
    return [
        Panel(
            "mean training loss per window of steps",
            "loss (nats per scored token)",
            windows,
            {variant: results[variant]["curve"] for variant in VARIANTS},
        ),
        Panel(
            "held-out loss",
            "loss (nats per scored token)",
            ["validation"],
            {variant: [results[variant]["held_out"]] for variant in VARIANTS},
        ),
        Panel(
            "training throughput (shared machine)",
            "tokens/s",
            ["tiny preset"],
            {variant: [results[variant]["tokens_per_second"]] for variant in VARIANTS},
            ours="two_stack",
            lower_is_better=False,
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument(
        "--no-write", action="store_true", help="only print the table (no markdown, no chart)"
    )
    args = parser.parse_args(argv)
    results = run(args.steps, args.token_budget, args.seed, args.windows)
    table = render(results, args.steps, args.token_budget, args.seed)
    print(table)
    if not args.no_write:
        date = datetime.date.today().isoformat()
        write_result(
            f"cpu_compare_variants_{date}",
            f"Two-stack vs single-stack MetaLM ({date})",
            f"{machine_lines()}\n\n{table}",
            f"python benchmarks/compare_variants.py --steps {args.steps}",
            chart=chart(results, args.steps),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
