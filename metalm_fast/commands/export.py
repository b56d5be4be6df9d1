"""``metalm-fast export``: a trained run out to transformers (and so to vLLM).

Examples::

    metalm-fast export --checkpoint runs/pretrained --hf-out exported/llama
    metalm-fast export --checkpoint runs/demo --metalm-out exported/metalm

``--hf-out`` writes the decoder as a transformers causal-LM directory of its
family (a decoder loaded from Llama, Qwen2, GPT-NeoX or GPT-2 goes back to its
own; a native decoder is written as GPT-NeoX), with the tokenizer the run
trained with, so ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` read it; ``--verify`` loads it back with
transformers and compares the logits. The encoders and connectors have no
transformers counterpart: ``--metalm-out`` writes the whole MetaLM (safetensors
plus its config), which ``metalm_fast.hf.load_metalm`` rebuilds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from metalm_fast import hf
from metalm_fast.commands._checkpoint import checkpoint_model
from metalm_fast.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from metalm_fast.hf.export import verify_export
from metalm_fast.models.metalm import MetaLM
from metalm_fast.training.pretrained import run_tokenizer_dir

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="the run to export: a run directory (its latest step) or a step-N directory",
    )
    parser.add_argument(
        "--hf-out",
        default=None,
        metavar="DIR",
        help="write the decoder here as a transformers model directory, with its tokenizer",
    )
    parser.add_argument(
        "--metalm-out",
        default=None,
        metavar="DIR",
        help="write the whole MetaLM (encoders and connectors included) here",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="with --hf-out: load the export with transformers and compare its logits",
    )


def _write_native_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """The pydoc tokenizer as a transformers fast-tokenizer directory."""
    tokenizer.save(directory / "tokenizer.json")
    pad, bos, eos, _ = SPECIAL_TOKENS
    settings = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _export_decoder(model: MetaLM, args: argparse.Namespace) -> Path:
    decoder = model.decoder_only()
    pretrained = run_tokenizer_dir(args.checkpoint)
    if pretrained is not None:
        return hf.export_decoder(decoder, args.hf_out, tokenizer=pretrained)
    with tempfile.TemporaryDirectory() as scratch:
        _write_native_tokenizer(load_tokenizer(model.config.vocab_size), Path(scratch))
        return hf.export_decoder(decoder, args.hf_out, tokenizer=scratch)


def main(args: argparse.Namespace) -> int:
    if args.hf_out is None and args.metalm_out is None:
        raise ValueError("give --hf-out DIR, --metalm-out DIR or both")
    if args.verify and args.hf_out is None:
        raise ValueError("--verify checks an --hf-out export; give --hf-out DIR")
    model = checkpoint_model(args.checkpoint)
    if args.hf_out is not None:
        print(f"decoder: {_export_decoder(model, args)}")
        if args.verify:  # export_decoder raised if transformers' logits disagreed
            error = verify_export(model.decoder_only(), args.hf_out)
            print(f"verified: transformers' logits within {error:.2g} of the MetaLM's")
    if args.metalm_out is not None:
        print(f"metalm: {hf.export_metalm(model, args.metalm_out)}")
    return 0
