"""A byte-level BPE tokenizer trained on the embedded pydoc corpus, cached on disk.

Byte-level (GPT-2 style) BPE never meets an unknown character: the 256 byte
symbols are always in the vocabulary, so ``decode(encode(text)) == text`` for
any text. The four special tokens come first, with fixed ids::

    <pad> = 0    <bos> = 1    <eos> = 2    <image> = 3

They are never produced by ``encode``: a literal "<image>" in the text is
tokenised as ordinary characters, so text cannot forge an image placeholder.

``load_tokenizer`` trains on the corpus's train split at first use (quickly
and deterministically: the same vocab size gives the same file byte for byte)
and caches the result as ``<cache_dir>/tokenizer-bpe-<vocab_size>-<corpus>.json``,
``<corpus>`` the first 12 hex digits of the train split's sha256 (a changed corpus
trains a new tokenizer instead of reading one trained on the old text). The
cache is written to a temporary file and moved into place with ``os.replace``,
so concurrent processes (torchrun ranks) never read a half-written file; if two
race, both write identical contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from metalm_fast.data.text_corpus import pydoc_documents

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "cache_name", "default_cache_dir", "load_tokenizer"]

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

    def __init__(self, backend: tokenizers.Tokenizer, special_ids: dict[str, int] | None = None):
        if special_ids is None:  # ours: the special tokens come first
            ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
            if ids != list(range(len(SPECIAL_TOKENS))):
                raise ValueError(f"backend must map {SPECIAL_TOKENS} to ids 0..3, got {ids}")
            special_ids = dict(zip(("pad", "bos", "eos", "image"), ids, strict=True))
        # Treat special-token strings in the text as plain text (not serialised, so set here).
        backend.encode_special_tokens = True
        self._backend = backend
        self.vocab_size = backend.get_vocab_size()
        self.pad_id, self.bos_id = special_ids.get("pad"), special_ids["bos"]
        self.eos_id, self.image_id = special_ids["eos"], special_ids.get("image")

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
        if self.image_id is None:
            return self._backend.decode(ids, skip_special_tokens=True)
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

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, image_token: str | None = None) -> Tokenizer:
        """A pretrained model's tokenizer: ``path``'s tokenizer.json (the tokenizers
        format transformers' fast tokenizers save), with its special tokens.

        bos, eos and pad come from tokenizer_config.json (their strings) or config.json
        (their ids). A tokenizer without a bos token (Qwen2) starts documents with eos,
        the separator it was trained with. The image placeholder is ``image_token``, or
        else the pad token when it is neither bos nor eos, or else the unk token; with
        none of these ``image_id`` is None and image data is refused where it is built.
        """
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json (the tokenizers package's format)")
        backend = tokenizers.Tokenizer.from_file(str(file))
        return cls(backend, _pretrained_special_ids(directory, backend, image_token))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_string(value) -> str | None:
    """A tokenizer_config.json special token: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _pretrained_special_ids(
    directory: Path, backend: tokenizers.Tokenizer, image_token: str | None
) -> dict[str, int]:
    settings = _read_json(directory / "tokenizer_config.json")
    config = _read_json(directory / "config.json")
    ids: dict[str, int] = {}
    for name in ("bos", "eos", "pad", "unk"):
        text = _token_string(settings.get(f"{name}_token"))
        token_id = backend.token_to_id(text) if text else None
        if token_id is None and isinstance(config.get(f"{name}_token_id"), int):
            token_id = config[f"{name}_token_id"]
            if isinstance(token_id, bool) or not 0 <= token_id < backend.get_vocab_size():
                raise ValueError(
                    f"{directory / 'config.json'}: {name}_token_id {token_id!r} is not an id "
                    f"of the tokenizer's {backend.get_vocab_size()} tokens"
                )
        if token_id is not None:
            ids[name] = token_id
    if "eos" not in ids:
        raise ValueError(f"{directory}: the tokenizer names no eos token (tokenizer_config.json)")
    ids.setdefault("bos", ids["eos"])
    if image_token is not None:
        image_id = backend.token_to_id(image_token)
        if image_id is None:
            raise ValueError(f"image_token {image_token!r} is not in the tokenizer's vocabulary")
        ids["image"] = image_id
    elif ids.get("pad") not in (None, ids["bos"], ids["eos"]):
        ids["image"] = ids["pad"]
    elif "unk" in ids:
        ids["image"] = ids["unk"]
    return ids


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


def cache_name(vocab_size: int) -> str:
    """The cache file of the tokenizer of ``vocab_size`` trained on today's train split."""
    digest = hashlib.sha256()
    for document in pydoc_documents("train"):
        digest.update(document.encode("utf-8"))
        digest.update(b"\0")  # document boundaries count too
    return f"tokenizer-bpe-{vocab_size}-{digest.hexdigest()[:12]}.json"


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
    cache_dir : where ``tokenizer-bpe-<vocab_size>-<corpus>.json`` lives; defaults to
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
    path = path / cache_name(vocab_size)
    if path.exists():
        cached = Tokenizer.from_file(path)
        if cached.vocab_size == vocab_size:
            return cached
        # a stale or foreign file under our name: retrain and replace it
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save(path)
    return tokenizer
