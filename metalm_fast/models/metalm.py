"""MetaLM: bidirectional encoders (text spans, images) docked onto a causal decoder.

Forward on a batch shaped like metalm_fast.data.collator.SemiCausalBatch (the
model reads its attributes; models/ sits above data/ and does not import it):

1. the text encoder reads the span tokens (packed, ``SpanMask.bidirectional``
   over the spans) with its own embeddings, and its connector maps them to the
   decoder width: ``N`` rows;
2. the vision encoder (a ViT, metalm_fast.models.vision) reads the images
   (``SpanMask.bidirectional`` over each image's patches) and the vision
   connector maps them to the decoder width: ``I * tokens_per_image`` rows;
3. ``embed_scatter`` builds the decoder input in one pass: token embeddings,
   with text rows at span positions (``feature_index``) and image rows at image
   placeholders (``image_index``, offset by ``N`` into the concatenated features);
4. the causal decoder (``SpanMask.causal`` over packed documents) predicts the
   next tokens; the loss is cross-entropy over the scored positions only.

``variant="single_stack"`` has no text encoder: one transformer reads every
token with ``SpanMask.semi_causal`` (bidirectional inside spans, causal
elsewhere), so both designs train on the same batches; images still go
through the vision encoder. ``encoder_layers=0`` builds no text encoder (a
vision-language model); ``vision_layers=0`` builds no vision encoder. A batch
that needs a missing encoder raises ValueError. Input and output embeddings
of the decoder are tied. Generation through the paged KV cache is
metalm_fast.models.generation (``MetaLM.generate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metalm_fast.checks import integer
from metalm_fast.masks import SpanMask
from metalm_fast.models.generation import generate
from metalm_fast.models.text_encoder import TextEncoder, TextEncoderConfig
from metalm_fast.models.transformer import TransformerStack
from metalm_fast.models.vision import VisionEncoder, VisionEncoderConfig
from metalm_fast.nn.architecture import BlockArchitecture
from metalm_fast.nn.connector import Connector
from metalm_fast.nn.embedding import EmbeddingScatter
from metalm_fast.nn.linear import DecodeLinear
from metalm_fast.nn.rotary import packed_positions
from metalm_fast.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

__all__ = ["IGNORE_INDEX", "MetaLM", "MetaLMConfig", "PRESETS"]


#: The label of a position that carries no loss (F.cross_entropy's default ignore_index).
#: Defined here, where the loss is computed; the collator and the trainer import it.
IGNORE_INDEX = -100


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
    # The decoder's block computation (default: the native block) and MLP width (default
    # 4 * decoder_dim); an untied LM head; the native text encoder's blocks.
    decoder_architecture: BlockArchitecture = field(default_factory=BlockArchitecture)
    decoder_mlp_hidden: int | None = None
    tie_embeddings: bool = True
    encoder_architecture: BlockArchitecture = field(default_factory=BlockArchitecture)
    # Pretrained encoders (metalm_fast.hf): their whole configuration. When given, the
    # encoder_* (text) or vision_* / image_* / patch_size (vision) fields are derived
    # from them.
    text_encoder: TextEncoderConfig | None = None
    vision_encoder: VisionEncoderConfig | None = None
    # Frozen (no gradient) parts: the text encoder's embeddings and lowest N layers, the
    # vision encoder's likewise, the decoder with its embeddings and head. The paper
    # trains only the last two layers of its pretrained encoders.
    freeze_encoder_layers: int = 0
    freeze_vision_layers: int = 0
    freeze_decoder: bool = False
    # The transformers family a decoder was loaded from (metalm_fast.hf.load_decoder:
    # architecture, model_type, its config.json), which export writes it back as.
    hf_source: dict | None = field(default=None, hash=False)

    def __post_init__(self):
        for name in ("decoder_architecture", "encoder_architecture"):
            object.__setattr__(self, name, self._architecture(name))
        self._derive_encoder_fields()
        for name in ("freeze_encoder_layers", "freeze_vision_layers"):
            integer(getattr(self, name), name, minimum=0)
        if self.freeze_encoder_layers > self.encoder_layers:
            raise ValueError(
                f"freeze_encoder_layers ({self.freeze_encoder_layers}) exceeds the text "
                f"encoder's {self.encoder_layers} layers"
            )
        if self.freeze_vision_layers > self.vision_layers:
            raise ValueError(
                f"freeze_vision_layers ({self.freeze_vision_layers}) exceeds the vision "
                f"encoder's {self.vision_layers} layers"
            )

    def _derive_encoder_fields(self) -> None:
        """Read the pretrained encoders' configs (dicts from JSON) and the fields they fix."""
        text, vision = self.text_encoder, self.vision_encoder
        if isinstance(text, dict):
            text = TextEncoderConfig(**text)
        if isinstance(vision, dict):
            vision = VisionEncoderConfig(**vision)
        for name, value, kind in (
            ("text_encoder", text, TextEncoderConfig),
            ("vision_encoder", vision, VisionEncoderConfig),
        ):
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"{name} must be a {kind.__name__} (or its dict) or None, "
                    f"got {type(value).__name__}"
                )
            object.__setattr__(self, name, value)
        derived = {}
        if text is not None:
            if self.variant != "two_stack":
                raise ValueError("text_encoder needs variant='two_stack'")
            derived.update(
                encoder_dim=text.dim, encoder_layers=text.num_layers, encoder_heads=text.num_heads
            )
        if vision is not None:
            derived.update(
                vision_dim=vision.dim,
                vision_layers=vision.num_layers,
                vision_heads=vision.num_heads,
                image_size=vision.image_size,
                image_channels=vision.image_channels,
                patch_size=vision.patch_size,
            )
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def _architecture(self, name: str) -> BlockArchitecture:
        """The field ``name`` as a BlockArchitecture carrying ``mlp_kind``.

        A config read back from JSON (a checkpoint) holds the architectures as dicts;
        ``mlp_kind`` (the native models' field) applies to an architecture that keeps
        the default MLP, and must agree with one that names another.
        """
        value = getattr(self, name)
        if isinstance(value, dict):
            value = BlockArchitecture(**value)
        if not isinstance(value, BlockArchitecture):
            raise TypeError(
                f"{name} must be a BlockArchitecture (or its dict), got {type(value).__name__}"
            )
        if value.mlp_kind == "gelu":
            return dataclasses.replace(value, mlp_kind=self.mlp_kind)
        if self.mlp_kind not in ("gelu", value.mlp_kind):
            raise ValueError(
                f"mlp_kind {self.mlp_kind!r} disagrees with {name}.mlp_kind {value.mlp_kind!r}"
            )
        return value

    @property
    def tokens_per_image(self) -> int:
        """Decoder placeholder positions per image: one per patch (and one for a
        pretrained vision encoder's class token)."""
        if self.vision_encoder is not None:
            return self.vision_encoder.tokens_per_image
        return (self.image_size // self.patch_size) ** 2


#: tiny: tests and the CPU demo (vision-language: a text encoder and a ViT over 8x8 one-channel
#: images, 4 tokens per image); small: CPU benchmarks (text); paper_*: Hao et al. 2022 sizes.
PRESETS = {
    "tiny": MetaLMConfig(
        vocab_size=1024,
        decoder_dim=64,
        decoder_layers=2,
        decoder_heads=2,
        encoder_dim=64,
        encoder_layers=2,
        encoder_heads=2,
        # 4x4 patches: 4 tokens per 8x8 digit; with 2x2 patches (16 tokens)
        # the tiny ViT learned digit VQA several times slower (measured)
        image_size=8,
        image_channels=1,
        patch_size=4,
        vision_dim=64,
        vision_layers=2,
        vision_heads=2,
        vision_connector="mlp",
        vision_connector_layers=3,
    ),
    "small": MetaLMConfig(
        vocab_size=8192,
        decoder_dim=256,
        decoder_layers=4,
        decoder_heads=8,
        encoder_dim=256,
        encoder_layers=4,
        encoder_heads=8,
    ),
    "paper_language": MetaLMConfig(
        vocab_size=64000,
        decoder_dim=2048,
        decoder_layers=24,
        decoder_heads=32,
        encoder_dim=1024,
        encoder_layers=24,
        encoder_heads=16,
    ),
    # The paper's vision-language MetaLM docks a ViT-B/16 (CLIP) through a 3-layer MLP
    # connector onto a 24-layer, 1024-wide decoder; images are its only bidirectional input
    # (the text is read by the decoder), so it has no separate text encoder: encoder_layers=0.
    "paper_vision_language": MetaLMConfig(
        vocab_size=64000,
        decoder_dim=1024,
        decoder_layers=24,
        decoder_heads=16,
        encoder_dim=0,
        encoder_layers=0,
        encoder_heads=1,
        image_size=224,
        image_channels=3,
        patch_size=16,
        vision_dim=768,
        vision_layers=12,
        vision_heads=12,
        vision_connector="mlp",
        vision_connector_layers=3,
    ),
}


def _text_connector(config: MetaLMConfig) -> Connector:
    return Connector(config.connector, config.encoder_dim, config.decoder_dim)


def _vision_connector(config: MetaLMConfig) -> Connector:
    return Connector(
        config.vision_connector,
        config.vision_dim,
        config.decoder_dim,
        num_layers=config.vision_connector_layers,
        num_latents=config.tokens_per_image,  # a resampler keeps one row per placeholder
        num_heads=config.decoder_heads,
        backend=config.backend,
    )


def _outside(module: nn.Module, child: str) -> list[nn.Parameter]:
    """``module``'s parameters that are not under its child ``child`` (its embeddings)."""
    return [p for name, p in module.named_parameters() if not name.startswith(child + ".")]


class MetaLM(nn.Module):
    """Encoder(s)-connector-decoder language model; ``forward(batch) -> mean loss``.

    Pieces: ``embedding`` / ``decoder`` / ``lm_head`` (tied) always;
    ``encoder_embedding`` / ``encoder`` / ``connector`` for a two-stack model
    with ``encoder_layers > 0``; ``vision_encoder`` / ``vision_connector``
    when ``vision_layers > 0``.
    """

    def __init__(self, config: MetaLMConfig):
        super().__init__()
        if config.variant not in ("two_stack", "single_stack"):
            raise ValueError(
                f"variant must be 'two_stack' or 'single_stack', got {config.variant!r}"
            )
        for name in ("encoder_layers", "vision_layers"):
            if getattr(config, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
        if config.variant == "single_stack" and config.decoder_architecture.sliding_window:
            raise ValueError(
                "decoder_architecture.sliding_window is for the two-stack (causal) decoder; "
                "the single-stack variant's semi-causal mask has no window"
            )
        self.config = config
        self.embedding = EmbeddingScatter(
            config.vocab_size, config.decoder_dim, backend=config.backend
        )
        self.decoder = TransformerStack(
            config.decoder_dim,
            config.decoder_layers,
            config.decoder_heads,
            config.decoder_kv_heads,
            mlp_hidden=config.decoder_mlp_hidden,
            architecture=config.decoder_architecture,
            backend=config.backend,
        )
        self.lm_head = DecodeLinear(config.decoder_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight  # tied input and output embeddings
        if config.text_encoder is not None:
            self.text_encoder = TextEncoder(config.text_encoder)
            self.connector = _text_connector(config)
        elif config.variant == "two_stack" and config.encoder_layers > 0:
            self.encoder_embedding = nn.Embedding(config.vocab_size, config.encoder_dim)
            self.encoder = TransformerStack(
                config.encoder_dim,
                config.encoder_layers,
                config.encoder_heads,
                architecture=config.encoder_architecture,
                backend=config.backend,
            )
            self.connector = _text_connector(config)
        if config.vision_layers > 0:
            self.vision_encoder = VisionEncoder.from_config(
                config.vision_encoder or config, backend=config.backend
            )
            self.vision_connector = _vision_connector(config)
        self.freeze(config)

    @classmethod
    def from_pretrained(
        cls,
        decoder: MetaLM,
        text_encoder: TextEncoder | None = None,
        vision_encoder: VisionEncoder | None = None,
        *,
        connector: str = "linear",
        vision_connector: str = "mlp",
        vision_connector_layers: int = 3,
        freeze_encoder_layers: int = 0,
        freeze_vision_layers: int = 0,
        freeze_decoder: bool = False,
        variant: str = "two_stack",
    ) -> MetaLM:
        """A MetaLM of pretrained parts and fresh connectors (metalm_fast.hf loads them).

        Parameters
        ----------
        decoder : a decoder-only MetaLM (``metalm_fast.hf.load_decoder``); its embedding,
            decoder and LM head are taken as they are (not copied).
        text_encoder : a TextEncoder (``hf.load_text_encoder``) or None.
        vision_encoder : a VisionEncoder, or ``hf.load_vision_encoder``'s module holding
            one (``.encoder``), or None.
        connector, vision_connector, vision_connector_layers : the fresh connectors'
            kinds (metalm_fast.nn.Connector), initialised as a new model's.
        freeze_encoder_layers, freeze_vision_layers : freeze the encoder's embeddings and
            its N lowest layers (the paper trains the last two: N = layers - 2).
        freeze_decoder : freeze the decoder, its embeddings and its LM head.
        variant : "two_stack", or "single_stack" (no text encoder: the pretrained decoder
            reads the spans itself, bidirectionally, with SpanMask.semi_causal).

        ``metalm_fast.hf.from_pretrained`` does the same from directories.
        """
        if (
            not isinstance(decoder, MetaLM)
            or decoder.has_text_encoder
            or decoder.has_vision_encoder
        ):
            raise TypeError(
                "decoder must be a decoder-only MetaLM (metalm_fast.hf.load_decoder(path)), got "
                + (
                    type(decoder).__name__
                    if not isinstance(decoder, MetaLM)
                    else "one with encoders"
                )
            )
        if isinstance(getattr(vision_encoder, "encoder", None), VisionEncoder):
            vision_encoder = vision_encoder.encoder  # hf.load_vision_encoder's [I, P, D] wrapper
        for name, part, kind in (
            ("text_encoder", text_encoder, TextEncoder),
            ("vision_encoder", vision_encoder, VisionEncoder),
        ):
            if part is not None and not isinstance(part, kind):
                raise TypeError(
                    f"{name} must be a {kind.__name__} (metalm_fast.hf.load_{name}(path)) or "
                    f"None, got {type(part).__name__}"
                )
        config = dataclasses.replace(
            decoder.config,
            variant=variant,
            encoder_layers=0,
            text_encoder=None if text_encoder is None else text_encoder.config,
            vision_encoder=None if vision_encoder is None else vision_encoder.config,
            vision_layers=0,
            connector=connector,
            vision_connector=vision_connector,
            vision_connector_layers=vision_connector_layers,
            freeze_encoder_layers=freeze_encoder_layers,
            freeze_vision_layers=freeze_vision_layers,
            freeze_decoder=freeze_decoder,
        )
        # The parts already exist: build the rest on the meta device (no memory, no
        # initialisation), put the parts in, then make the connectors for real.
        with torch.device("meta"):
            model = cls(config)
        weight = decoder.embedding.weight
        model.embedding, model.decoder = decoder.embedding, decoder.decoder
        model.lm_head = decoder.lm_head
        if text_encoder is not None:
            model.text_encoder = text_encoder
            model.connector = _text_connector(config).to(weight.device, weight.dtype)
        if vision_encoder is not None:
            model.vision_encoder = vision_encoder
            model.vision_connector = _vision_connector(config).to(weight.device, weight.dtype)
        model.freeze(config)
        return model

    def freeze(self, config: MetaLMConfig) -> None:
        """Turn off the gradients of the parts ``config`` freezes (see MetaLMConfig)."""
        frozen: list[nn.Parameter] = []
        if config.freeze_decoder:
            for part in (self.embedding, self.decoder, self.lm_head):
                frozen += part.parameters()
        layers = config.freeze_encoder_layers
        if layers and hasattr(self, "text_encoder"):
            frozen += _outside(self.text_encoder, "stack")
            frozen += self.text_encoder.stack.blocks[:layers].parameters()
        elif layers:
            frozen += self.encoder_embedding.parameters()
            frozen += self.encoder.blocks[:layers].parameters()
        layers = config.freeze_vision_layers
        if layers:
            frozen += _outside(self.vision_encoder, "transformer")
            frozen += self.vision_encoder.transformer.blocks[:layers].parameters()
        for parameter in frozen:
            parameter.requires_grad_(False)

    def decoder_only(self) -> MetaLM:
        """This model's decoder as a decoder-only MetaLM sharing its embedding, decoder and
        LM head (not copies); the model itself when it has no encoder."""
        if not (self.has_text_encoder or self.has_vision_encoder):
            return self
        config = dataclasses.replace(
            self.config,
            variant="two_stack",
            encoder_layers=0,
            text_encoder=None,
            vision_layers=0,
            vision_encoder=None,
            freeze_encoder_layers=0,
            freeze_vision_layers=0,
        )
        with torch.device("meta"):
            decoder = MetaLM(config)
        decoder.embedding, decoder.decoder = self.embedding, self.decoder
        decoder.lm_head = self.lm_head
        return decoder.train(self.training)

    @property
    def hf_source(self) -> dict | None:
        """``config.hf_source``: the transformers family the decoder came from, or None."""
        return self.config.hf_source

    @property
    def has_text_encoder(self) -> bool:
        return hasattr(self, "encoder") or hasattr(self, "text_encoder")

    @property
    def has_vision_encoder(self) -> bool:
        return hasattr(self, "vision_encoder")

    # ------------------------------------------------------------------ encoders
    def encode_spans(self, batch) -> torch.Tensor:
        """Connector outputs for the span tokens: [N, decoder_dim]."""
        if not self.has_text_encoder:
            raise ValueError("this MetaLM has no text encoder (single_stack or encoder_layers=0)")
        if hasattr(self, "text_encoder"):
            hidden = self.text_encoder(batch.encoder_ids, batch.encoder_cu_seqlens)
            return self.connector(hidden, batch.encoder_cu_seqlens)
        mask = SpanMask.bidirectional(batch.encoder_cu_seqlens)
        positions = packed_positions(batch.encoder_cu_seqlens)
        hidden = self.encoder(self.encoder_embedding(batch.encoder_ids), mask, positions)
        return self.connector(hidden, batch.encoder_cu_seqlens)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Vision connector outputs for images [I, C, H, W]: [I * tokens_per_image, decoder_dim].

        A native vision encoder reads the images as they are. A pretrained one
        (``config.vision_encoder``) reads them through its own preprocessing
        (:meth:`pixel_values`): its images are always raw images in [0, 1], grey (one
        channel) or with the encoder's channels, of any size.
        """
        if not self.has_vision_encoder:
            raise ValueError("this MetaLM has no vision encoder (vision_layers=0)")
        if self.config.vision_encoder is not None:
            images = self.pixel_values(images)
        hidden = self.vision_encoder(images)
        return self.vision_connector(
            hidden, self.vision_encoder.cu_seqlens(images.shape[0], hidden.device)
        )

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images in [0, 1] [I, 1 or C, H, W] -> the pretrained vision encoder's pixel
        values [I, C, S, S]: grey repeated over the channels (as an RGB conversion does),
        then its preprocessing (resize, rescale, normalise) on the 0..255 scale it expects."""
        encoder = self.vision_encoder
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a tensor [I, C, H, W] of raw images in [0, 1]")
        if images.shape[1] not in (1, encoder.image_channels):
            raise ValueError(
                f"images must have 1 (grey) or {encoder.image_channels} channels, got "
                f"{images.shape[1]}"
            )
        if images.shape[0] == 0:
            size = (0, encoder.image_channels, encoder.image_size, encoder.image_size)
            return images.new_zeros(size)
        images = images.expand(-1, encoder.image_channels, -1, -1)
        pixels = encoder.preprocess(images.float() * 255.0)
        return pixels.to(encoder.patch_embedding.weight.dtype)

    def _batch_images(self, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, image_index) to encode, or None for a model without a vision encoder.

        With a vision encoder, a batch without images still runs it (on zero
        images), so every parameter takes part in every step (DDP needs that).
        """
        images = getattr(batch, "images", None)
        image_index = getattr(batch, "image_index", None)
        count = 0 if images is None else images.shape[0]
        if not self.has_vision_encoder:
            if count:
                raise ValueError(
                    f"the batch holds {count} images (batch.images) but this MetaLM has no "
                    "vision encoder (vision_layers=0)"
                )
            return None
        if count and image_index is None:
            raise ValueError("batch.images is given without batch.image_index")
        if not count:
            encoder = self.vision_encoder
            images = self.embedding.weight.new_zeros(
                (0, encoder.image_channels, encoder.image_size, encoder.image_size)
            )
        if image_index is None:
            image_index = torch.full_like(batch.input_ids, -1)
        return images, image_index

    # ------------------------------------------------------------------ decoder
    def decoder_inputs(self, batch) -> tuple[torch.Tensor, SpanMask]:
        """The decoder's input embeddings [T, decoder_dim] and its mask over the batch.

        Encoder rows are scattered in as in training; generation's prefill uses
        exactly this (metalm_fast.models.generation).
        """
        vision = self._batch_images(batch)
        image_features = None if vision is None else self.encode_images(vision[0])
        if self.config.variant == "single_stack":
            mask = SpanMask.semi_causal(batch.cu_seqlens, batch.span_starts, batch.span_ends)
            if image_features is None:
                return self.embedding(batch.input_ids), mask
            return self.embedding(batch.input_ids, image_features, vision[1]), mask
        mask = self.decoder_mask(batch.cu_seqlens)
        text_features = None
        if self.has_text_encoder:
            text_features = self.encode_spans(batch)
        elif batch.encoder_ids.numel():
            raise ValueError(
                f"the batch has {batch.encoder_ids.numel()} span tokens (batch.encoder_ids) but "
                "this MetaLM has no text encoder (encoder_layers=0); build the batch without spans"
            )
        if image_features is None and text_features is None:
            return self.embedding(batch.input_ids), mask
        if image_features is None:
            return self.embedding(batch.input_ids, text_features, batch.feature_index), mask
        if text_features is None:
            return self.embedding(batch.input_ids, image_features, vision[1]), mask
        image_index = vision[1]
        features = torch.cat((text_features, image_features))
        index = torch.where(
            image_index >= 0, image_index + text_features.shape[0], batch.feature_index
        )
        return self.embedding(batch.input_ids, features, index), mask

    def decoder_mask(self, cu_seqlens: torch.Tensor) -> SpanMask:
        """The two-stack decoder's mask: causal over packed documents, within the
        architecture's sliding window when it has one."""
        window = self.config.decoder_architecture.sliding_window
        if window is None:
            return SpanMask.causal(cu_seqlens)
        return SpanMask.sliding_window(cu_seqlens, window)

    def decoder_hidden(self, batch) -> torch.Tensor:
        """[T, decoder_dim]: the decoder's output, what the LM head reads."""
        hidden, mask = self.decoder_inputs(batch)
        positions = packed_positions(batch.cu_seqlens)
        return self.decoder(hidden, mask, positions)

    def logits(self, batch) -> torch.Tensor:
        """[T, vocab] next-token logits."""
        return self.lm_head(self.decoder_hidden(batch))

    def forward(self, batch, reduction: str = "mean", *, fused_loss: bool = True) -> torch.Tensor:
        """Cross-entropy over the scored positions: their mean (0 if none is
        scored) or, with ``reduction="sum"``, their sum (for exact averaging
        across micro-batches and ranks).

        ``fused_loss`` (default): the LM head and the cross-entropy run as one op,
        :func:`~metalm_fast.ops.fused_linear_cross_entropy.fused_linear_cross_entropy`,
        in row chunks, so no [T, vocab] logits exist (with tied embeddings the head's
        gradient accumulates into the shared table). ``fused_loss=False`` keeps the
        eager path (:meth:`logits`, then F.cross_entropy), for comparison.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if not fused_loss:
            logits = self.logits(batch)
            if not bool((batch.labels != IGNORE_INDEX).any()):
                return logits.sum() * 0.0
            return F.cross_entropy(
                logits.float(), batch.labels, ignore_index=IGNORE_INDEX, reduction=reduction
            )
        weight = self.lm_head.weight
        hidden = self.decoder_hidden(batch)
        return fused_linear_cross_entropy(
            hidden.to(weight.dtype),  # autocast leaves the final norm's output in fp32
            weight,
            batch.labels,
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
            backend=self.config.backend,
        )

    def generate(self, prompts, **kwargs) -> list[list[int]]:
        """New tokens for each prompt; see :func:`metalm_fast.models.generation.generate`."""
        return generate(self, prompts, **kwargs)
