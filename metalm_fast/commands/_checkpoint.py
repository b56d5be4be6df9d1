"""``--checkpoint``, as ``generate`` and ``eval`` read it.

A module of its own (not :mod:`metalm_fast.commands._options`): the train
command imports ``_options``, and ``training.checkpoint`` must not come back
into training through it.
"""

from __future__ import annotations

from metalm_fast.models.metalm import MetaLM
from metalm_fast.training.checkpoint import load_model

__all__ = ["checkpoint_model"]


def checkpoint_model(path: str) -> MetaLM:
    """The model ``--checkpoint path`` holds, in eval mode; ValueError naming
    ``--checkpoint`` when there is none or it cannot be read (missing, damaged,
    written for another format).

    load_model's errors already name the file at fault; the flag in front tells
    the reader which of their arguments led there.
    """
    try:
        return load_model(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"--checkpoint {path}: {error}") from error
