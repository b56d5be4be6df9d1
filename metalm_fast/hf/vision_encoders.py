"""load_vision_encoder: a ViT, CLIP or SigLIP vision directory -> a VisionEncoder.

Directories (``save_pretrained``'s format) whose config.json has ``model_type``

| model_type | model | vision tensors |
|---|---|---|
| "vit" | ViTModel (or a ViTFor... head model) | unprefixed, or under "vit." |
| "clip_vision_model" | CLIPVisionModel | unprefixed, or under "vision_model." |
| "clip" | CLIPModel: its ``vision_config`` | under "vision_model." |
| "siglip_vision_model" | SiglipVisionModel | unprefixed, or under "vision_model." |
| "siglip" | SiglipModel: its ``vision_config`` | under "vision_model." |

load into a :class:`~metalm_fast.models.vision.VisionEncoder` (patch bias,
class token, pre norm and final norm set per family; see models/vision.py),
wrapped in a :class:`PretrainedVisionEncoder` whose ``forward(pixel_values [I,
C, S, S]) -> [I, P, D]`` is transformers' ``last_hidden_state`` (the class row
first for ViT and CLIP), with ``tokens_per_image == P``.

Weights: the Conv2d patch weight ``[D, C, p, p]`` is the patch Linear's weight
reshaped to ``[D, C * p * p]`` (patchify flattens each patch in (C, py, px)
order, the conv kernel's, and orders patches in raster order, the conv output's
``flatten(2)``); q, k and v are concatenated into the fused qkv projection.

Tensors not read, by design (they do not enter ``last_hidden_state``):
ViT's ``pooler.*`` (the tanh pooler) and ``embeddings.mask_token`` (masked image
modelling's input only); CLIP's ``post_layernorm.*`` (transformers applies it
to the pooled class row only); SigLIP's ``head.*`` (the attention-pooling
head); ``embeddings.position_ids`` (an arange buffer older checkpoints kept);
and, where the vision tensors sit under a prefix, every tensor outside it (the
text tower, projections, logit scale and bias, classifier heads). Any other
tensor, a missing tensor or a tensor of the wrong shape is an HFFormatError
naming it.

Config fields read: ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``intermediate_size``, ``hidden_act`` (gelu,
gelu_python; quick_gelu; gelu_pytorch_tanh, gelu_new and gelu_fast, one
function computed in different rounding; relu; silu, swish), ``layer_norm_eps``,
``image_size`` and ``patch_size`` (an int or a square pair), ``num_channels``,
``head_dim`` (if given), ViT's ``qkv_bias``; a field left out takes the
transformers config class's default. Dropout rates are not read (they act in
training only; the loaded encoder has no dropout), nor are fields of parts it
does not load (ViT's pooler and ``encoder_stride``, CLIP's ``projection_dim``,
SigLIP's ``vision_use_head``). Only the configured resolution is encoded
(transformers' ``interpolate_pos_encoding`` is not offered): a resize to
``image_size`` is :meth:`PretrainedVisionEncoder.preprocess`'s job, set from the
directory's preprocessor_config.json (metalm_fast.hf.image_processing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metalm_fast.hf.files import HFFormatError, read_config, read_tensors
from metalm_fast.hf.image_processing import read_preprocessing
from metalm_fast.models.vision import VisionEncoder, VisionEncoderConfig
from metalm_fast.nn.architecture import BlockArchitecture

__all__ = ["MODEL_TYPES", "PretrainedVisionEncoder", "load_vision_encoder"]


@dataclass(frozen=True)
class _Family:
    """What one model family's vision tower computes, and where its tensors are."""

    name: str
    class_token: bool
    patch_bias: bool
    pre_norm: bool
    final_norm: bool
    defaults: dict  # the transformers config class's defaults of the fields read
    ignored: tuple[str, ...]  # tensor name prefixes (inside the vision prefix) not read


_COMMON_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "num_channels": 3,
}
_VIT = _Family(
    "vit",
    class_token=True,
    patch_bias=True,
    pre_norm=False,
    final_norm=True,
    defaults={
        **_COMMON_DEFAULTS,
        "patch_size": 16,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "qkv_bias": True,
    },
    ignored=("pooler.", "embeddings.mask_token"),
)
_CLIP = _Family(
    "clip",
    class_token=True,
    patch_bias=False,
    pre_norm=True,
    final_norm=False,
    defaults={**_COMMON_DEFAULTS, "patch_size": 32, "hidden_act": "quick_gelu"}
    | {"layer_norm_eps": 1e-5},
    ignored=("post_layernorm.", "embeddings.position_ids"),
)
_SIGLIP = _Family(
    "siglip",
    class_token=False,
    patch_bias=True,
    pre_norm=False,
    final_norm=True,
    defaults={**_COMMON_DEFAULTS, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh"}
    | {"layer_norm_eps": 1e-6},
    ignored=("head.", "embeddings.position_ids"),
)

#: model_type -> (family, the vision config is the nested "vision_config", tensor prefixes
#: to try in order).
MODEL_TYPES = {
    "vit": (_VIT, False, ("", "vit.")),
    "clip_vision_model": (_CLIP, False, ("", "vision_model.")),
    "clip": (_CLIP, True, ("vision_model.",)),
    "siglip_vision_model": (_SIGLIP, False, ("", "vision_model.")),
    "siglip": (_SIGLIP, True, ("vision_model.",)),
}

_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


class PretrainedVisionEncoder(nn.Module):
    """A loaded vision tower: ``forward(pixel_values [I, C, S, S]) -> [I, P, D]``.

    The output is transformers' ``last_hidden_state`` for the same pixel values.

    Attributes
    ----------
    encoder : the :class:`~metalm_fast.models.vision.VisionEncoder` holding the
        weights; its own forward gives the packed ``[I * P, D]`` rows MetaLM's
        vision connector reads, so it is the module to dock as a MetaLM's
        ``vision_encoder``.
    family : "vit", "clip" or "siglip".
    config : the encoder's VisionEncoderConfig (JSON via ``dataclasses.asdict``).
    tokens_per_image : P (patches, plus the class row for ViT and CLIP).
    """

    def __init__(self, encoder: VisionEncoder, family: str):
        super().__init__()
        self.encoder = encoder
        self.family = family

    @property
    def config(self) -> VisionEncoderConfig:
        return self.encoder.config

    @property
    def tokens_per_image(self) -> int:
        return self.encoder.tokens_per_image

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images [I, C, H0, W0] -> pixel_values, as the directory's image processor
        (see :meth:`VisionEncoder.preprocess`)."""
        return self.encoder.preprocess(images)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder.last_hidden_state(pixel_values)


def load_vision_encoder(path, dtype: torch.dtype | None = None) -> PretrainedVisionEncoder:
    """The ViT / CLIP / SigLIP vision tower saved in the directory ``path``.

    ``dtype``: cast the floating weights to it (default: as stored). Raises
    HFFormatError naming the config field, file or tensor that cannot be loaded.
    """
    raw = read_config(path)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFFormatError(
            f"{Path(path) / 'config.json'}: model_type {model_type!r} is not a vision "
            f"encoder this loads ({', '.join(MODEL_TYPES)})"
        )
    family, nested, prefixes = MODEL_TYPES[model_type]
    where = f"{Path(path) / 'config.json'}" + (" vision_config" if nested else "")
    hf_config = raw.get("vision_config", {}) if nested else raw
    if not isinstance(hf_config, dict):
        raise HFFormatError(f"{where}: must be a JSON object")
    config = _encoder_config(family, hf_config, where, path)
    tensors = read_tensors(path, dtype)
    with torch.device("meta"):  # no random init: every parameter is assigned below
        encoder = VisionEncoder.from_config(config)
    state = _state_dict(family, config, tensors, prefixes, encoder, path)
    encoder.load_state_dict(state, strict=True, assign=True)
    return PretrainedVisionEncoder(encoder, family.name)


# ----------------------------------------------------------------------------- config
def _encoder_config(family: _Family, hf: dict, where: str, path) -> VisionEncoderConfig:
    def read(name: str):
        return hf.get(name, family.defaults[name])

    sizes = {
        name: _positive_int(where, name, read(name))
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_channels",
        )
    }
    image_size = _square(where, "image_size", read("image_size"))
    patch_size = _square(where, "patch_size", read("patch_size"))
    if image_size % patch_size:
        raise HFFormatError(
            f"{where}: image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
        )
    head_dim = hf.get("head_dim")
    if head_dim is None and sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise HFFormatError(
            f"{where}: hidden_size ({sizes['hidden_size']}) must be divisible by "
            f"num_attention_heads ({sizes['num_attention_heads']})"
        )
    architecture = BlockArchitecture(
        norm_eps=_positive_number(where, "layer_norm_eps", read("layer_norm_eps")),
        final_norm=family.final_norm,
        positions="none",
        qkv_bias=_qkv_bias(family, hf, where),
        out_bias=True,
        mlp_kind=_activation(where, read("hidden_act")),
        mlp_bias=True,
        head_dim=None if head_dim is None else _positive_int(where, "head_dim", head_dim),
    )
    return VisionEncoderConfig(
        image_size=image_size,
        image_channels=sizes["num_channels"],
        patch_size=patch_size,
        dim=sizes["hidden_size"],
        num_layers=sizes["num_hidden_layers"],
        num_heads=sizes["num_attention_heads"],
        mlp_hidden=sizes["intermediate_size"],
        architecture=architecture,
        patch_bias=family.patch_bias,
        class_token=family.class_token,
        pre_norm=family.pre_norm,
        preprocessing=_preprocessing(path, family, image_size, sizes["num_channels"]),
    )


def _preprocessing(path, family: _Family, image_size: int, channels: int):
    preprocessing = read_preprocessing(path, family.name, image_size, channels)
    fixed = preprocessing.crop_size or preprocessing.size
    if fixed is not None and tuple(fixed) != (image_size, image_size):
        name = "crop_size" if preprocessing.crop_size else "size"
        raise HFFormatError(
            f"{Path(path) / 'preprocessor_config.json'}: {name} {tuple(fixed)} does not give "
            f"the model's image_size {image_size}"
        )
    return preprocessing


def _qkv_bias(family: _Family, hf: dict, where: str) -> bool:
    if family.name != "vit":
        return True  # CLIP's and SigLIP's q, k, v projections always have a bias
    value = hf.get("qkv_bias", True)
    if not isinstance(value, bool):
        raise HFFormatError(f"{where}: qkv_bias must be true or false, got {value!r}")
    return value


def _activation(where: str, value) -> str:
    if value not in _ACTIVATIONS:
        raise HFFormatError(
            f"{where}: hidden_act {value!r} is not supported ({', '.join(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[value]


def _positive_int(where: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HFFormatError(f"{where}: {name} must be a positive int, got {value!r}")
    return value


def _positive_number(where: str, name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise HFFormatError(f"{where}: {name} must be a positive number, got {value!r}")
    return float(value)


def _square(where: str, name: str, value) -> int:
    """An int, or a pair of equal ints (transformers accepts both)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise HFFormatError(
                f"{where}: {name} {value!r} is not square; only square images and patches "
                "are supported"
            )
        value = value[0]
    return _positive_int(where, name, value)


# ----------------------------------------------------------------------------- tensors
def _sources(family: _Family, config: VisionEncoderConfig) -> dict[str, list[tuple[str, tuple]]]:
    """Our parameter name -> the transformers tensors (name, shape) it is made of, in
    order (concatenated along dim 0, then reshaped to the parameter's shape)."""
    dim, channels, patch = config.dim, config.image_channels, config.patch_size
    rows, hidden = config.tokens_per_image, config.mlp_hidden
    heads = config.num_heads
    inner = heads * (config.architecture.head_dim or dim // heads)
    vit = family.name == "vit"
    patch_name = "embeddings.patch_embeddings.projection" if vit else "embeddings.patch_embedding"
    sources = {"patch_embedding.weight": [(f"{patch_name}.weight", (dim, channels, patch, patch))]}
    if config.patch_bias:
        sources["patch_embedding.bias"] = [(f"{patch_name}.bias", (dim,))]
    if vit:
        sources["class_embedding"] = [("embeddings.cls_token", (1, 1, dim))]
        sources["position_embedding"] = [("embeddings.position_embeddings", (1, rows, dim))]
    else:
        if config.class_token:
            sources["class_embedding"] = [("embeddings.class_embedding", (dim,))]
        sources["position_embedding"] = [("embeddings.position_embedding.weight", (rows, dim))]
    if config.pre_norm:
        sources |= _norm("pre_norm", "pre_layrnorm", dim)
    for layer in range(config.num_layers):
        ours = f"transformer.blocks.{layer}."
        theirs = f"encoder.layer.{layer}." if vit else f"encoder.layers.{layer}."
        names = _VIT_LAYER if vit else _CLIP_LAYER
        sources |= _norm(ours + "attention_norm", theirs + names["norm1"], dim)
        sources |= _norm(ours + "mlp_norm", theirs + names["norm2"], dim)
        qkv = [theirs + names[part] for part in ("q", "k", "v")]
        sources[ours + "attention.qkv.weight"] = [(name + ".weight", (inner, dim)) for name in qkv]
        if config.architecture.qkv_bias:
            sources[ours + "attention.qkv.bias"] = [(name + ".bias", (inner,)) for name in qkv]
        sources |= _linear(ours + "attention.out", theirs + names["out"], (dim, inner))
        sources |= _linear(ours + "mlp.up", theirs + names["up"], (hidden, dim))
        sources |= _linear(ours + "mlp.down", theirs + names["down"], (dim, hidden))
    if config.final_norm:
        sources |= _norm("transformer.norm", "layernorm" if vit else "post_layernorm", dim)
    return sources


_VIT_LAYER = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "q": "attention.attention.query",
    "k": "attention.attention.key",
    "v": "attention.attention.value",
    "out": "attention.output.dense",
    "up": "intermediate.dense",
    "down": "output.dense",
}
_CLIP_LAYER = {  # CLIP's and SigLIP's encoder layers
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "out": "self_attn.out_proj",
    "up": "mlp.fc1",
    "down": "mlp.fc2",
}


def _norm(ours: str, theirs: str, dim: int) -> dict:
    return {f"{ours}.{part}": [(f"{theirs}.{part}", (dim,))] for part in ("weight", "bias")}


def _linear(ours: str, theirs: str, shape: tuple[int, int]) -> dict:
    return {
        f"{ours}.weight": [(f"{theirs}.weight", shape)],
        f"{ours}.bias": [(f"{theirs}.bias", shape[:1])],
    }


def _prefix(family: _Family, tensors: dict, prefixes: tuple[str, ...], path) -> str:
    """The prefix under which this directory keeps the vision tensors."""
    probe = "embeddings.patch_embeddings.projection.weight"
    probe = probe if family.name == "vit" else "embeddings.patch_embedding.weight"
    for prefix in prefixes:
        if prefix + probe in tensors:
            return prefix
    tried = " or ".join(repr(prefix + probe) for prefix in prefixes)
    raise HFFormatError(f"{path}: no tensor {tried} (not a {family.name} vision checkpoint?)")


def _state_dict(
    family: _Family,
    config: VisionEncoderConfig,
    tensors: dict[str, torch.Tensor],
    prefixes: tuple[str, ...],
    encoder: VisionEncoder,
    path,
) -> dict[str, torch.Tensor]:
    prefix = _prefix(family, tensors, prefixes, path)
    ours = encoder.state_dict()
    sources = _sources(family, config)
    if set(sources) != set(ours):  # a mapping out of step with the module: a bug here
        raise AssertionError(f"vision mapping differs from the module: {set(sources) ^ set(ours)}")
    used = set()
    state = {}
    for name, parts in sources.items():
        pieces = []
        for hf_name, shape in parts:
            tensor = tensors.get(prefix + hf_name)
            if tensor is None:
                raise HFFormatError(f"{path}: missing tensor {prefix + hf_name!r}")
            if tuple(tensor.shape) != shape:
                raise HFFormatError(
                    f"{path}: tensor {prefix + hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {shape} from config.json"
                )
            pieces.append(tensor)
            used.add(prefix + hf_name)
        joined = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        state[name] = joined.reshape(ours[name].shape)
    unexpected = sorted(
        name
        for name in tensors
        if name.startswith(prefix)
        and name not in used
        and not name[len(prefix) :].startswith(family.ignored)
    )
    if unexpected:
        shown = ", ".join(repr(name) for name in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise HFFormatError(
            f"{path}: unexpected tensor {shown}{more} (not part of a {family.name} vision tower)"
        )
    return state
