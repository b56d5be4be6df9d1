"""``metalm-fast train``: train a MetaLM preset, in one process or under torchrun.

Examples::

    metalm-fast train --preset tiny --steps 200 --out runs/tiny
    metalm-fast train --out runs/tiny --steps 400 --resume
    metalm-fast train --steps 50 --dtype bf16 --device cpu --out runs/bf16
    metalm-fast train --decoder llama-dir --text-encoder bert-dir --freeze-encoder-layers 10 \
        --out runs/pretrained
    torchrun --nproc-per-node 2 -m metalm_fast.training.command --parallel ddp --data synthetic

With ``--out``, the run directory holds the checkpoints, ``metrics.jsonl``
(one JSON object per step: step, loss, lr, tokens_per_second, tokens) and
``loss.png`` (:mod:`metalm_fast.training.metrics`). A directory that already
holds a run needs ``--resume`` (continue it) or ``--overwrite`` (replace it).

Ctrl-C (SIGINT) or SIGTERM stops after the current step with a checkpoint
there and exits with status 130 (SIGINT) or 143 (SIGTERM); ``--resume``
continues exactly where it stopped.

Data (``--data``): ``default`` is the embedded default corpus
(metalm_fast.data.default_data), ``vqa`` its visual question answering
stream, ``synthetic`` a seeded stream of documents with a learnable rule
(below) that needs no corpus: tests and smoke runs use it. Not every preset
reads every stream (:func:`data_problem`): the digit images need a vision
encoder of their shape, and text spans need a text encoder or the single stack.

Pretrained parts (``--decoder``, ``--text-encoder``, ``--vision-encoder``: directories
in the format transformers' ``save_pretrained`` writes) replace ``--preset``: the
model is composed by metalm_fast.hf with fresh connectors
(metalm_fast.training.pretrained), the data is tokenized with the decoder's
tokenizer.json, and a pretrained vision encoder reads the digits through its own
preprocessing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from metalm_fast.commands._options import add_runtime_options, runtime_device
from metalm_fast.data.collator import SemiCausalBatch, SemiCausalCollator
from metalm_fast.models.metalm import PRESETS, MetaLMConfig
from metalm_fast.training.pretrained import PretrainedRun, load_pretrained, save_tokenizers
from metalm_fast.training.trainer import (
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    claim_out_dir,
    train,
)

__all__ = ["DATA_KINDS", "build_parser", "data_problem", "main", "synthetic_micro_batches"]

#: --data choices: the embedded default mixture, its VQA stream, synthetic documents
DATA_KINDS = ("default", "vqa", "synthetic")

#: Synthetic documents: the next token is successor[token] with this probability, else uniform.
SYNTHETIC_FOLLOW_PROBABILITY = 0.8


def _synthetic_document(rng: random.Random, successor: list[int], length: int) -> list[int]:
    vocab_size = len(successor)
    tokens = [rng.randrange(vocab_size)]
    while len(tokens) < length:
        follows = rng.random() < SYNTHETIC_FOLLOW_PROBABILITY
        tokens.append(successor[tokens[-1]] if follows else rng.randrange(vocab_size))
    return tokens


def synthetic_micro_batches(
    vocab_size: int, token_budget: int, *, seed: int = 0, span_min: int = 8, span_max: int = 16
) -> Iterator[SemiCausalBatch]:
    """An endless, seeded stream of packed micro-batches of ``token_budget`` tokens.

    Each document (16-128 tokens) follows a fixed random permutation of the
    vocabulary: after token ``x`` comes ``successor[x]`` with probability
    ``SYNTHETIC_FOLLOW_PROBABILITY``, else a uniform token. The best possible
    loss is about ``-(p ln p + (1-p) ln((1-p)/V))`` (~1.9 nats for p = 0.8,
    V = 512) against ``ln V`` (~6.2) for a model that has learnt nothing.
    Spans of ``span_min``..``span_max`` tokens (smaller than MetaLM's 64-128,
    so short documents get spans) go to the encoder.

    The same arguments always give the same stream.
    """
    if token_budget < 2:
        raise ValueError(f"token_budget must be >= 2, got {token_budget}")
    rng = random.Random(seed)
    successor = list(range(vocab_size))
    rng.shuffle(successor)
    collator = SemiCausalCollator(span_min=span_min, span_max=span_max, fraction=0.25, seed=seed)
    while True:
        documents: list[list[int]] = []
        used = 0
        while token_budget - used >= 2:
            length = min(rng.randint(16, 128), token_budget - used)
            documents.append(_synthetic_document(rng, successor, length))
            used += length
        yield collator(documents)


def data_problem(config: MetaLMConfig, kind: str) -> str | None:
    """Why a model of ``config`` cannot train on ``--data kind``; None when it can.

    ``default`` and ``vqa`` show the embedded 8x8 digit scans, which need a
    vision encoder of that image shape; ``default`` and ``synthetic`` put text
    spans in the encoder, which needs a text encoder (or ``variant="single_stack"``).

    >>> from metalm_fast.models.metalm import PRESETS
    >>> data_problem(PRESETS["tiny"], "default") is None
    True
    >>> data_problem(PRESETS["small"], "vqa")
    'it has no vision encoder (vision_layers=0) and --data vqa shows digit images'
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"data must be one of {DATA_KINDS}, got {kind!r}")
    if kind in ("default", "vqa"):
        if config.vision_layers == 0:
            return (
                f"it has no vision encoder (vision_layers=0) and --data {kind} shows digit images"
            )
        if config.vision_encoder is not None:  # a pretrained one preprocesses any image
            return _span_problem(config, kind)
        from metalm_fast.data.digits import load_digits

        digit_shape = tuple(load_digits("test").images.shape[1:])
        shape = (config.image_channels, config.image_size, config.image_size)
        if shape != digit_shape:
            return f"its vision encoder reads images {shape}, the digits are {digit_shape}"
    return _span_problem(config, kind)


def _span_problem(config: MetaLMConfig, kind: str) -> str | None:
    if (
        kind in ("default", "synthetic")
        and config.encoder_layers == 0
        and config.variant == "two_stack"
    ):
        return (
            f"it has no text encoder (encoder_layers=0) and --data {kind} has text spans "
            f"(--variant single_stack reads them in the decoder)"
        )
    return None


def _data_source(
    kind: str,
    config: MetaLMConfig,
    token_budget: int,
    seed: int,
    pretrained: PretrainedRun | None = None,
) -> Callable[[], Iterator[SemiCausalBatch]]:
    """A factory of fresh, identical streams (each call restarts from the seed).
    ``pretrained``: the decoder's tokenizer, and the spans' re-tokenizer if any."""
    if kind == "synthetic":
        if pretrained is not None and pretrained.span_encoder is not None:
            raise ValueError(
                "--data synthetic has no text for a text encoder with its own tokenizer "
                "to read; use --data default"
            )
        return lambda: synthetic_micro_batches(config.vocab_size, token_budget, seed=seed)
    try:
        from metalm_fast.data.default_data import DefaultData
        from metalm_fast.data.tokenizer import load_tokenizer
    except ImportError as error:
        raise ValueError(
            f"--data {kind} needs metalm_fast.data.default_data ({error}); use --data synthetic"
        ) from error

    def stream() -> Iterator[SemiCausalBatch]:
        tokenizer = (
            load_tokenizer(config.vocab_size) if pretrained is None else pretrained.tokenizer
        )
        data = DefaultData(
            tokenizer,
            config.tokens_per_image,
            token_budget=token_budget,
            seed=seed,
            span_encoder=None if pretrained is None else pretrained.span_encoder,
        )
        return data.vqa_micro_batches() if kind == "vqa" else data.micro_batches()

    return stream


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` command's options."""
    parser = argparse.ArgumentParser(
        prog="metalm-fast train",
        description="Train a MetaLM (one process or torchrun).",
        epilog="Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint "
        "there (with --out) and exits with status 130 (SIGINT) or 143 (SIGTERM); "
        "--resume continues from it. Under torchrun a signal to any rank stops them all "
        "after the same step.",
    )
    add = parser.add_argument
    add(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="model size (default tiny; --data default/vqa need a preset reading 8x8 digit "
        "images, which is tiny); not with --decoder",
    )
    add(
        "--decoder",
        default=None,
        metavar="DIR",
        help="a pretrained causal LM (Llama/Mistral, Qwen2, GPT-NeoX, GPT-2; save_pretrained's "
        "format) as the decoder, instead of --preset; its tokenizer.json tokenizes the data",
    )
    add("--text-encoder", default=None, metavar="DIR", help="a pretrained BERT/RoBERTa/ELECTRA")
    add("--vision-encoder", default=None, metavar="DIR", help="a pretrained ViT/CLIP/SigLIP")
    add(
        "--freeze-encoder-layers",
        type=int,
        default=0,
        metavar="N",
        help="freeze the text encoder's embeddings and N lowest layers (the paper trains the "
        "last two)",
    )
    add(
        "--freeze-vision-layers",
        type=int,
        default=0,
        metavar="N",
        help="freeze the vision encoder's embeddings and N lowest layers",
    )
    add("--freeze-decoder", action="store_true", help="freeze the pretrained decoder")
    add(
        "--variant",
        default=None,
        choices=["two_stack", "single_stack"],
        help="encoder + connector + decoder, or one semi-causal stack (default: the preset's)",
    )
    add("--steps", type=int, default=200, help="optimizer steps in total (default 200)")
    add("--grad-accum", type=int, default=1, help="micro-batches per rank per step")
    add("--micro-batch-tokens", type=int, default=2048, help="decoder tokens per micro-batch")
    add("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    add("--warmup-steps", type=int, default=10, help="linear warmup steps (default 10)")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    add("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    add("--seed", type=int, default=0, help="model initialisation and data seed")
    add(
        "--out",
        default=None,
        help="run directory: checkpoints, metrics.jsonl, loss.png (default: none written)",
    )
    add(
        "--save-every",
        type=int,
        default=100,
        help="checkpoint every N steps, besides the end and a stop by a signal "
        "(default 100; 0: only those)",
    )
    add(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="keep the newest N checkpoints in --out (default 3; 0: keep all)",
    )
    add("--resume", action="store_true", help="continue from --out's latest checkpoint")
    add(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its checkpoints and metrics are deleted); "
        "without it or --resume such a directory is refused",
    )
    add(
        "--parallel",
        default="none",
        choices=["none", "ddp", "fsdp"],
        help="under torchrun: DistributedDataParallel or FSDP2 fully_shard",
    )
    add("--no-progress", action="store_true", help="print a line every --log-every steps")
    add("--log-every", type=int, default=10, help="steps between lines with --no-progress")
    add(
        "--data",
        default="default",
        choices=DATA_KINDS,
        help="default: embedded text + captioned digits; vqa: digit questions; synthetic: "
        "seeded documents with a learnable rule, no corpus (default default)",
    )
    add(
        "--metrics-json",
        default=None,
        help="also write a summary JSON here: all losses, tokens, tokens/s, checkpoint (rank 0)",
    )
    add_runtime_options(parser)
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        parallel=args.parallel,
        out_dir=args.out,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        overwrite=args.overwrite,
        log_every=args.log_every,
        progress=not args.no_progress,
    )


def _finish(result: TrainResult, args: argparse.Namespace) -> None:
    """Rank 0: the summary lines and the metrics file."""
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a (no step ran)"
    print(f"step {result.step}: final loss {final}, {result.tokens_per_second:,.0f} tokens/s")
    print(f"checkpoint: {_checkpoint_line(result, args)}")
    if result.metrics is not None:
        plot = f", {result.loss_plot}" if result.loss_plot is not None else ""
        print(f"metrics: {result.metrics}{plot}")
    if args.metrics_json:
        metrics = {
            "losses": result.losses,
            "tokens": result.tokens,
            "step": result.step,
            "tokens_per_second": result.tokens_per_second,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }
        Path(args.metrics_json).write_text(json.dumps(metrics, indent=2) + "\n")


def _checkpoint_line(result: TrainResult, args: argparse.Namespace) -> str:
    if args.out is None:
        return "none (no --out)"
    if result.checkpoint is None:
        return f"none in {args.out} (no step ran)"
    if not result.losses:
        return f"{result.checkpoint} (already there; no step ran)"
    return str(result.checkpoint)


def _pretrained(args: argparse.Namespace) -> PretrainedRun | None:
    """The model and tokenizers of --decoder / --text-encoder / --vision-encoder, or None."""
    parts = (args.text_encoder, args.vision_encoder)
    if args.decoder is None:
        if any(part is not None for part in parts) or args.freeze_decoder:
            raise ValueError("--text-encoder, --vision-encoder and --freeze-* need --decoder")
        return None
    if args.preset is not None:
        raise ValueError("--preset and --decoder exclude each other: the decoder fixes the sizes")
    return load_pretrained(
        args.decoder,
        args.text_encoder,
        args.vision_encoder,
        freeze_encoder_layers=args.freeze_encoder_layers,
        freeze_vision_layers=args.freeze_vision_layers,
        freeze_decoder=args.freeze_decoder,
        variant=args.variant or "two_stack",
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``metalm-fast train`` with ``argv`` (without the command name); 0 on success.

    Bad values (and ``--parallel`` outside torchrun, ``--resume`` without a
    checkpoint or with a damaged one or one of another model, an ``--out``
    holding a run without ``--resume``/``--overwrite``) print
    ``metalm-fast train: error: ...`` and return 2. A SIGINT or SIGTERM returns
    130 or 143 after saving the step it stopped at.
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        train_config = _train_config(args)
        if args.micro_batch_tokens < 2:
            raise ValueError(f"--micro-batch-tokens must be >= 2, got {args.micro_batch_tokens}")
        pretrained = _pretrained(args)
        if pretrained is None:
            model_config = PRESETS[args.preset or "tiny"]
            if args.variant is not None:
                model_config = dataclasses.replace(model_config, variant=args.variant)
        else:
            model_config = pretrained.model.config
        problem = data_problem(model_config, args.data)
        if problem is not None:
            model_name = f"--preset {args.preset or 'tiny'}" if pretrained is None else "the model"
            raise ValueError(f"{model_name} cannot train on --data {args.data}: {problem}")
        runtime_device(args)  # a clear error naming --device before any work
        data = _data_source(args.data, model_config, args.micro_batch_tokens, args.seed, pretrained)
        if pretrained is not None and args.out is not None and not args.resume:
            # Claimed first: a run already there is refused (or, with --overwrite, cleared)
            # before its tokenizer copies are replaced.
            is_main = int(os.environ.get("RANK", "0")) == 0
            claim_out_dir(train_config, is_main)
            if is_main:
                save_tokenizers(args.out, pretrained)
        model = None if pretrained is None else pretrained.model
        result = train(model_config, train_config, data, model=model)
    except (ValueError, FileNotFoundError) as error:  # CheckpointError is a ValueError
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            again = " (continue with --resume)" if stopped.checkpoint is not None else ""
            print(f"{parser.prog}: {stopped}{again}", file=sys.stderr)
        return stopped.exit_status
    if int(os.environ.get("RANK", "0")) == 0:
        _finish(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
