"""MetaLM (language): a bidirectional text encoder docked onto a causal decoder.

Forward on a batch shaped like metalm_fast.data.collator.SemiCausalBatch (the
model reads its attributes; models/ sits above data/ and does not import it):

1. the encoder reads the span tokens (packed, ``SpanMask.bidirectional`` over
   the spans) with its own embeddings;
2. the connector maps its outputs to the decoder width;
3. ``embed_scatter`` builds the decoder input: token embeddings, with the
   connector rows at span positions;
4. the causal decoder (``SpanMask.causal`` over packed documents) predicts the
   next tokens; the loss is cross-entropy over the scored positions only.

``variant="single_stack"`` skips the encoder: one transformer reads every
token with ``SpanMask.semi_causal`` (bidirectional inside spans, causal
elsewhere), so both designs train on the same batches. Input and output
embeddings of the decoder are tied.

Vision encoders, generation through the paged KV cache and the training CLI
are not here yet (issue 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.models.transformer import TransformerStack
from metalm_fast.nn.connector import Connector
from metalm_fast.nn.embedding import EmbeddingScatter
from metalm_fast.nn.rotary import packed_positions

__all__ = ["MetaLM", "MetaLMConfig", "PRESETS"]


@dataclass(frozen=True)
class MetaLMConfig:
    vocab_size: int
    decoder_dim: int
    decoder_layers: int
    decoder_heads: int
    encoder_dim: int
    encoder_layers: int
    encoder_heads: int
    decoder_kv_heads: int | None = None
    connector: str = "linear"
    mlp_kind: str = "gelu"
    variant: str = "two_stack"  # or "single_stack"
    backend: str = "auto"
    # Vision encoder (a ViT over packed patches); vision_layers == 0: no vision encoder.
    image_size: int = 8
    image_channels: int = 1
    patch_size: int = 2
    vision_dim: int = 0
    vision_layers: int = 0
    vision_heads: int = 1
    vision_connector: str = "mlp"
    vision_connector_layers: int = 3

    @property
    def tokens_per_image(self) -> int:
        """Decoder placeholder positions per image: one per patch."""
        return (self.image_size // self.patch_size) ** 2


#: tiny: tests and the CPU demo; small: CPU benchmarks; paper_language: Hao et al. 2022 sizes.
PRESETS = {
    "tiny": MetaLMConfig(vocab_size=512, decoder_dim=64, decoder_layers=2, decoder_heads=2,
                         encoder_dim=64, encoder_layers=2, encoder_heads=2),
    "small": MetaLMConfig(vocab_size=8192, decoder_dim=256, decoder_layers=4, decoder_heads=8,
                          encoder_dim=256, encoder_layers=4, encoder_heads=8),
    "paper_language": MetaLMConfig(vocab_size=64000, decoder_dim=2048, decoder_layers=24,
                                   decoder_heads=32, encoder_dim=1024, encoder_layers=24,
                                   encoder_heads=16),
}


class MetaLM(nn.Module):
    """Encoder-connector-decoder language model; ``forward(batch) -> mean loss``."""

    def __init__(self, config: MetaLMConfig):
        super().__init__()
        if config.variant not in ("two_stack", "single_stack"):
            raise ValueError(
                f"variant must be 'two_stack' or 'single_stack', got {config.variant!r}"
            )
        self.config = config
        self.embedding = EmbeddingScatter(config.vocab_size, config.decoder_dim,
                                          backend=config.backend)
        self.decoder = TransformerStack(config.decoder_dim, config.decoder_layers,
                                        config.decoder_heads, config.decoder_kv_heads,
                                        mlp_kind=config.mlp_kind, backend=config.backend)
        self.lm_head = nn.Linear(config.decoder_dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied input and output embeddings
        if config.variant == "two_stack":
            self.encoder_embedding = nn.Embedding(config.vocab_size, config.encoder_dim)
            self.encoder = TransformerStack(config.encoder_dim, config.encoder_layers,
                                            config.encoder_heads, mlp_kind=config.mlp_kind,
                                            backend=config.backend)
            self.connector = Connector(config.connector, config.encoder_dim, config.decoder_dim)

    def encode_spans(self, batch) -> torch.Tensor:
        """Connector outputs for the span tokens: [N, decoder_dim]."""
        mask = SpanMask.bidirectional(batch.encoder_cu_seqlens)
        positions = packed_positions(batch.encoder_cu_seqlens)
        hidden = self.encoder(self.encoder_embedding(batch.encoder_ids), mask, positions)
        return self.connector(hidden, batch.encoder_cu_seqlens)

    def logits(self, batch) -> torch.Tensor:
        """[T, vocab] next-token logits."""
        positions = packed_positions(batch.cu_seqlens)
        if self.config.variant == "single_stack":
            hidden = self.embedding(batch.input_ids)
            mask = SpanMask.semi_causal(batch.cu_seqlens, batch.span_starts, batch.span_ends)
        else:
            features = self.encode_spans(batch)
            hidden = self.embedding(batch.input_ids, features, batch.feature_index)
            mask = SpanMask.causal(batch.cu_seqlens)
        return self.lm_head(self.decoder(hidden, mask, positions))

    def forward(self, batch, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the scored positions: their mean (0 if none is
        scored) or, with ``reduction="sum"``, their sum (for exact averaging
        across micro-batches and ranks)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        logits = self.logits(batch)
        if not bool((batch.labels != -100).any()):
            return logits.sum() * 0.0
        # labels are -100 (cross_entropy's ignore_index) where no loss is carried
        return F.cross_entropy(logits.float(), batch.labels, reduction=reduction)
