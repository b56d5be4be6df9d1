"""A byte-level BPE tokenizer trained on the embedded pydoc corpus, cached on disk.

Byte-level (GPT-2 style) BPE never meets an unknown character: the 256 byte
symbols are always in the vocabulary, so ``decode(encode(text)) == text`` for
any text. The four special tokens come first, with fixed ids::

    <pad> = 0    <bos> = 1    <eos> = 2    <image> = 3

They are never produced by ``encode``: a literal "<image>" in the text is
tokenised as ordinary characters, so text cannot forge an image placeholder.

``load_tokenizer`` trains on the corpus's train split at first use (quickly
and deterministically: the same vocab size gives the same file byte for byte)
and caches the result as ``<cache_dir>/tokenizer-bpe-<vocab_size>.json``. The
cache is written to a temporary file and moved into place with ``os.replace``,
so concurrent processes (torchrun ranks) never read a half-written file; if two
race, both write identical contents.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from metalm_fast.data.text_corpus import pydoc_documents

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "default_cache_dir", "load_tokenizer"]

#: Special tokens, in id order: pad, bos, eos, image placeholder.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")
#: The 256 byte symbols plus the special tokens: the smallest vocabulary.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
_IMAGE_TEXT = "<image>"


class Tokenizer:
    """Byte-level BPE tokenizer with MetaLM's special tokens (a thin wrapper).

    Attributes
    ----------
    vocab_size : int, every id produced lies in [0, vocab_size).
    pad_id, bos_id, eos_id, image_id : int, 0, 1, 2, 3.

    Example
    -------
    >>> tokenizer = load_tokenizer(300)
    >>> tokenizer.decode(tokenizer.encode("def f(): pass"))
    'def f(): pass'
    """

    def __init__(self, backend: tokenizers.Tokenizer):
        ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"backend must map {SPECIAL_TOKENS} to ids 0..3, got {ids}")
        # Treat special-token strings in the text as plain text (not serialised, so set here).
        backend.encode_special_tokens = True
        self._backend = backend
        self.vocab_size = backend.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, encoded in parallel."""
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of ``ids``: pad/bos/eos are dropped; each run of image placeholders
        becomes one ``"<image>"`` so a decoded prompt shows where an image went."""
        ids = [int(i) for i in ids]
        pieces: list[str] = []
        segment: list[int] = []
        for position, token in enumerate(ids):
            if token != self.image_id:
                segment.append(token)
            elif position == 0 or ids[position - 1] != self.image_id:
                pieces.append(self._backend.decode(segment, skip_special_tokens=True))
                pieces.append(_IMAGE_TEXT)
                segment = []
        pieces.append(self._backend.decode(segment, skip_special_tokens=True))
        return "".join(pieces)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer (tokenizers JSON) atomically to ``path``."""
        _write_atomic(Path(path), self._backend.to_str())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer written by :meth:`save`."""
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def default_cache_dir() -> Path:
    """$METALM_FAST_CACHE, or ~/.cache/metalm_fast."""
    configured = os.environ.get("METALM_FAST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "metalm_fast"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    )
    try:
        with handle:
            handle.write(text)
        os.chmod(handle.name, 0o644)  # a shared cache: mkstemp's 0600 would lock others out
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train byte-level BPE with exactly ``vocab_size`` tokens on the pydoc train split."""
    backend = tokenizers.Tokenizer(models.BPE())
    # No prefix space: encode(" " + word) and encode(word) stay distinct and exact.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(pydoc_documents("train"), trainer=trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is more than the pydoc corpus supports "
            f"({backend.get_vocab_size()} tokens); ask for a smaller vocab_size"
        )
    return Tokenizer(backend)


def load_tokenizer(vocab_size: int = 1024, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The pydoc BPE tokenizer of ``vocab_size`` tokens, trained at first use and cached.

    Parameters
    ----------
    vocab_size : exact vocabulary size, at least 260 (256 bytes + 4 special tokens)
        and at most what the corpus supports (about 9,000).
    cache_dir : where ``tokenizer-bpe-<vocab_size>.json`` lives; defaults to
        :func:`default_cache_dir`.

    Returns
    -------
    Tokenizer with ``tokenizer.vocab_size == vocab_size``.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
            f"special tokens), got {vocab_size!r}"
        )
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"tokenizer-bpe-{vocab_size}.json"
    if path.exists():
        cached = Tokenizer.from_file(path)
        if cached.vocab_size == vocab_size:
            return cached
        # a stale or foreign file under our name: retrain and replace it
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save(path)
    return tokenizer
