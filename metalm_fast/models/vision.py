"""VisionEncoder: a ViT over packed image patches, MetaLM's bidirectional image encoder.

One module describes the native encoder and the pretrained ViT, CLIP and
SigLIP vision towers (:func:`metalm_fast.hf.load_vision_encoder`); what differs
between them is a :class:`VisionEncoderConfig`:

| | native | ViT | CLIP | SigLIP |
|---|---|---|---|---|
| patch bias | yes | yes | no | yes |
| class token | no | yes | yes | no |
| pre norm (on the embeddings) | no | no | yes | no |
| final norm (on the last hidden state) | yes | yes | no | yes |
| MLP | gelu | gelu | quick_gelu | gelu_tanh |

Images ``[I, C, H, W]`` become ``(H / p) ** 2`` patches each (raster order,
``p`` the patch size), flattened to ``C * p * p`` values in (C, py, px) order
and embedded by one Linear (the same map as a Conv2d with kernel and stride
``p``, whose ``[D, C, p, p]`` weight is this Linear's weight reshaped, without
the convolution machinery). With a class token, a learned row is put in front
of each image's patches, so an image gives ``P = tokens_per_image`` rows
(patches + 1). A learned position embedding per row is added, then a pre-norm
TransformerStack attends bidirectionally inside each image: the rows of all
images are packed (``[I * P, dim]``) with ``cu_seqlens = arange(I + 1) * P``
and ``SpanMask.bidirectional``, so a batch of any number of images is one
span_attention call per layer, unpadded.

Two output shapes, one computation: :meth:`VisionEncoder.forward` gives the
packed ``[I * P, dim]`` that MetaLM's connector reads (with
:meth:`VisionEncoder.cu_seqlens`); :meth:`VisionEncoder.last_hidden_state`
gives ``[I, P, dim]``, the batch layout of transformers' ``last_hidden_state``
(a view of the same rows).

:meth:`VisionEncoder.preprocess` turns raw images into pixel values as the
config's :class:`ImagePreprocessing` says (resize, center crop, rescale,
normalise), in torch, with no PIL.

Why learned absolute positions rather than rotary: the image size is fixed
per model, so the table is small and fixed; it is what ViT-B/16 (CLIP, the
encoder MetaLM starts from) uses, so pretrained weights map onto it one to
one; 1-D rotary over raster order would misstate 2-D neighbourhoods; and with
no rotary the attention reads q, k and v as strided views of the fused qkv
projection, uncopied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.models.transformer import TransformerStack
from metalm_fast.nn.architecture import BlockArchitecture, make_norm

__all__ = ["RESAMPLES", "ImagePreprocessing", "VisionEncoder", "VisionEncoderConfig"]

#: Resampling filters of :class:`ImagePreprocessing` (PIL's NEAREST, BILINEAR, BICUBIC).
RESAMPLES = ("nearest", "bilinear", "bicubic")

# torch's interpolate mode for each filter. "nearest-exact" samples at pixel centres, as
# PIL's NEAREST does ("nearest" floors, which shifts the image by half a pixel).
_INTERPOLATE_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}


@dataclass(frozen=True)
class ImagePreprocessing:
    """How raw images become pixel values: resize, center crop, rescale, normalise.

    The steps, in transformers' image processors' order (each skipped when its field
    is None):

    1. resize to ``size`` (height, width), or so the shorter side is ``shortest_edge``
       and the longer ``int(shortest_edge * long / short)`` (CLIP);
    2. crop ``crop_size`` (height, width) from the centre (top ``(H - h) // 2``,
       left ``(W - w) // 2``);
    3. multiply by ``rescale_factor`` (1/255: uint8 levels to [0, 1]);
    4. normalise each channel, ``(x - image_mean[c]) / image_std[c]``.

    Attributes
    ----------
    size : (height, width) or None.
    shortest_edge : int or None; at most one of ``size`` and ``shortest_edge``.
    crop_size : (height, width) or None.
    resample : one of :data:`RESAMPLES`.
    rescale_factor : float or None.
    image_mean, image_std : one float per channel, both or neither.

    The default resizes nothing and maps uint8 levels to [0, 1] (the native
    encoder's input).
    """

    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop_size: tuple[int, int] | None = None
    resample: str = "bicubic"
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    def __post_init__(self):
        # Lists (a config read back from JSON) become tuples, so a round trip compares equal.
        for name in ("size", "crop_size", "image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("size", "crop_size"):
            value = getattr(self, name)
            if value is not None and not (len(value) == 2 and all(map(_positive_int, value))):
                raise ValueError(f"{name} must be None or (height, width) ints, got {value!r}")
        if self.shortest_edge is not None and not _positive_int(self.shortest_edge):
            raise ValueError(
                f"shortest_edge must be None or a positive int, got {self.shortest_edge!r}"
            )
        if self.size is not None and self.shortest_edge is not None:
            raise ValueError("at most one of size and shortest_edge may be set")
        if self.resample not in RESAMPLES:
            raise ValueError(f"resample must be one of {RESAMPLES}, got {self.resample!r}")
        if self.rescale_factor is not None and not isinstance(self.rescale_factor, (int, float)):
            raise ValueError(
                f"rescale_factor must be None or a number, got {self.rescale_factor!r}"
            )
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("image_mean and image_std must be given together")
        if self.image_std is not None:
            if len(self.image_mean) != len(self.image_std):
                raise ValueError(
                    f"image_mean has {len(self.image_mean)} channels, image_std "
                    f"{len(self.image_std)}"
                )
            if any(std <= 0 for std in self.image_std):
                raise ValueError(f"image_std must be positive, got {self.image_std!r}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the pixel values for an input of ``height`` x ``width``."""
        size = self.resized_size(height, width)
        return size if self.crop_size is None else self.crop_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after step 1 (transformers' shortest-edge rule, truncating)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        if height <= width:
            return self.shortest_edge, new_long
        return new_long, self.shortest_edge


@dataclass(frozen=True)
class VisionEncoderConfig:
    """Everything a :class:`VisionEncoder` computes, as JSON-able configuration.

    ``dataclasses.asdict(config)`` is JSON; ``VisionEncoderConfig(**d)`` rebuilds it
    (the nested ``architecture`` and ``preprocessing`` dicts are converted back).

    Attributes
    ----------
    image_size : S (square images); a multiple of ``patch_size``.
    image_channels : C.
    patch_size : p; each image gives ``(S // p) ** 2`` patches, in raster order.
    dim, num_layers, num_heads : the transformer's width, depth and heads.
    mlp_hidden : the MLP width (default ``4 * dim``).
    architecture : the blocks (a BlockArchitecture with positions "none": the
        embeddings hold the positions). Its ``final_norm`` is the norm on the last
        hidden state (ViT's layernorm, SigLIP's post_layernorm; CLIP has none: its
        post_layernorm is applied to the pooled class row only).
    patch_bias : the patch embedding's bias (CLIP has none).
    class_token : a learned row in front of each image's patches (ViT, CLIP).
    pre_norm : a norm on the embeddings before the first block (CLIP's pre_layrnorm).
    preprocessing : how :meth:`VisionEncoder.preprocess` makes pixel values (default
        :class:`ImagePreprocessing` resizing to ``(S, S)``).
    """

    image_size: int
    image_channels: int
    patch_size: int
    dim: int
    num_layers: int
    num_heads: int
    mlp_hidden: int | None = None
    architecture: BlockArchitecture = field(
        default_factory=lambda: BlockArchitecture(positions="none")
    )
    patch_bias: bool = True
    class_token: bool = False
    pre_norm: bool = False
    preprocessing: ImagePreprocessing | None = None

    def __post_init__(self):
        for name in ("image_size", "image_channels", "patch_size", "dim", "num_layers"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("num_heads", self.num_heads)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", 4 * self.dim)  # TransformerStack's default
        _check_positive_int("mlp_hidden", self.mlp_hidden)
        object.__setattr__(self, "architecture", self._architecture())
        object.__setattr__(self, "preprocessing", self._preprocessing())
        for name in ("patch_bias", "class_token", "pre_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _architecture(self) -> BlockArchitecture:
        value = self.architecture
        if isinstance(value, dict):
            value = BlockArchitecture(**value)
        if not isinstance(value, BlockArchitecture):
            raise TypeError(
                "architecture must be a BlockArchitecture (or its dict), got "
                f"{type(value).__name__}"
            )
        if value.positions != "none":
            raise ValueError(
                f"architecture.positions must be 'none' (the vision embeddings hold the "
                f"positions), got {value.positions!r}"
            )
        return value

    def _preprocessing(self) -> ImagePreprocessing:
        value = self.preprocessing
        if value is None:
            value = ImagePreprocessing(size=(self.image_size, self.image_size))
        elif isinstance(value, dict):
            value = ImagePreprocessing(**value)
        if not isinstance(value, ImagePreprocessing):
            raise TypeError(
                f"preprocessing must be an ImagePreprocessing (or its dict), got "
                f"{type(value).__name__}"
            )
        if value.image_mean is not None and len(value.image_mean) != self.image_channels:
            raise ValueError(
                f"preprocessing.image_mean has {len(value.image_mean)} values but "
                f"image_channels is {self.image_channels}"
            )
        # A fixed output size must be the model's; a shortest-edge resize alone is checked
        # per call (it depends on the input's aspect ratio).
        fixed = value.crop_size or value.size
        square = (self.image_size, self.image_size)
        if fixed is not None and tuple(fixed) != square:
            name = "crop_size" if value.crop_size else "size"
            raise ValueError(
                f"preprocessing.{name} {tuple(fixed)} must be (image_size, image_size) = {square}"
            )
        return value

    @property
    def final_norm(self) -> bool:
        """Whether a norm follows the last block (``architecture.final_norm``)."""
        return self.architecture.final_norm

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """P: rows per image, the patches and the class token where there is one."""
        return self.num_patches + int(self.class_token)


class VisionEncoder(nn.Module):
    """ViT over packed patches: ``forward(images [I, C, S, S]) -> [I * P, dim]``.

    Parameters
    ----------
    image_size, image_channels, patch_size, dim, num_layers, num_heads : as
        :class:`VisionEncoderConfig`.
    mlp_kind : the MLP of the default architecture (any of BlockArchitecture's).
    mlp_hidden, architecture, patch_bias, class_token, pre_norm, preprocessing : as
        :class:`VisionEncoderConfig` (``mlp_kind`` must agree with an ``architecture``).
    backend : span_attention backend.

    Rows ``i * P ... (i + 1) * P - 1`` of the output belong to image ``i`` (the class
    row first, where there is one). ``I = 0`` gives ``[0, dim]``. ``config`` holds the
    :class:`VisionEncoderConfig`; :meth:`from_config` builds from one (or from a
    MetaLMConfig).
    """

    def __init__(
        self,
        image_size: int,
        image_channels: int,
        patch_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        *,
        mlp_kind: str = "gelu",
        mlp_hidden: int | None = None,
        architecture: BlockArchitecture | dict | None = None,
        patch_bias: bool = True,
        class_token: bool = False,
        pre_norm: bool = False,
        preprocessing: ImagePreprocessing | dict | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if architecture is None:
            architecture = BlockArchitecture(positions="none", mlp_kind=mlp_kind)
        elif mlp_kind != "gelu":
            kind = (
                architecture["mlp_kind"]
                if isinstance(architecture, dict)
                else architecture.mlp_kind
            )
            if kind != mlp_kind:
                raise ValueError(f"mlp_kind {mlp_kind!r} disagrees with architecture's {kind!r}")
        config = VisionEncoderConfig(
            image_size,
            image_channels,
            patch_size,
            dim,
            num_layers,
            num_heads,
            mlp_hidden=mlp_hidden,
            architecture=architecture,
            patch_bias=patch_bias,
            class_token=class_token,
            pre_norm=pre_norm,
            preprocessing=preprocessing,
        )
        self.config = config
        self.image_size, self.image_channels = image_size, image_channels
        self.patch_size, self.dim = patch_size, dim
        self.num_patches, self.tokens_per_image = config.num_patches, config.tokens_per_image
        self.patch_embedding = nn.Linear(
            image_channels * patch_size * patch_size, dim, bias=patch_bias
        )
        if class_token:
            self.class_embedding = nn.Parameter(torch.randn(dim) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(self.tokens_per_image, dim) * 0.02)
        if pre_norm:
            self.pre_norm = make_norm(config.architecture, dim)
        self.transformer = TransformerStack(
            dim,
            num_layers,
            num_heads,
            mlp_hidden=config.mlp_hidden,
            architecture=config.architecture,
            backend=backend,
        )

    @classmethod
    def from_config(cls, config, *, backend: str | None = None) -> VisionEncoder:
        """The encoder a :class:`VisionEncoderConfig` describes, or the native one a
        MetaLMConfig does (its ``image_*``, ``patch_size``, ``vision_*``, ``mlp_kind``
        and ``backend``). ``backend`` overrides the MetaLMConfig's (default "auto")."""
        if isinstance(config, VisionEncoderConfig):
            fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
            return cls(**fields, backend=backend or "auto")
        return cls(
            config.image_size,
            config.image_channels,
            config.patch_size,
            config.vision_dim,
            config.vision_layers,
            config.vision_heads,
            mlp_kind=config.mlp_kind,
            backend=backend or config.backend,
        )

    def check_images(self, images: torch.Tensor) -> None:
        """Raise (naming ``images``) unless it is a float [I, C, S, S] tensor as configured."""
        expected = (self.image_channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor [I, C, H, W], got {type(images).__name__}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be a floating tensor, got dtype {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [I, C, H, W] = [I, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(image_channels, image_size, image_size of the config), got shape "
                f"{tuple(images.shape)}; preprocess() resizes raw images"
            )

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[I, C, S, S] -> [I * n, C * p * p]: raster-order patches (n per image), each
        flattened (C, py, px), the order of a Conv2d weight's [C, p, p]."""
        count, channels = images.shape[0], self.image_channels
        side, patch = self.image_size // self.patch_size, self.patch_size
        grid = images.reshape(count, channels, side, patch, side, patch)
        return grid.permute(0, 2, 4, 1, 3, 5).reshape(count * side * side, channels * patch * patch)

    def cu_seqlens(self, num_images: int, device) -> torch.Tensor:
        """int64 [I + 1]: image ``i`` holds packed rows ``[i * P, (i + 1) * P)``."""
        return torch.arange(num_images + 1, device=device) * self.tokens_per_image

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[I, C, S, S] -> [I, P, dim]: patch embeddings (after the class row, if any)
        plus positions, through the pre norm if there is one."""
        self.check_images(images)
        count = images.shape[0]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(
            self.patchify(images.to(device=weight.device, dtype=weight.dtype))
        ).view(count, self.num_patches, self.dim)
        if self.config.class_token:
            cls_rows = self.class_embedding.to(patches.dtype).expand(count, 1, self.dim)
            patches = torch.cat((cls_rows, patches), dim=1)
        hidden = patches + self.position_embedding
        return self.pre_norm(hidden) if self.config.pre_norm else hidden

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(images)
        count = hidden.shape[0]
        hidden = hidden.reshape(count * self.tokens_per_image, self.dim)
        mask = SpanMask.bidirectional(self.cu_seqlens(count, hidden.device))
        return self.transformer(hidden, mask)

    def last_hidden_state(self, images: torch.Tensor) -> torch.Tensor:
        """[I, C, S, S] -> [I, P, dim]: :meth:`forward`'s rows per image (transformers'
        ``last_hidden_state`` layout)."""
        packed = self(images)
        return packed.view(-1, self.tokens_per_image, self.dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images -> pixel values [I, C, S, S], as ``config.preprocessing`` says.

        ``images``: [I, C, H0, W0], uint8, or floating on the same 0..255 scale (the
        rescale step maps levels to [0, 1]; pass ``rescale_factor=None`` in the config
        for images already in [0, 1]). Float64 input stays float64, any other dtype
        becomes float32.

        Resizing is ``F.interpolate`` with ``antialias=True`` (bilinear, bicubic;
        nearest: "nearest-exact"): the filters of PIL's resize, which transformers'
        image processors call (bicubic with PIL's a = -0.5, widened by the scale when
        shrinking), in PIL's two passes (width, then height). A uint8 input is rounded
        to uint8 levels and clamped to 0..255 after each pass, as PIL stores them;
        a float input is not rounded (PIL would be given it as uint8). PIL computes
        in 8-bit fixed point, so a pixel may still differ from transformers' by one
        level, ``rescale_factor / image_std`` after normalising (measured: bicubic
        equal, bilinear one level at a few percent of the pixels).
        """
        pre = self.config.preprocessing
        pixels = _resize(images, pre, self.image_channels)
        height, width = images.shape[-2:]
        if pre.crop_size is not None:
            pixels = _center_crop(pixels, pre.crop_size)
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"preprocessing gives {tuple(pixels.shape[-2:])} pixel values from images "
                f"{height} x {width}, not (image_size, image_size) = "
                f"{(self.image_size, self.image_size)}; resize them first or set crop_size"
            )
        if pre.rescale_factor is not None:
            pixels = pixels * pre.rescale_factor
        if pre.image_mean is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(pre.image_mean, dtype=pixels.dtype, device=pixels.device)
            std = torch.tensor(pre.image_std, dtype=pixels.dtype, device=pixels.device)
            pixels = (pixels - mean.view(shape)) / std.view(shape)
        return pixels


def _resize(images: torch.Tensor, pre: ImagePreprocessing, channels: int) -> torch.Tensor:
    """Step 1 of :class:`ImagePreprocessing`, in float, as PIL resamples: the width
    first, then the height, a uint8 input's levels rounded and clamped after each pass."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor [I, C, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(
            f"images must be [I, C, H, W] with C = image_channels = {channels}, got shape "
            f"{tuple(images.shape)}"
        )
    if not (images.dtype == torch.uint8 or images.dtype.is_floating_point):
        raise TypeError(f"images must be uint8 or floating, got dtype {images.dtype}")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    pixels = images.to(dtype)
    height, width = images.shape[-2:]
    size = pre.resized_size(height, width)
    if images.shape[0] == 0:
        return pixels.new_zeros(*images.shape[:2], *size)
    mode = _INTERPOLATE_MODES[pre.resample]
    # Two separable passes, as PIL's: with 8-bit images PIL stores the width pass as uint8
    # levels, which clips a bicubic overshoot before the height pass; one 2-D pass would
    # differ by several levels there. An unchanged side is skipped (PIL copies it).
    for pass_size in ((height, size[1]), size):
        if tuple(pass_size) == tuple(pixels.shape[-2:]):
            continue
        antialias = mode != "nearest-exact"  # antialias exists for (bi)linear and bicubic
        pixels = F.interpolate(pixels, size=pass_size, mode=mode, antialias=antialias)
        if images.dtype == torch.uint8:
            pixels = pixels.round().clamp_(0, 255)
    return pixels


def _center_crop(pixels: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    if crop[0] > height or crop[1] > width:
        raise ValueError(
            f"preprocessing.crop_size {tuple(crop)} is larger than the resized images "
            f"({height}, {width})"
        )
    top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
    return pixels[..., top : top + crop[0], left : left + crop[1]]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive_int(name: str, value) -> None:
    if not _positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
