"""Loading BERT, RoBERTa and ELECTRA encoders from ``save_pretrained`` directories.

:func:`load_text_encoder` reads config.json and the safetensors weights of a
BertModel / BertForMaskedLM / BertForPreTraining (model_type "bert"), RobertaModel /
RobertaForMaskedLM ("roberta") or ElectraModel / ElectraForPreTraining /
ElectraForMaskedLM ("electra") and returns a
:class:`~metalm_fast.models.text_encoder.TextEncoder` that computes the model's
``last_hidden_state`` over packed sequences, every token of type 0.

Weights are mapped name by name, and every tensor is accounted for:

- the encoder's own tensors, with or without the model-type prefix ("bert.",
  "roberta.", "electra.") that the task models put before them, each checked for
  presence and shape; transformers' separate query / key / value Linears become the
  rows ``[q | k | v]`` of the fused qkv projection;
- heads the encoder does not compute, ignored on purpose: the pooler (``pooler.*``),
  the masked-LM and pretraining heads (``cls.*``, ``lm_head.*``,
  ``generator_predictions.*``, ``generator_lm_head.*``), ELECTRA's discriminator head
  (``discriminator_predictions.*``), and the ``embeddings.position_ids`` /
  ``embeddings.token_type_ids`` buffers that old checkpoints saved (an arange and
  zeros: nothing learned);
- anything else raises HFFormatError naming the tensor.

Old checkpoints' ``LayerNorm.gamma`` / ``LayerNorm.beta`` are read as
``LayerNorm.weight`` / ``LayerNorm.bias``, as transformers renames them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from metalm_fast.hf.files import HFFormatError, read_config, read_tensors
from metalm_fast.models.text_encoder import BERT_ARCHITECTURE, TextEncoder, TextEncoderConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "load_text_encoder", "text_encoder_config"]

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "electra")

#: transformers' hidden_act -> the MLP kind computing the same function.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
}

#: TextEncoderConfig field -> (config.json field, the config class's default or None:
#: required). save_pretrained always writes these.
_SIZE_FIELDS = {
    "vocab_size": ("vocab_size", None),
    "dim": ("hidden_size", None),
    "num_layers": ("num_hidden_layers", None),
    "num_heads": ("num_attention_heads", None),
    "mlp_hidden": ("intermediate_size", None),
    "max_positions": ("max_position_embeddings", 512),
    "type_vocab_size": ("type_vocab_size", 2),
}
#: The config classes' defaults, for fields a config.json may leave out.
_DEFAULT_PAD = {"bert": 0, "roberta": 1, "electra": 0}
_DEFAULT_ELECTRA_EMBEDDING_SIZE = 128

#: Tensors outside the encoder's computation (see the module docstring).
IGNORED_HEADS = (
    "pooler.",
    "cls.",
    "lm_head.",
    "generator_predictions.",
    "generator_lm_head.",
    "discriminator_predictions.",
)
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

TOKENIZER_FILE = "tokenizer.json"


def load_text_encoder(path, dtype: torch.dtype | None = None) -> TextEncoder:
    """A TextEncoder with the weights of the BERT / RoBERTa / ELECTRA directory ``path``.

    Parameters
    ----------
    path : a ``save_pretrained`` directory: config.json and model.safetensors (or shards
        with model.safetensors.index.json).
    dtype : cast the floating weights to it; default: as stored.

    Returns
    -------
    TextEncoder
        ``encoder(input_ids [N], cu_seqlens [S + 1]) -> [N, hidden_size]``, each packed
        sequence equal to the model's ``last_hidden_state`` for it alone. Its
        ``tokenizer_file`` is ``path/tokenizer.json`` where that file exists.

    Raises
    ------
    HFFormatError
        An unsupported model_type, config field (relative position embeddings, a
        decoder, an activation the MLP does not compute) or a missing, misshapen or
        unexpected tensor, named in the message.
    """
    config_json = read_config(path)
    config = text_encoder_config(config_json)
    tensors = read_tensors(path, dtype)
    state = _state_dict(config, config_json["model_type"], tensors)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        encoder = TextEncoder(config)
    encoder.load_state_dict(state, strict=True, assign=True)
    tokenizer = Path(path) / TOKENIZER_FILE
    encoder.tokenizer_file = str(tokenizer) if tokenizer.is_file() else None
    return encoder


def text_encoder_config(config_json: dict) -> TextEncoderConfig:
    """The TextEncoderConfig of a BERT / RoBERTa / ELECTRA config.json (parsed)."""
    model_type = config_json.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(
            f"config.json: model_type {model_type!r} is not a supported text encoder "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    _refuse_unsupported(config_json)
    sizes = {
        ours: _int_field(config_json, theirs, default)
        for ours, (theirs, default) in _SIZE_FIELDS.items()
    }
    if model_type == "electra":
        width = _int_field(config_json, "embedding_size", _DEFAULT_ELECTRA_EMBEDDING_SIZE)
        sizes["embedding_size"] = None if width == sizes["dim"] else width
    hidden_act = config_json.get("hidden_act", "gelu")
    if hidden_act not in ACTIVATIONS:
        raise HFFormatError(
            f"config.json: hidden_act {hidden_act!r} is not supported "
            f"(supported: {', '.join(ACTIVATIONS)})"
        )
    eps = config_json.get("layer_norm_eps", 1e-12)
    try:  # the dataclasses check the values; their messages name the field
        architecture = dataclasses.replace(
            BERT_ARCHITECTURE, norm_eps=eps, mlp_kind=ACTIVATIONS[hidden_act]
        )
        return TextEncoderConfig(
            **sizes,
            position_style="roberta" if model_type == "roberta" else "bert",
            embedding_norm_eps=eps,
            pad_token_id=config_json.get("pad_token_id", _DEFAULT_PAD[model_type]),
            architecture=architecture,
        )
    except (TypeError, ValueError) as error:
        raise HFFormatError(f"config.json: {error}") from None


def _refuse_unsupported(config_json: dict) -> None:
    """Config fields that make the model compute something the TextEncoder does not."""
    position_type = config_json.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise HFFormatError(
            f"config.json: position_embedding_type {position_type!r} is not supported "
            "(only 'absolute' position embeddings)"
        )
    for name in ("is_decoder", "add_cross_attention"):
        if config_json.get(name, False):
            raise HFFormatError(
                f"config.json: {name} is true; only a bidirectional encoder can be loaded"
            )


def _int_field(config_json: dict, name: str, default: int | None = None) -> int:
    value = config_json.get(name, default)
    if value is None:
        raise HFFormatError(f"config.json: field {name!r} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise HFFormatError(f"config.json: field {name!r} must be an int, got {value!r}")
    return value


# ---------------------------------------------------------------------------- weights
def _state_dict(
    config: TextEncoderConfig, model_type: str, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The TextEncoder's state dict from the directory's tensors, every one accounted for."""
    found = _encoder_names(model_type, tensors)
    state, used = {}, set()
    for ours, (sources, shape) in _tensor_plan(config).items():
        parts = []
        for source in sources:
            if source not in found:
                raise HFFormatError(
                    f"tensor {_full_name(model_type, tensors, source)!r} is missing "
                    f"(expected shape {list(shape)})"
                )
            original = found[source]
            tensor = tensors[original]
            if tuple(tensor.shape) != shape:
                raise HFFormatError(
                    f"tensor {original!r} has shape {list(tensor.shape)}, expected {list(shape)} "
                    "from config.json"
                )
            parts.append(tensor)
            used.add(source)
        state[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)  # fused qkv: [q | k | v]
    for name, original in found.items():
        if name not in used and not _ignored(name):
            raise HFFormatError(
                f"unexpected tensor {original!r}: not part of a {model_type} encoder "
                "(nor a pooler or an MLM / pretraining head, which are ignored)"
            )
    return state


def _encoder_names(model_type: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each tensor's name as the bare encoder would call it -> its name in the files.

    Task models put the encoder under "<model_type>." and their heads beside it; a
    bare model has no prefix. Legacy LayerNorm.gamma / .beta read as .weight / .bias.
    """
    prefix = f"{model_type}."
    prefixed = any(name.startswith(prefix) for name in tensors)
    names: dict[str, str] = {}
    for original in tensors:
        name = original[len(prefix) :] if prefixed and original.startswith(prefix) else original
        name = _legacy_rename(name)
        if name in names:
            raise HFFormatError(
                f"tensors {names[name]!r} and {original!r} are both the encoder's {name!r}"
            )
        names[name] = original
    return names


def _legacy_rename(name: str) -> str:
    for old, new in (
        (".LayerNorm.gamma", ".LayerNorm.weight"),
        (".LayerNorm.beta", ".LayerNorm.bias"),
    ):
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def _full_name(model_type: str, tensors: dict[str, torch.Tensor], name: str) -> str:
    """A missing tensor's name as the files would spell it (prefixed where they are)."""
    prefix = f"{model_type}."
    return prefix + name if any(n.startswith(prefix) for n in tensors) else name


def _ignored(name: str) -> bool:
    return name.startswith(IGNORED_HEADS) or name in IGNORED_BUFFERS


def _tensor_plan(config: TextEncoderConfig) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Our tensor name -> (the transformers names concatenated into it, each one's shape)."""
    width, dim, hidden = config.width, config.dim, config.mlp_hidden or 4 * config.dim
    embeddings = {  # ours: (theirs, rows); present where the config has the table
        "word_embeddings": ("word_embeddings", config.vocab_size),
        "position_embeddings": ("position_embeddings", config.max_positions),
        "token_type_embeddings": ("token_type_embeddings", config.type_vocab_size),
    }
    plan = {
        f"{ours}.weight": ([f"embeddings.{theirs}.weight"], (rows, width))
        for ours, (theirs, rows) in embeddings.items()
        if rows
    }
    if config.embedding_norm_eps is not None:
        for kind in ("weight", "bias"):
            plan[f"embedding_norm.{kind}"] = ([f"embeddings.LayerNorm.{kind}"], (width,))
    if width != dim:  # ELECTRA
        plan["embedding_project.weight"] = (["embeddings_project.weight"], (dim, width))
        plan["embedding_project.bias"] = (["embeddings_project.bias"], (dim,))
    for layer in range(config.num_layers):
        plan.update(_layer_plan(layer, dim, hidden))
    return plan


def _layer_plan(layer: int, dim: int, hidden: int) -> dict[str, tuple[list[str], tuple]]:
    """One BertLayer's tensors -> its TransformerBlock's. Post-norm: attention_norm is
    the norm after attention (BERT's attention.output.LayerNorm), mlp_norm the one after
    the MLP (output.LayerNorm)."""
    theirs, ours = f"encoder.layer.{layer}.", f"stack.blocks.{layer}."
    attention = theirs + "attention.self."
    linears = {  # ours: (theirs, out_features of each, in_features)
        "attention.qkv": ([attention + part for part in ("query", "key", "value")], dim, dim),
        "attention.out": ([theirs + "attention.output.dense"], dim, dim),
        "mlp.up": ([theirs + "intermediate.dense"], hidden, dim),
        "mlp.down": ([theirs + "output.dense"], dim, hidden),
    }
    norms = {
        "attention_norm": theirs + "attention.output.LayerNorm",
        "mlp_norm": theirs + "output.LayerNorm",
    }
    plan = {}
    for name, (sources, out_features, in_features) in linears.items():
        plan[f"{ours}{name}.weight"] = (
            [f"{s}.weight" for s in sources],
            (out_features, in_features),
        )
        plan[f"{ours}{name}.bias"] = ([f"{s}.bias" for s in sources], (out_features,))
    for name, source in norms.items():
        for kind in ("weight", "bias"):
            plan[f"{ours}{name}.{kind}"] = ([f"{source}.{kind}"], (dim,))
    return plan
