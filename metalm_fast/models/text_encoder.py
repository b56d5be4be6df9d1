"""TextEncoder: a bidirectional encoder over packed token sequences (BERT, RoBERTa, ELECTRA).

``forward(input_ids [N], cu_seqlens [S + 1]) -> [N, D]``: the ``S`` sequences are
packed end to end (sequence ``i`` is rows ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1``)
and each attends only to itself (``SpanMask.bidirectional``), so a batch of spans
of any lengths is one span_attention call per layer, with no padding.

The embeddings are BERT's, summed in its order:

    x = word[ids] + token_type[0] + position[p]  ->  LayerNorm  ->  (ELECTRA) project

where ``p`` counts from 0 inside each sequence (position_style "bert"), or, as
RoBERTa numbers them (fairseq's make_positions), from ``pad_token_id + 1`` over the
sequence's non-pad tokens, a pad token taking position ``pad_token_id`` itself
(position_style "roberta"). Every token has type 0: a packed span is one segment.
ELECTRA's embeddings are narrower than its blocks (``embedding_size``); a Linear
projects them to ``dim``. Then a TransformerStack computes what the configured
BlockArchitecture says: for BERT, post-norm blocks with biases everywhere, exact
GELU and no final norm.

The same class describes a native-style encoder (:meth:`TextEncoderConfig.native`):
word embeddings only, rotary positions inside the blocks, pre-norm blocks and a final
norm, the computation of MetaLM's own text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from metalm_fast.checks import index_vector, integer
from metalm_fast.masks import SpanMask
from metalm_fast.models.transformer import TransformerStack
from metalm_fast.nn.architecture import BlockArchitecture
from metalm_fast.nn.rotary import packed_positions

__all__ = ["BERT_ARCHITECTURE", "POSITION_STYLES", "TextEncoder", "TextEncoderConfig"]

#: BERT's block (RoBERTa's and ELECTRA's too): ``norm(x + attn(x))`` then
#: ``norm(x + mlp(x))``, biases in every projection, exact GELU, LayerNorm eps 1e-12,
#: no final norm, no positions in the stack (the embeddings hold them).
BERT_ARCHITECTURE = BlockArchitecture(
    norm="layernorm",
    norm_eps=1e-12,
    post_norm=True,
    final_norm=False,
    positions="none",
    qkv_bias=True,
    out_bias=True,
    mlp_kind="gelu",
    mlp_bias=True,
)

#: How absolute positions are numbered: "bert" from 0 in each sequence; "roberta" from
#: pad_token_id + 1 over non-pad tokens, pad tokens at pad_token_id.
POSITION_STYLES = ("bert", "roberta")


@dataclass(frozen=True)
class TextEncoderConfig:
    """The sizes and computation of a :class:`TextEncoder`.

    JSON-serialisable: ``TextEncoderConfig(**dataclasses.asdict(config))`` rebuilds it
    (the nested architecture dict becomes a BlockArchitecture again).

    Attributes
    ----------
    vocab_size : rows of the word embedding table V.
    dim : width D of the blocks and of the output (BERT's hidden_size).
    num_layers, num_heads : the stack's depth and attention heads.
    mlp_hidden : the MLP width (BERT's intermediate_size); default ``4 * dim``.
    embedding_size : width E of the embeddings (ELECTRA); default ``dim``. When it
        differs from ``dim``, a Linear ``E -> D`` follows the embedding norm.
    max_positions : rows of the learned absolute position table; None: no table
        (positions come from the architecture, e.g. rotary).
    position_style : one of :data:`POSITION_STYLES`.
    type_vocab_size : rows of the token type table (row 0 is added to every token);
        0: no table.
    embedding_norm_eps : eps of the LayerNorm over the summed embeddings; None: no norm.
    pad_token_id : the padding token (its embedding row gets no gradient, as in
        transformers), or None.
    architecture : the blocks' computation (default :data:`BERT_ARCHITECTURE`); a dict
        is converted. Its positions: "none" (the embeddings hold them), "rotary", or
        "learned" (the stack's own table; then ``max_positions`` must be None).
    initializer_range : std of the normal initialisation of a freshly built encoder
        (BERT's: Linear and Embedding weights normal(0, std), biases 0).
    backend : span_attention backend.
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    mlp_hidden: int | None = None
    embedding_size: int | None = None
    max_positions: int | None = 512
    position_style: str = "bert"
    type_vocab_size: int = 2
    embedding_norm_eps: float | None = 1e-12
    pad_token_id: int | None = 0
    architecture: BlockArchitecture = field(default=BERT_ARCHITECTURE)
    initializer_range: float = 0.02
    backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.architecture, dict):
            object.__setattr__(self, "architecture", BlockArchitecture(**self.architecture))
        if not isinstance(self.architecture, BlockArchitecture):
            raise TypeError(
                "architecture must be a BlockArchitecture (or its dict), "
                f"got {type(self.architecture).__name__}"
            )
        self._check_sizes()
        self._check_positions()
        if self.embedding_norm_eps is not None:
            _positive_number("embedding_norm_eps", self.embedding_norm_eps)
        _positive_number("initializer_range", self.initializer_range)

    def _check_sizes(self) -> None:
        for name in ("vocab_size", "dim", "num_heads"):
            integer(getattr(self, name), name, minimum=1)
        integer(self.num_layers, "num_layers", minimum=0)
        integer(self.type_vocab_size, "type_vocab_size", minimum=0)
        for name in ("mlp_hidden", "embedding_size", "max_positions"):
            if getattr(self, name) is not None:
                integer(getattr(self, name), name, minimum=1)
        if self.architecture.head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.pad_token_id is not None:
            pad = integer(self.pad_token_id, "pad_token_id", minimum=0)
            if pad >= self.vocab_size:
                raise ValueError(
                    f"pad_token_id ({pad}) must be below vocab_size ({self.vocab_size})"
                )

    def _check_positions(self) -> None:
        if self.position_style not in POSITION_STYLES:
            raise ValueError(
                f"position_style must be one of {', '.join(map(repr, POSITION_STYLES))}; "
                f"got {self.position_style!r}"
            )
        if self.position_style == "roberta":
            if self.pad_token_id is None or self.max_positions is None:
                raise ValueError(
                    "position_style 'roberta' numbers positions from pad_token_id + 1 in the "
                    "position table: it needs pad_token_id and max_positions"
                )
            if self.max_positions <= self.pad_token_id + 1:
                raise ValueError(
                    f"max_positions ({self.max_positions}) leaves no position after "
                    f"pad_token_id + 1 ({self.pad_token_id + 1}) for position_style 'roberta'"
                )
        if self.architecture.positions == "learned" and self.max_positions is not None:
            raise ValueError(
                "architecture.positions 'learned' adds the stack's own position table; "
                "set max_positions=None so the embeddings do not add a second one"
            )

    @property
    def width(self) -> int:
        """E, the embedding width (``embedding_size``, default ``dim``)."""
        return self.dim if self.embedding_size is None else self.embedding_size

    @classmethod
    def native(
        cls,
        vocab_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        *,
        mlp_hidden: int | None = None,
        architecture: BlockArchitecture | None = None,
        pad_token_id: int | None = None,
        backend: str = "auto",
    ) -> TextEncoderConfig:
        """A native-style encoder: word embeddings only (no position or type table, no
        embedding norm) and the native block (default :class:`BlockArchitecture`:
        pre-norm, rotary over positions inside each sequence, final norm)."""
        return cls(
            vocab_size=vocab_size,
            dim=dim,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_hidden=mlp_hidden,
            max_positions=None,
            type_vocab_size=0,
            embedding_norm_eps=None,
            pad_token_id=pad_token_id,
            architecture=BlockArchitecture() if architecture is None else architecture,
            backend=backend,
        )


class TextEncoder(nn.Module):
    """Bidirectional encoder over packed sequences:
    ``forward(input_ids [N], cu_seqlens [S + 1]) -> [N, dim]``.

    Parameters
    ----------
    config : a :class:`TextEncoderConfig`.

    Attributes
    ----------
    config, dim (output width D), vocab_size, pad_token_id : from the config.
    tokenizer_file : the path of the tokenizer.json that came with pretrained weights
        (set by :func:`metalm_fast.hf.load_text_encoder`), else None.

    Pieces: ``word_embeddings``; ``position_embeddings``, ``token_type_embeddings``,
    ``embedding_norm``, ``embedding_project`` where the config has them; ``stack``.

    Example
    -------
    >>> import torch
    >>> config = TextEncoderConfig(vocab_size=50, dim=32, num_layers=1, num_heads=2,
    ...                            max_positions=16, backend="reference")
    >>> encoder = TextEncoder(config)
    >>> encoder(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0, 3, 5])).shape
    torch.Size([5, 32])
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise TypeError(f"config must be a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer_file: str | None = None
        width, pad = config.width, config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=pad)
        if config.max_positions is not None:
            # RoBERTa's table has a padding row too: the position pad tokens take.
            position_pad = pad if config.position_style == "roberta" else None
            self.position_embeddings = nn.Embedding(
                config.max_positions, width, padding_idx=position_pad
            )
        if config.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        if config.embedding_norm_eps is not None:
            self.embedding_norm = nn.LayerNorm(width, eps=config.embedding_norm_eps)
        if width != config.dim:
            self.embedding_project = nn.Linear(width, config.dim)
        self.stack = TransformerStack(
            config.dim,
            config.num_layers,
            config.num_heads,
            mlp_hidden=config.mlp_hidden,
            architecture=config.architecture,
            backend=config.backend,
        )
        self._initialise(config.initializer_range)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def pad_token_id(self) -> int | None:
        return self.config.pad_token_id

    def _initialise(self, std: float) -> None:
        """BERT's initialisation: normal(0, std) weights, zero biases, a zero padding row.
        (LayerNorms keep their ones and zeros.) Under a meta device it costs nothing."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        ids = self._check_ids(input_ids)
        cu = index_vector(cu_seqlens, "cu_seqlens").to(ids.device)
        mask = SpanMask.bidirectional(cu, ids.shape[0])  # checks cu_seqlens against N
        x = self.embed(ids, cu)
        positions = None if self.config.architecture.positions == "none" else packed_positions(cu)
        return self.stack(x, mask, positions)

    def embed(self, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """The stack's input [N, dim] for checked ids (int64 [N]) and cu_seqlens (int64)."""
        x = self.word_embeddings(ids)
        if hasattr(self, "token_type_embeddings"):
            x = x + self.token_type_embeddings.weight[0]  # every token is segment 0
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(self.absolute_positions(ids, cu))
        if hasattr(self, "embedding_norm"):
            x = self.embedding_norm(x)
        if hasattr(self, "embedding_project"):
            x = self.embedding_project(x)
        return x

    def absolute_positions(self, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """int64 [N]: each token's row of the position table (see the module docstring),
        checked to be inside the table."""
        if self.config.position_style == "bert":
            positions = packed_positions(cu)
        else:
            positions = _roberta_positions(ids, cu, self.config.pad_token_id)
        rows = self.config.max_positions
        if positions.numel() and int(positions.max()) >= rows:
            longest = int((cu[1:] - cu[:-1]).max())
            first = 0 if self.config.position_style == "bert" else self.config.pad_token_id + 1
            raise ValueError(
                f"a sequence of {longest} tokens reaches position {int(positions.max())}, but "
                f"the position table has {rows} rows (max_positions): sequences may hold at "
                f"most {rows - first} tokens"
            )
        return positions

    def _check_ids(self, input_ids) -> torch.Tensor:
        ids = index_vector(input_ids, "input_ids", self.word_embeddings.weight.device)
        if ids.device != self.word_embeddings.weight.device:
            raise ValueError(
                f"input_ids are on {ids.device} but the encoder is on "
                f"{self.word_embeddings.weight.device}"
            )
        if ids.numel():
            bad = (ids < 0) | (ids >= self.vocab_size)
            if bool(bad.any()):
                where = int(torch.nonzero(bad)[0, 0])
                raise ValueError(
                    f"input_ids must be in [0, {self.vocab_size}) (vocab_size), but "
                    f"input_ids[{where}] = {int(ids[where])}"
                )
        return ids


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _roberta_positions(ids: torch.Tensor, cu: torch.Tensor, pad: int) -> torch.Tensor:
    """RoBERTa's positions per packed sequence: non-pad tokens count from ``pad + 1``,
    pad tokens sit at ``pad`` (fairseq's make_positions, as transformers computes it
    over each padded row)."""
    counted = (ids != pad).to(torch.int64)
    running = torch.cumsum(counted, 0)
    before = torch.cat((running.new_zeros(1), running))  # non-pad tokens before each row
    sequence = torch.searchsorted(cu, torch.arange(ids.shape[0], device=ids.device), right=True)
    within = running - before[cu[sequence - 1]]
    return within * counted + pad
