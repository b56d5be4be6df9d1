"""Hugging Face causal LMs -> a decoder-only MetaLM: Llama/Mistral, Qwen2, GPT-NeoX, GPT-2.

A family is one row of :data:`FAMILIES`: the ``architectures`` name its config.json
carries, one function that maps its config.json to a MetaLMConfig (the decoder's
BlockArchitecture, sizes, tied or untied head), and one :class:`WeightNames`
table saying where its tensors live. Every family's tensors map onto the same
TransformerBlock through :class:`Link`s: one of our tensors, the HF tensors it is
made of and how (stacked rows, GPT-2's transposed Conv1D, GPT-NeoX's per-head
fused qkv), in both directions, so the export (metalm_fast.hf.export) writes
through the same table it reads through.

Nothing is guessed: a config value the engine does not compute (a rope type other
than default and llama3, an activation it has no kind for, attention kinds that
differ between layers, ...), a missing or an unexpected tensor, or a tensor whose
shape disagrees with config.json raises HFFormatError naming the field or the
tensor, before any weight reaches the model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metalm_fast.hf.files import HFFormatError, read_config, read_tensors
from metalm_fast.models.metalm import MetaLM, MetaLMConfig
from metalm_fast.nn.architecture import BlockArchitecture

__all__ = [
    "FAMILIES",
    "Family",
    "check_loaded",
    "Link",
    "WeightNames",
    "family_of",
    "hf_shapes",
    "load_decoder",
    "mlp_hidden",
    "to_hf",
    "to_ours",
    "weight_links",
]

_REQUIRED = object()

#: HF activation names of ungated MLPs -> our MLP kinds (transformers' ACT2FN: "gelu" is
#: the exact erf form, "gelu_new" and "gelu_pytorch_tanh" the tanh approximation).
UNGATED_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
#: Llama-style MLPs compute ``down(act(gate) * up)``; the engine's one gated MLP is SwiGLU.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu"}
ROPE_TYPES = ("default", "llama3")
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor")
LLAMA3_FIELDS += ("original_max_position_embeddings",)


# ----------------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    """One tensor of our state_dict and the HF tensors it is made of.

    Attributes
    ----------
    ours : our state_dict name.
    theirs : HF names; several are stacked along rows in this order (q, k, v; gate, up).
    rows : with several, each one's row count (how the export splits ours).
    transposed : stored [in, out] (GPT-2's Conv1D); ours is [out, in].
    interleaved_heads : H > 0 for GPT-NeoX's fused query_key_value, whose rows are laid
        out [H, 3, D] (per head: its q, k, v); ours are [3, H, D] (q | k | v).
    """

    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...] | None = None
    transposed: bool = False
    interleaved_heads: int = 0


def hf_shapes(link: Link, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shape of each of ``link.theirs`` when ours is ``shape``."""
    rows = link.rows or (shape[0],)
    shapes = {}
    for name, count in zip(link.theirs, rows, strict=True):
        stored = (count, *shape[1:])
        shapes[name] = stored[::-1] if link.transposed else stored
    return shapes


def _swap_leading(tensor: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """Rows grouped [first, second, rest] regrouped [second, first, rest]."""
    grouped = tensor.reshape(first, second, tensor.shape[0] // (first * second), *tensor.shape[1:])
    return grouped.transpose(0, 1).reshape(tensor.shape)


def to_ours(link: Link, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our tensor of ``link`` from the HF tensors (by name)."""
    parts = [tensors[name].t() if link.transposed else tensors[name] for name in link.theirs]
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
    if link.interleaved_heads:
        tensor = _swap_leading(tensor, link.interleaved_heads, 3)
    return tensor.contiguous()


def to_hf(link: Link, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The HF tensors of ``link`` (by name) from our tensor."""
    if link.interleaved_heads:
        tensor = _swap_leading(tensor, 3, link.interleaved_heads)
    parts = tensor.split(list(link.rows)) if link.rows else (tensor,)
    return {
        name: (part.t() if link.transposed else part).contiguous()
        for name, part in zip(link.theirs, parts, strict=True)
    }


# ----------------------------------------------------------------------------- names
@dataclass(frozen=True)
class WeightNames:
    """Where a family keeps each tensor; layer names are relative to ``layer``.

    ``qkv`` and ``mlp_up`` are one fused tensor or several stacked in order (q, k, v;
    gate, up); ``transposed``: every linear is stored [in, out]; ``interleaved_qkv``:
    the fused qkv is GPT-NeoX's per-head layout; ``ignored``: patterns of buffers some
    checkpoints carry and no model reads (causal masks, rotary tables); ``prefix``:
    the base model's prefix, which a checkpoint of the base model lacks.
    """

    prefix: str
    embedding: str
    layer: str
    attention_norm: str
    qkv: tuple[str, ...]
    out: str
    mlp_norm: str
    mlp_up: tuple[str, ...]
    mlp_down: str
    final_norm: str
    lm_head: str
    position_embedding: str | None = None
    transposed: bool = False
    interleaved_qkv: bool = False
    ignored: tuple[str, ...] = ()


LLAMA_NAMES = WeightNames(
    prefix="model.",
    embedding="model.embed_tokens",
    layer="model.layers.{i}.",
    attention_norm="input_layernorm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    out="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    mlp_up=("mlp.gate_proj", "mlp.up_proj"),
    mlp_down="mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    ignored=(r"\.rotary_emb\.inv_freq$",),
)
GPT_NEOX_NAMES = WeightNames(
    prefix="gpt_neox.",
    embedding="gpt_neox.embed_in",
    layer="gpt_neox.layers.{i}.",
    attention_norm="input_layernorm",
    qkv=("attention.query_key_value",),
    out="attention.dense",
    mlp_norm="post_attention_layernorm",
    mlp_up=("mlp.dense_h_to_4h",),
    mlp_down="mlp.dense_4h_to_h",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="embed_out",  # what save_pretrained writes (transformers 5 renames it lm_head)
    interleaved_qkv=True,
    ignored=(r"\.attention\.(bias|masked_bias)$", r"\.rotary_emb\.inv_freq$"),
)
GPT2_NAMES = WeightNames(
    prefix="transformer.",
    embedding="transformer.wte",
    layer="transformer.h.{i}.",
    attention_norm="ln_1",
    qkv=("attn.c_attn",),
    out="attn.c_proj",
    mlp_norm="ln_2",
    mlp_up=("mlp.c_fc",),
    mlp_down="mlp.c_proj",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    position_embedding="transformer.wpe",
    transposed=True,
    ignored=(r"\.attn\.(bias|masked_bias)$",),
)


def _weight(name: str) -> str:
    return f"{name}.weight"


def _linear(ours: str, theirs: list[str], bias: bool, names: WeightNames, **layout) -> list[Link]:
    weight = Link(_weight(ours), tuple(map(_weight, theirs)), transposed=names.transposed, **layout)
    if not bias:
        return [weight]
    return [weight, Link(f"{ours}.bias", tuple(f"{name}.bias" for name in theirs), **layout)]


def _norm(ours: str, theirs: str, arch: BlockArchitecture) -> list[Link]:
    links = [Link(_weight(ours), (_weight(theirs),))]
    if arch.norm == "layernorm" and arch.norm_bias:
        links.append(Link(f"{ours}.bias", (f"{theirs}.bias",)))
    return links


def mlp_hidden(config: MetaLMConfig) -> int:
    """The decoder's MLP width (TransformerStack's default: 4 * width)."""
    if config.decoder_mlp_hidden is not None:
        return config.decoder_mlp_hidden
    return int(config.decoder_dim * 4.0)


def weight_links(names: WeightNames, config: MetaLMConfig) -> list[Link]:
    """Every tensor of a decoder-only MetaLM of ``config``, linked to ``names``.

    A tied head links ``lm_head.weight`` to the embedding's HF tensor, which then
    serves both.
    """
    arch = config.decoder_architecture
    heads = config.decoder_heads
    kv_heads = config.decoder_kv_heads or heads
    head_dim = arch.head_dim or config.decoder_dim // heads
    hidden = mlp_hidden(config)
    qkv = {}
    if len(names.qkv) == 3:
        qkv["rows"] = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if names.interleaved_qkv:
        qkv["interleaved_heads"] = heads
    up = {"rows": (hidden, hidden)} if len(names.mlp_up) == 2 else {}
    links = [Link("embedding.weight", (_weight(names.embedding),))]
    if names.position_embedding is not None:
        links.append(
            Link("decoder.position_embedding.weight", (_weight(names.position_embedding),))
        )
    for i in range(config.decoder_layers):
        ours, theirs = f"decoder.blocks.{i}.", names.layer.format(i=i)
        links += _norm(ours + "attention_norm", theirs + names.attention_norm, arch)
        qkv_names = [theirs + name for name in names.qkv]
        links += _linear(ours + "attention.qkv", qkv_names, arch.qkv_bias, names, **qkv)
        links += _linear(ours + "attention.out", [theirs + names.out], arch.out_bias, names)
        links += _norm(ours + "mlp_norm", theirs + names.mlp_norm, arch)
        up_names = [theirs + name for name in names.mlp_up]
        links += _linear(ours + "mlp.up", up_names, arch.mlp_bias, names, **up)
        links += _linear(ours + "mlp.down", [theirs + names.mlp_down], arch.mlp_bias, names)
    if arch.final_norm:
        links += _norm("decoder.norm", names.final_norm, arch)
    head = names.embedding if config.tie_embeddings else names.lm_head
    links.append(Link("lm_head.weight", (_weight(head),)))
    return links


# ----------------------------------------------------------------------------- config fields
def _field(config: dict, name: str, default=_REQUIRED):
    """``config[name]``; the family's default when absent or null (as transformers reads it)."""
    value = config.get(name)
    if value is None:
        if default is _REQUIRED:
            raise HFFormatError(f"config.json: the field {name!r} is missing")
        return default
    return value


def _refuse(name: str, value, why: str) -> HFFormatError:
    return HFFormatError(f"config.json: {name}={value!r} is not supported: {why}")


def _require(config: dict, name: str, needed, default, why: str) -> None:
    value = _field(config, name, default)
    if value != needed:
        raise _refuse(name, value, why)


def _activation(config: dict, name: str, default: str, table: dict[str, str]) -> str:
    value = _field(config, name, default)
    if value not in table:
        raise _refuse(
            name, value, f"the engine's MLP kinds here take {', '.join(map(repr, table))}"
        )
    return table[value]


@dataclass(frozen=True)
class Rope:
    """A config's rotary: base, fraction of each head rotated, scaling (None: default)."""

    base: float
    fraction: float
    scaling: dict | None


def _rope(config: dict, *, base_field: str, fraction_field: str, fraction: float) -> Rope:
    """Rotary base, rotated fraction and scaling, from transformers 5's ``rope_parameters``
    or the older top-level fields (``rope_theta`` / ``rotary_emb_base``, ``rope_scaling``,
    ``partial_rotary_factor`` / ``rotary_pct``), resolved as transformers does: a
    non-empty rope_scaling replaces rope_parameters, and the top-level fields fill in
    what the chosen dict lacks."""
    params = config.get("rope_parameters")
    legacy = config.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", legacy)):
        if value is not None and not isinstance(value, dict):
            raise HFFormatError(f"config.json: {name} must be a dict, got {value!r}")
    merged = legacy or params or {}
    if merged and all(isinstance(value, dict) for value in merged.values()):
        raise _refuse("rope_parameters", merged, "per-layer-type rope parameters")
    base = merged.get("rope_theta", _field(config, base_field, 10000.0))
    fraction = merged.get("partial_rotary_factor", _field(config, fraction_field, fraction))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _refuse(
            "rope_parameters.rope_type", rope_type, f"the engine computes {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return Rope(float(base), float(fraction), None)
    missing = [name for name in LLAMA3_FIELDS if merged.get(name) is None]
    if missing:
        raise HFFormatError(f"config.json: rope_parameters (llama3) lacks {', '.join(missing)}")
    scaling = {"rope_type": "llama3", **{name: merged[name] for name in LLAMA3_FIELDS}}
    return Rope(float(base), float(fraction), scaling)


def _rotary_fraction(rope: Rope, head_dim: int) -> float:
    """The fraction, checked: transformers rotates ``int(head_dim * fraction)`` dims, which
    must be even and positive for the engine's rotary to turn the same planes."""
    rotated = int(head_dim * rope.fraction)
    if rotated <= 0 or rotated % 2 or rope.fraction > 1:
        raise _refuse(
            "partial_rotary_factor",
            rope.fraction,
            f"it rotates {rotated} of {head_dim} dims; the engine needs an even, positive count",
        )
    return rope.fraction


def _decoder_config(
    config: dict,
    *,
    dim: int,
    layers: int,
    heads: int,
    kv_heads: int,
    mlp_width: int,
    tie: bool,
    **architecture,
) -> MetaLMConfig:
    """A decoder-only MetaLMConfig (no text encoder, no vision encoder)."""
    try:
        arch = BlockArchitecture(**architecture)
        return MetaLMConfig(
            vocab_size=_field(config, "vocab_size"),
            decoder_dim=dim,
            decoder_layers=layers,
            decoder_heads=heads,
            decoder_kv_heads=kv_heads,
            encoder_dim=0,
            encoder_layers=0,
            encoder_heads=1,
            vision_layers=0,
            decoder_mlp_hidden=mlp_width,
            tie_embeddings=bool(tie),
            decoder_architecture=arch,
        )
    except (TypeError, ValueError) as error:
        raise HFFormatError(f"config.json: {error}") from None


# ----------------------------------------------------------------------------- families
def _gated(config: dict, *, qkv_bias: bool, out_bias: bool, mlp_bias: bool, window) -> MetaLMConfig:
    """Llama's shape, shared by Mistral and Qwen2: RMSNorm, rotary over whole heads,
    ``down(silu(gate) * up)``, GQA, an untied head unless tie_word_embeddings."""
    dim, heads = _field(config, "hidden_size"), _field(config, "num_attention_heads")
    head_dim = _field(config, "head_dim", dim // heads)
    rope = _rope(
        config, base_field="rope_theta", fraction_field="partial_rotary_factor", fraction=1
    )
    if rope.fraction != 1:
        raise _refuse(
            "partial_rotary_factor",
            rope.fraction,
            "this family rotates whole heads in transformers",
        )
    return _decoder_config(
        config,
        dim=dim,
        layers=_field(config, "num_hidden_layers"),
        heads=heads,
        kv_heads=_field(config, "num_key_value_heads", heads),
        mlp_width=_field(config, "intermediate_size"),
        tie=_field(config, "tie_word_embeddings", False),
        norm="rmsnorm",
        norm_eps=float(_field(config, "rms_norm_eps", 1e-6)),
        rotary_base=rope.base,
        rope_scaling=rope.scaling,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_kind=_activation(config, "hidden_act", "silu", GATED_ACTIVATIONS),
        mlp_bias=mlp_bias,
        head_dim=None if head_dim * heads == dim else head_dim,
        sliding_window=window,
    )


def _llama(config: dict) -> MetaLMConfig:
    bias = bool(_field(config, "attention_bias", False))  # q, k, v and o alike
    mlp_bias = bool(_field(config, "mlp_bias", False))
    return _gated(config, qkv_bias=bias, out_bias=bias, mlp_bias=mlp_bias, window=None)


def _mistral(config: dict) -> MetaLMConfig:
    window = _field(config, "sliding_window", None)
    return _gated(config, qkv_bias=False, out_bias=False, mlp_bias=False, window=window)


def _qwen2_window(config: dict) -> int | None:
    """Qwen2's window, when every layer has it: layers from max_window_layers on slide
    (or as ``layer_types`` lists them); the engine's decoder has one attention kind."""
    window = _field(config, "sliding_window", 4096) if config.get("use_sliding_window") else None
    layers = _field(config, "num_hidden_layers")
    first_sliding = _field(config, "max_window_layers", 28)
    kinds = config.get("layer_types") or [
        "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
        for i in range(layers)
    ]
    if set(kinds) == {"full_attention"}:
        return None
    if set(kinds) == {"sliding_attention"} and window is not None:
        return window
    raise _refuse(
        "layer_types",
        kinds,
        "the engine's decoder attends one way in every layer (all full_attention, or all "
        "sliding_attention with use_sliding_window and sliding_window)",
    )


def _qwen2(config: dict) -> MetaLMConfig:
    window = _qwen2_window(config)
    return _gated(config, qkv_bias=True, out_bias=False, mlp_bias=False, window=window)


def _gpt_neox(config: dict) -> MetaLMConfig:
    dim, heads = _field(config, "hidden_size"), _field(config, "num_attention_heads")
    rope = _rope(config, base_field="rotary_emb_base", fraction_field="rotary_pct", fraction=0.25)
    bias = bool(_field(config, "attention_bias", True))  # query_key_value and dense alike
    return _decoder_config(
        config,
        dim=dim,
        layers=_field(config, "num_hidden_layers"),
        heads=heads,
        kv_heads=heads,
        mlp_width=_field(config, "intermediate_size"),
        tie=_field(config, "tie_word_embeddings", False),
        norm="layernorm",
        norm_eps=float(_field(config, "layer_norm_eps", 1e-5)),
        parallel_residual=bool(_field(config, "use_parallel_residual", True)),
        rotary_base=rope.base,
        rotary_fraction=_rotary_fraction(rope, dim // heads),
        rope_scaling=rope.scaling,
        qkv_bias=bias,
        out_bias=bias,
        mlp_kind=_activation(config, "hidden_act", "gelu", UNGATED_ACTIVATIONS),
        mlp_bias=True,
    )


def _gpt2(config: dict) -> MetaLMConfig:
    _require(config, "scale_attn_weights", True, True, "the engine scales scores by 1/sqrt(D)")
    _require(
        config, "scale_attn_by_inverse_layer_idx", False, False, "scores scaled per layer index"
    )
    _require(config, "add_cross_attention", False, False, "cross-attention")
    dim = _field(config, "n_embd", 768)
    return _decoder_config(
        config,
        dim=dim,
        layers=_field(config, "n_layer", 12),
        heads=_field(config, "n_head", 12),
        kv_heads=_field(config, "n_head", 12),
        mlp_width=_field(config, "n_inner", 4 * dim),
        tie=_field(config, "tie_word_embeddings", True),
        norm="layernorm",
        norm_eps=float(_field(config, "layer_norm_epsilon", 1e-5)),
        positions="learned",
        max_positions=_field(config, "n_positions", 1024),
        qkv_bias=True,
        out_bias=True,
        mlp_kind=_activation(config, "activation_function", "gelu_new", UNGATED_ACTIVATIONS),
        mlp_bias=True,
    )


@dataclass(frozen=True)
class Family:
    """One causal-LM family: its config.json names, config reader and weight names."""

    architecture: str
    model_type: str
    read_config: Callable[[dict], MetaLMConfig]
    names: WeightNames


FAMILIES = {
    family.architecture: family
    for family in (
        Family("LlamaForCausalLM", "llama", _llama, LLAMA_NAMES),
        Family("MistralForCausalLM", "mistral", _mistral, LLAMA_NAMES),
        Family("Qwen2ForCausalLM", "qwen2", _qwen2, LLAMA_NAMES),
        Family("GPTNeoXForCausalLM", "gpt_neox", _gpt_neox, GPT_NEOX_NAMES),
        Family("GPT2LMHeadModel", "gpt2", _gpt2, GPT2_NAMES),
    )
}


def family_of(config: dict) -> Family:
    """The family of a config.json (its one ``architectures`` entry)."""
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise HFFormatError(
            f"config.json: architectures must name one model class, got {architectures!r}"
        )
    family = FAMILIES.get(architectures[0])
    if family is None:
        raise HFFormatError(
            f"config.json: architecture {architectures[0]!r} is not supported "
            f"(supported: {', '.join(FAMILIES)})"
        )
    if "quantization_config" in config:
        raise _refuse("quantization_config", config["quantization_config"], "quantized weights")
    return family


# ----------------------------------------------------------------------------- tensors
def _named(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _checked(
    tensors: dict[str, torch.Tensor],
    links: list[Link],
    state: dict[str, torch.Tensor],
    family: Family,
    path,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, every one checked present, expected and of its shape."""
    names = family.names
    ignored = [re.compile(pattern) for pattern in names.ignored]
    tensors = {n: t for n, t in tensors.items() if not any(p.search(n) for p in ignored)}
    head = _weight(names.lm_head)
    if tensors and not any(name.startswith(names.prefix) for name in tensors):
        # A checkpoint of the base model (e.g. the Hub's gpt2) has no prefix.
        tensors = {name if name == head else names.prefix + name: t for name, t in tensors.items()}
    expected: dict[str, tuple[int, ...]] = {}
    for link in links:
        expected.update(hf_shapes(link, tuple(state[link.ours].shape)))
    embedding = _weight(names.embedding)
    if head in tensors and head not in expected and embedding in tensors:
        # Some writers store a tied head anyway: it must be the embedding.
        if not torch.equal(tensors[head], tensors[embedding]):
            raise HFFormatError(
                f"{path}: tensor {head} differs from {embedding}, but tie_word_embeddings is true"
            )
        del tensors[head]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise HFFormatError(
            f"{path}: missing tensor(s) {_named(missing)} ({family.architecture} per config.json)"
        )
    unexpected = sorted(name for name in tensors if name not in expected)
    if unexpected:
        raise HFFormatError(
            f"{path}: unexpected tensor(s) {_named(unexpected)} (not part of a "
            f"{family.architecture} with this config.json)"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise HFFormatError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                f"expected {shape} from config.json"
            )
    return tensors


def check_loaded(model: MetaLM) -> None:
    """RuntimeError naming any parameter or buffer a meta-device build left unloaded."""
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # the model was built on the meta device: every tensor must have been loaded
        raise RuntimeError(f"tensors left unloaded (on the meta device): {_named(left)}")


def load_decoder(path, dtype: torch.dtype | None = None) -> MetaLM:
    """A decoder-only MetaLM from a transformers causal-LM directory.

    Parameters
    ----------
    path : a ``save_pretrained`` directory (config.json, safetensors, sharded or not) of
        a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPTNeoXForCausalLM or
        GPT2LMHeadModel.
    dtype : cast floating weights to it (default: as stored).

    Returns
    -------
    MetaLM in eval mode, ``encoder_layers=0``, ``vision_layers=0``; its ``logits`` [T, V]
    on a packed batch are the transformers model's, and ``hf_source`` (a dict:
    ``architecture``, ``model_type``, ``config``, the parsed config.json) says where it
    came from, for :func:`metalm_fast.hf.export.export_decoder`.

    Raises
    ------
    HFFormatError : an unsupported architecture or config value, a missing or unexpected
        tensor, or a shape that disagrees with config.json, named.
    """
    config = read_config(path)
    family = family_of(config)
    source = {"architecture": family.architecture, "model_type": family.model_type}
    metalm_config = dataclasses.replace(
        family.read_config(config), hf_source={**source, "config": config}
    )
    links = weight_links(family.names, metalm_config)
    try:
        with torch.device("meta"):  # no random init of weights about to be replaced
            model = MetaLM(metalm_config)
    except ValueError as error:  # sizes the blocks refuse (heads, kv heads, head_dim)
        raise HFFormatError(f"config.json: {error}") from None
    state = model.state_dict()
    tensors = _checked(read_tensors(path, dtype), links, state, family, path)
    model.load_state_dict({link.ours: to_ours(link, tensors) for link in links}, assign=True)
    if metalm_config.tie_embeddings:  # assign=True replaced the two parameters one by one
        model.lm_head.weight = model.embedding.weight
    check_loaded(model)
    return model.eval()
