"""Two-stack MetaLM vs single-stack vs decoder-only on the embedded language tasks.

The paper's comparison (Hao et al. 2022, section 4: MetaLM against a GPT of
the same size), at CPU scale. Three designs of the tiny preset, text only (no
vision encoder: the decoder-only model has none, and all three read the same
text), trained from the same seed on the same data for the same steps:

- ``two_stack``: a bidirectional text encoder reads the spans (and, in the
  tasks, the passages), a connector scatters its rows into the causal decoder;
- ``single_stack``: one transformer, bidirectional inside the spans
  (SpanMask.semi_causal), causal elsewhere;
- ``decoder_only``: the decoder alone (encoder_layers=0), reading every token
  causally. Its pretraining batches are the same micro-batches with the spans
  removed and the *same* positions scored, so the three losses compare.

Each is pretrained semi-causally on the pydoc train documents, evaluated on
the held-out language tasks (metalm_fast.evaluation.language) zero-shot and
k-shot (demonstrations read by the decoder, and for the two-stack model by its
encoder), multitask-finetuned on the four tasks' training splits mixed, and
evaluated zero-shot again. Prints the three-design table (each task: zero-shot,
k-shot, finetuned, chance) and writes it to
benchmarks/results/cpu_language_designs_<date>.md with its .png chart
(``--no-write`` skips both).

Usage: python benchmarks/compare_language_designs.py [--steps 4000] [--finetune-steps 1200]
       [--designs two_stack ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Panel, machine_lines, write_result  # noqa: E402
from metalm_fast.commands.evaluate import finetune_on_language, run_language  # noqa: E402
from metalm_fast.data.collator import build_batch  # noqa: E402
from metalm_fast.data.default_data import DefaultData  # noqa: E402
from metalm_fast.data.tokenizer import load_tokenizer  # noqa: E402
from metalm_fast.evaluation.language import LANGUAGE_TASKS, TASKS  # noqa: E402
from metalm_fast.models.metalm import PRESETS, MetaLM  # noqa: E402
from metalm_fast.training.trainer import TrainConfig, train  # noqa: E402

#: design -> its changes to the tiny preset (text only)
DESIGNS = {
    "two_stack": {},
    "single_stack": {"variant": "single_stack"},
    "decoder_only": {"encoder_layers": 0},
}
#: a classification task passes when its finetuned accuracy is at least this times chance
TARGET = 2.0


def design_config(design: str):
    return dataclasses.replace(PRESETS["tiny"], vision_layers=0, **DESIGNS[design])


def without_spans(batch):
    """``batch`` with its spans read as plain tokens, the same positions scored."""
    bounds = batch.cu_seqlens.tolist()
    ids = batch.input_ids.tolist()
    plain = build_batch([ids[a:b] for a, b in zip(bounds, bounds[1:])], [], [])
    plain.labels = batch.labels.clone()
    return plain


def pretraining_stream(data: DefaultData, spans: bool):
    def micro_batches():
        for batch in data.micro_batches():
            yield batch if spans else without_spans(batch)

    return micro_batches


def run_design(design: str, args) -> dict:
    config = design_config(design)
    tokenizer = load_tokenizer(config.vocab_size)
    data = DefaultData(
        tokenizer,
        config.tokens_per_image,
        token_budget=args.token_budget,
        image_fraction=0.0,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    model = MetaLM(config)
    started = time.perf_counter()
    pretrain = train(
        config,
        TrainConfig(
            steps=args.steps,
            lr=2e-3,
            warmup_steps=max(1, args.steps // 20),
            seed=args.seed,
            progress=False,
            log_every=max(1, args.steps // 2),
        ),
        pretraining_stream(data, spans=design != "decoder_only"),
        model=model,
    )
    options = dict(limit=args.limit, seed=args.seed)
    with torch.no_grad():
        before = run_language(
            model, tokenizer, shots=(0, args.shots), encoder_demos=True, **options
        )
    finetune = finetune_on_language(
        model,
        tokenizer,
        args.finetune_steps,
        seed=args.seed,
        lr=args.finetune_lr,
        token_budget=args.token_budget,
        progress=False,
    )
    with torch.no_grad():
        after = run_language(model, tokenizer, shots=(0,), **options)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_loss": sum(pretrain.losses[-10:]) / len(pretrain.losses[-10:]),
        "finetune_loss": sum(finetune.losses[-10:]) / len(finetune.losses[-10:]),
        "before": before,
        "after": after,
        "seconds": time.perf_counter() - started,
    }


def _cell(results, task: str, shots: int, encoder: bool) -> str:
    for r in results:
        if r.task == task and r.shots == shots and r.encoder_demos == encoder:
            return r.accuracy_text()
    return "-"


def _verdict(result) -> str:
    if TASKS[result.task].generative:
        return "(exact match)"
    ratio = result.accuracy / result.chance
    return f"{ratio:.2f}x {'ok' if ratio >= TARGET else 'MISSED'}"


def render(results: dict[str, dict], args) -> str:
    k = args.shots
    lines = [
        f"| task | chance | design | zero-shot | {k}-shot, decoder | {k}-shot, encoder | "
        "finetuned | finetuned / chance | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in LANGUAGE_TASKS:
        for design, r in results.items():
            (tuned,) = [x for x in r["after"] if x.task == task]
            lines.append(
                f"| {task} | {tuned.chance:.1%} | {design} | {_cell(r['before'], task, 0, False)} "
                f"| {_cell(r['before'], task, k, False)} | {_cell(r['before'], task, k, True)} "
                f"| {tuned.accuracy_text()} | {_verdict(tuned)} | {tuned.total} |"
            )
    lines += [
        "",
        "| design | parameters | pretraining loss (last 10 steps) | finetuning loss "
        "(answer tokens, last 10) | seconds |",
        "|---|---|---|---|---|",
    ]
    for design, r in results.items():
        lines.append(
            f"| {design} | {r['parameters']:,} | {r['pretrain_loss']:.3f} | "
            f"{r['finetune_loss']:.3f} | {r['seconds']:.0f} |"
        )
    bars = ", ".join(
        f"{task} {TARGET * TASKS[task].chance:.0%}"
        for task in LANGUAGE_TASKS
        if not TASKS[task].generative
    )
    note = (
        f"tiny preset without vision encoder, seed {args.seed}: {args.steps} semi-causal "
        f"pretraining steps of {args.token_budget}-token micro-batches (pydoc train documents; "
        f"the same stream for every design), then {args.finetune_steps} multitask finetuning "
        f"steps (lr {args.finetune_lr}) on the four tasks' training splits mixed. Held-out "
        "questions come from the pydoc validation documents (never seen in pretraining nor "
        "finetuning). finetuned = zero-shot after finetuning; a classification task passes at "
        f"{TARGET:g}x chance ({bars}). Candidates are scored by their mean token "
        "log-likelihood (topic, cloze) or by their PMI with the passage, the log-likelihood "
        "after the prompt less the one after the question alone (continuation). "
        "Passages are read by the non-causal part of the model where it has one (encoder "
        "spans, or the single stack's bidirectional spans), causally by the decoder-only "
        f"model. Load average {os.getloadavg()[0]:.1f} at the end (a shared machine)."
    )
    return "\n".join(lines) + "\n\n" + note


def chart(results: dict[str, dict]) -> list[Panel]:
    def accuracies(key: str, design: str) -> list[float]:
        by_task = {r.task: r.accuracy for r in results[design][key] if r.shots == 0}
        return [by_task[task] for task in LANGUAGE_TASKS]

    chance = [TASKS[task].chance for task in LANGUAGE_TASKS]
    return [
        Panel(
            title,
            "held-out accuracy",
            list(LANGUAGE_TASKS),
            {**{d: accuracies(key, d) for d in results}, "chance": chance},
            lower_is_better=False,
        )
        for title, key in (("zero-shot, pretrained", "before"), ("multitask finetuned", "after"))
    ]


def result_name(designs: list[str], date: str) -> tuple[str, str]:
    """(file stem, title) of a run's results: a run of some designs only has its own file,
    so it never overwrites the three-design table of the same date.

    >>> result_name(["two_stack"], "2026-12-02")[0]
    'cpu_language_designs_two_stack_2026-12-02'
    """
    if designs == list(DESIGNS):
        return (
            f"cpu_language_designs_{date}",
            f"Two-stack vs single-stack vs decoder-only on the language tasks ({date})",
        )
    return (
        f"cpu_language_designs_{'_'.join(designs)}_{date}",
        f"{', '.join(designs)} on the language tasks ({date})",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=4000,
        help="pretraining steps (400 left continuation near chance)",
    )
    parser.add_argument("--finetune-steps", type=int, default=1200)
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="held-out questions per task")
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--designs",
        nargs="+",
        choices=tuple(DESIGNS),
        default=list(DESIGNS),
        help="the designs to train and compare (default: all three)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="only print the table (no markdown, no chart)"
    )
    args = parser.parse_args(argv)
    args.designs = list(dict.fromkeys(args.designs))  # each design once, in the order given
    results = {design: run_design(design, args) for design in args.designs}
    table = render(results, args)
    print(table)
    if not args.no_write:
        name, title = result_name(args.designs, datetime.date.today().isoformat())
        write_result(
            name,
            title,
            f"{machine_lines()}\n\n{table}",
            "python benchmarks/compare_language_designs.py "
            f"--steps {args.steps} --finetune-steps {args.finetune_steps}"
            + ("" if args.designs == list(DESIGNS) else f" --designs {' '.join(args.designs)}"),
            chart=chart(results),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
