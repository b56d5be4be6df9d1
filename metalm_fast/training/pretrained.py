"""Training from pretrained parts: the model, its tokenizers, and where a run keeps them.

``metalm-fast train --decoder DIR [--text-encoder DIR] [--vision-encoder DIR]``
composes a MetaLM of transformers-format directories (metalm_fast.hf), tokenizes
the data with the decoder's tokenizer.json, and, when the text encoder has a
tokenizer of its own, feeds each span to it re-tokenized
(metalm_fast.data.encoder_spans). A run directory keeps copies of both tokenizers
(``tokenizer/`` and ``encoder_tokenizer/``) so that ``generate``, ``eval`` and
``export`` read the run with the tokenizers it was trained with.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from metalm_fast import hf
from metalm_fast.data.encoder_spans import SpanRetokenizer
from metalm_fast.data.tokenizer import Tokenizer, load_tokenizer
from metalm_fast.models.metalm import MetaLM

__all__ = [
    "DECODER_TOKENIZER",
    "ENCODER_TOKENIZER",
    "PretrainedRun",
    "load_pretrained",
    "run_tokenizer",
    "run_tokenizer_dir",
    "save_tokenizers",
]

#: Subdirectories of a run directory holding the tokenizers it was trained with.
DECODER_TOKENIZER = "tokenizer"
ENCODER_TOKENIZER = "encoder_tokenizer"
#: The files of a transformers tokenizer directory that are copied (those present).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
)


@dataclass
class PretrainedRun:
    """What a run from pretrained parts trains with.

    model : the composed MetaLM.
    tokenizer : the decoder's tokenizer (the data pipeline's).
    span_encoder : None when the text encoder reads the decoder's tokens (a shared
        vocabulary, or no text encoder), else the span re-tokenizer.
    tokenizer_dirs : {subdirectory name: source directory} to copy into the run.
    """

    model: MetaLM
    tokenizer: Tokenizer
    span_encoder: SpanRetokenizer | None
    tokenizer_dirs: dict[str, Path]


def _tokenizer_file(directory: Path, flag: str) -> Path:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise ValueError(
            f"{flag} {directory}: no tokenizer.json (save the model's fast tokenizer there: "
            "tokenizer.save_pretrained(DIR))"
        )
    return file


def _span_encoder(
    decoder_tokenizer: Tokenizer, decoder_dir: Path, encoder_dir: Path
) -> SpanRetokenizer | None:
    """None when both tokenizers have the same vocabulary (spans stay one to one)."""
    encoder = tokenizers.Tokenizer.from_file(str(_tokenizer_file(encoder_dir, "--text-encoder")))
    decoder = tokenizers.Tokenizer.from_file(str(_tokenizer_file(decoder_dir, "--decoder")))
    if encoder.get_vocab() == decoder.get_vocab():
        return None
    return SpanRetokenizer(decoder_tokenizer, encoder)


def load_pretrained(
    decoder: str,
    text_encoder: str | None = None,
    vision_encoder: str | None = None,
    **options,
) -> PretrainedRun:
    """The model (``hf.from_pretrained(decoder, text_encoder, vision_encoder, **options)``)
    and its tokenizers; ValueError naming the flag whose directory cannot serve."""
    decoder_dir = Path(decoder)
    tokenizer = Tokenizer.from_pretrained(_tokenizer_file(decoder_dir, "--decoder").parent)
    model = hf.from_pretrained(decoder, text_encoder, vision_encoder, **options)
    dirs = {DECODER_TOKENIZER: decoder_dir}
    span_encoder = None
    if text_encoder is not None:
        span_encoder = _span_encoder(tokenizer, decoder_dir, Path(text_encoder))
        if span_encoder is not None:
            dirs[ENCODER_TOKENIZER] = Path(text_encoder)
    if vision_encoder is not None and tokenizer.image_id is None:
        raise ValueError(
            f"--decoder {decoder}: its tokenizer has no pad or unk token to stand for "
            "image placeholders"
        )
    return PretrainedRun(model, tokenizer, span_encoder, dirs)


def save_tokenizers(out_dir: str | Path, run: PretrainedRun) -> None:
    """Copy the run's tokenizer files into ``out_dir``'s tokenizer subdirectories."""
    for name, source in run.tokenizer_dirs.items():
        target = Path(out_dir) / name
        target.mkdir(parents=True, exist_ok=True)
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copyfile(source / file, target / file)


def run_tokenizer_dir(checkpoint: str | Path) -> Path | None:
    """The ``tokenizer/`` copy (a pretrained decoder's) in the checkpoint's directory or one
    above it (a run holds step-N/ and finetuned checkpoints), or None (a native run)."""
    path = Path(checkpoint).resolve()
    for directory in (path, *list(path.parents)[:3]):
        if (directory / DECODER_TOKENIZER / "tokenizer.json").is_file():
            return directory / DECODER_TOKENIZER
    return None


def run_tokenizer(checkpoint: str | Path, vocab_size: int) -> Tokenizer:
    """The tokenizer a run trained with (:func:`run_tokenizer_dir`), else the pydoc
    tokenizer of ``vocab_size`` (a native model's)."""
    directory = run_tokenizer_dir(checkpoint)
    if directory is not None:
        return Tokenizer.from_pretrained(directory)
    return load_tokenizer(vocab_size)
