"""MetaLM out: a decoder as a transformers model directory, the whole model as its own.

:func:`export_decoder` writes a decoder-only MetaLM as the ``save_pretrained``
directory of a transformers causal LM (config.json, model.safetensors,
generation_config.json, and tokenizer files when given). A model that
:func:`metalm_fast.hf.decoders.load_decoder` loaded goes back to its own family;
a native one to the first family that expresses its blocks exactly (GPT-NeoX:
the native block; then Llama, Mistral, Qwen2, GPT-2). Each family has one writer
here that checks what it can express and fills its config.json; the weights go
through the same links as loading (metalm_fast.hf.decoders), so a round trip is
bit for bit. What no family can express is refused with every family's reason.

:func:`export_metalm` / :func:`load_metalm`: any MetaLM (encoders included) as
``metalm_config.json`` (``dataclasses.asdict`` of its MetaLMConfig) and
``model.safetensors``, rebuilt exactly.

Only :func:`verify_export` imports transformers (when called).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from metalm_fast.hf.decoders import (
    FAMILIES,
    UNGATED_ACTIVATIONS,
    HFFormatError,
    check_loaded,
    mlp_hidden,
    to_hf,
    weight_links,
)
from metalm_fast.models.metalm import MetaLM, MetaLMConfig

__all__ = ["export_decoder", "export_metalm", "load_metalm", "verify_export"]

WEIGHTS_FILE = "model.safetensors"
METALM_CONFIG_FILE = "metalm_config.json"
METALM_FORMAT = "metalm_fast.MetaLM"
#: Tokenizer files a directory may hold (copied as they are).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
#: Fields of a loaded model's config.json that do not change what inference computes and
#: travel back unchanged (token ids, training-time dropout; a native model gets no dropout).
CARRIED_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "initializer_range",
    "attention_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
)
#: Our ungated MLP kinds -> the HF activation that computes exactly it.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
}
#: The order in which a native model's blocks are matched to a family.
NATIVE_ORDER = (
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPT2LMHeadModel",
)


# ----------------------------------------------------------------------------- fitting
class _Unfit(Exception):
    """A family cannot express the model; ``reasons`` say why."""

    def __init__(self, architecture: str, reasons: list[str]):
        super().__init__(f"{architecture}: {'; '.join(reasons)}")
        self.architecture, self.reasons = architecture, reasons


class _Needs:
    """Collects what a family needs of the model and the model lacks."""

    def __init__(self, architecture: str):
        self.architecture, self.unmet = architecture, []

    def __call__(self, holds: bool, what: str) -> None:
        if not holds:
            self.unmet.append(what)

    def check(self) -> None:
        if self.unmet:
            raise _Unfit(self.architecture, self.unmet)


def _sizes(config: MetaLMConfig) -> dict:
    """The size fields Llama, Mistral, Qwen2 and GPT-NeoX name alike."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.decoder_dim,
        "num_hidden_layers": config.decoder_layers,
        "num_attention_heads": config.decoder_heads,
        "intermediate_size": mlp_hidden(config),
        "tie_word_embeddings": config.tie_embeddings,
    }


def _head_dim(config: MetaLMConfig) -> int:
    return config.decoder_architecture.head_dim or config.decoder_dim // config.decoder_heads


def _pre_norm(need: _Needs, config: MetaLMConfig, norm: str) -> None:
    arch = config.decoder_architecture
    if norm == "rmsnorm":
        need(arch.norm == "rmsnorm", "RMSNorm")
    else:
        need(arch.norm == "layernorm" and arch.norm_bias, "LayerNorm with bias")
    need(not arch.post_norm, "pre-norm blocks")
    need(arch.final_norm, "a final norm")


def _rope_parameters(need: _Needs, config: MetaLMConfig, *, fraction: bool) -> dict:
    """transformers 5's rope_parameters of the decoder's rotary."""
    arch = config.decoder_architecture
    need(arch.positions == "rotary", "rotary positions")
    head_dim = _head_dim(config)
    if fraction:  # transformers rotates int(D * fraction) dims: the same planes as ours
        need(
            arch.rotary_dim(head_dim) == int(head_dim * arch.rotary_fraction),
            "an even number of rotated dims",
        )
    else:
        need(arch.rotary_dim(head_dim) == head_dim, "rotary over whole heads")
    params = {"rope_type": "default", "rope_theta": float(arch.rotary_base)}
    if arch.rope_scaling:
        params.update(arch.rope_scaling)
        params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
    if fraction:
        params["partial_rotary_factor"] = float(arch.rotary_fraction)
    return params


def _gated_fields(need: _Needs, config: MetaLMConfig) -> dict:
    """What Llama, Mistral and Qwen2 share: RMSNorm, SwiGLU, rotary over whole heads, GQA."""
    arch = config.decoder_architecture
    _pre_norm(need, config, "rmsnorm")
    need(arch.mlp_kind == "swiglu", "a SwiGLU MLP")
    need(not arch.parallel_residual, "sequential residuals")
    rope = _rope_parameters(need, config, fraction=False)
    return {
        **_sizes(config),
        "num_key_value_heads": config.decoder_kv_heads or config.decoder_heads,
        "head_dim": _head_dim(config),
        "hidden_act": "silu",
        "rms_norm_eps": arch.norm_eps,
        "rope_parameters": rope,
        # the pre-5 names of the same values, for readers that predate rope_parameters
        "rope_theta": rope["rope_theta"],
        "rope_scaling": arch.rope_scaling,
    }


def _llama(config: MetaLMConfig) -> dict:
    arch, need = config.decoder_architecture, _Needs("LlamaForCausalLM")
    fields = _gated_fields(need, config)
    need(arch.qkv_bias == arch.out_bias, "one attention_bias for q, k, v and o")
    need(arch.sliding_window is None, "no sliding window (MistralForCausalLM has one)")
    need.check()
    return {**fields, "attention_bias": arch.qkv_bias, "mlp_bias": arch.mlp_bias}


def _mistral(config: MetaLMConfig) -> dict:
    arch, need = config.decoder_architecture, _Needs("MistralForCausalLM")
    fields = _gated_fields(need, config)
    need(not (arch.qkv_bias or arch.out_bias or arch.mlp_bias), "no biases")
    need.check()
    return {**fields, "sliding_window": arch.sliding_window}


def _qwen2(config: MetaLMConfig) -> dict:
    arch, need = config.decoder_architecture, _Needs("Qwen2ForCausalLM")
    fields = _gated_fields(need, config)
    need(arch.qkv_bias and not arch.out_bias, "q, k, v biases and no o_proj bias")
    need(not arch.mlp_bias, "no MLP biases")
    need.check()
    window = arch.sliding_window
    kind = "full_attention" if window is None else "sliding_attention"
    return {
        **fields,
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": 0,
        "layer_types": [kind] * config.decoder_layers,
    }


def _ungated(need: _Needs, config: MetaLMConfig) -> str:
    arch = config.decoder_architecture
    need(arch.mlp_kind in HF_ACTIVATIONS, f"an ungated MLP ({', '.join(HF_ACTIVATIONS)})")
    need(arch.mlp_bias, "MLP biases")
    need(not config.decoder_kv_heads or config.decoder_kv_heads == config.decoder_heads, "no GQA")
    need(_head_dim(config) * config.decoder_heads == config.decoder_dim, "head_dim = width / heads")
    need(arch.sliding_window is None, "no sliding window")
    return HF_ACTIVATIONS.get(arch.mlp_kind, "")


def _gpt_neox(config: MetaLMConfig) -> dict:
    arch, need = config.decoder_architecture, _Needs("GPTNeoXForCausalLM")
    _pre_norm(need, config, "layernorm")
    activation = _ungated(need, config)
    need(arch.qkv_bias == arch.out_bias, "one attention_bias for query_key_value and dense")
    rope = _rope_parameters(need, config, fraction=True)
    need.check()
    return {
        **_sizes(config),
        "hidden_act": activation,
        "layer_norm_eps": arch.norm_eps,
        "use_parallel_residual": arch.parallel_residual,
        "attention_bias": arch.qkv_bias,
        "rope_parameters": rope,
        "rotary_pct": rope["partial_rotary_factor"],  # the pre-5 names
        "rotary_emb_base": rope["rope_theta"],
        "rope_scaling": arch.rope_scaling,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }


def _gpt2(config: MetaLMConfig) -> dict:
    arch, need = config.decoder_architecture, _Needs("GPT2LMHeadModel")
    _pre_norm(need, config, "layernorm")
    activation = _ungated(need, config)
    need(arch.positions == "learned", "learned positions")
    need(arch.qkv_bias and arch.out_bias, "attention biases")
    need(not arch.parallel_residual, "sequential residuals")
    need.check()
    return {
        "vocab_size": config.vocab_size,
        "n_embd": config.decoder_dim,
        "n_layer": config.decoder_layers,
        "n_head": config.decoder_heads,
        "n_inner": mlp_hidden(config),
        "n_positions": arch.max_positions,
        "activation_function": activation,
        "layer_norm_epsilon": arch.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


WRITERS: dict[str, Callable[[MetaLMConfig], dict]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "GPTNeoXForCausalLM": _gpt_neox,
    "GPT2LMHeadModel": _gpt2,
}


def _check_decoder_only(model) -> MetaLM:
    if not isinstance(model, MetaLM):
        raise TypeError(f"model must be a MetaLM, got {type(model).__name__}")
    config = model.config
    if config.variant != "two_stack" or model.has_text_encoder or model.has_vision_encoder:
        raise HFFormatError(
            "export_decoder writes decoder-only models (variant two_stack, encoder_layers=0, "
            f"vision_layers=0); this one has variant={config.variant!r}, "
            f"encoder_layers={config.encoder_layers}, vision_layers={config.vision_layers} "
            "(export_metalm writes any MetaLM)"
        )
    return model


def _family_config(model: MetaLM) -> tuple[str, dict]:
    """(architecture, config fields) of the family the model is written as."""
    source = model.hf_source
    candidates = (source["architecture"],) if source else NATIVE_ORDER
    reasons = []
    for architecture in candidates:
        try:
            return architecture, WRITERS[architecture](model.config)
        except _Unfit as unfit:
            reasons.append(str(unfit))
    raise HFFormatError(
        "no transformers family expresses this decoder; it lacks what each needs: "
        + " | ".join(reasons)
    )


def _activation_name(architecture: str, fields: dict, source: dict) -> None:
    """Keep the source's activation name where it computes the same kind (gelu_new)."""
    key = "activation_function" if architecture == "GPT2LMHeadModel" else "hidden_act"
    name = source.get(key)
    if key in fields and UNGATED_ACTIVATIONS.get(name) == UNGATED_ACTIVATIONS[fields[key]]:
        fields[key] = name


def _config_json(model: MetaLM, architecture: str, fields: dict) -> dict:
    source = model.hf_source or {}
    source_config = source.get("config", {})
    family = FAMILIES[architecture]
    _activation_name(architecture, fields, source_config)
    carried = {key: source_config[key] for key in CARRIED_FIELDS if key in source_config}
    if architecture != "GPT2LMHeadModel":
        carried.setdefault("max_position_embeddings", 2048)
    dtype = str(model.embedding.weight.dtype).removeprefix("torch.")
    return {
        "architectures": [architecture],
        "model_type": family.model_type,
        **fields,
        **carried,
        "dtype": dtype,
    }


def _hf_tensors(model: MetaLM, architecture: str) -> dict[str, torch.Tensor]:
    family = FAMILIES[architecture]
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for link in weight_links(family.names, model.config):
        tensors.update(to_hf(link, state[link.ours].detach().cpu()))
    if model.config.tie_embeddings and architecture == "GPTNeoXForCausalLM":
        # A copy of the tied head under embed_out, for readers that do not tie it.
        head = f"{family.names.lm_head}.weight"
        tensors[head] = tensors[f"{family.names.embedding}.weight"].clone()
    return tensors


def _generation_config(config: dict) -> dict:
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in ids if config.get(key) is not None}


def _copy_tokenizer(tokenizer, directory: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
        return
    source = Path(tokenizer)
    if source.is_file():
        shutil.copy2(source, directory / source.name)
        return
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not files:
        raise HFFormatError(
            f"tokenizer={str(tokenizer)!r}: not a tokenizer file or a directory holding one "
            f"of {', '.join(TOKENIZER_FILES)}"
        )
    for file in files:
        shutil.copy2(file, directory / file.name)


def _write_json(file: Path, value: dict) -> None:
    file.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def export_decoder(model, path, *, tokenizer=None, verify: bool = False) -> Path:
    """Write a decoder-only MetaLM as a transformers causal-LM directory.

    Parameters
    ----------
    model : a MetaLM with no text or vision encoder. One from ``load_decoder`` is written
        as its own family (Llama, Mistral, Qwen2, GPT-NeoX, GPT-2); a native one as the
        first family that computes its blocks exactly (the native block is GPT-NeoX's
        with sequential residuals).
    path : the directory (created if needed): config.json (``architectures`` and
        ``model_type``), model.safetensors, generation_config.json (when the token ids
        are known), and the tokenizer's files.
    tokenizer : None, a tokenizer file, a directory holding tokenizer files
        (tokenizer.json, tokenizer_config.json, ...), or an object with
        ``save_pretrained``.
    verify : load the directory with transformers and compare logits
        (:func:`verify_export`).

    Returns
    -------
    Path of the directory; ``AutoModelForCausalLM.from_pretrained(path)`` computes the
    MetaLM's logits, from the same weights bit for bit.

    Raises
    ------
    HFFormatError : a model with encoders, or blocks no family expresses (every family's
        reasons are given).
    """
    model = _check_decoder_only(model)
    architecture, fields = _family_config(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = _config_json(model, architecture, fields)
    save_file(_hf_tensors(model, architecture), directory / WEIGHTS_FILE, {"format": "pt"})
    _write_json(directory / "config.json", config)
    generation = _generation_config(config)
    if generation:
        _write_json(directory / "generation_config.json", generation)
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, directory)
    if verify:
        verify_export(model, directory)
    return directory


def verify_export(model: MetaLM, path, *, tokens: int = 16) -> float:
    """Max |logits difference| between ``model`` and transformers' model read from ``path``
    on one sequence of ``tokens`` ids, both in float32; HFFormatError when it exceeds
    1e-3 of the logits' scale (a fault of the export, not fp32 rounding)."""
    import transformers  # the one transformers import of loading and exporting

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=generator)
    with torch.no_grad():
        expected = reference.eval()(ids[None]).logits[0]
        got = _float_copy(model).logits(_one_sequence(ids))
    error = float((got - expected).abs().max())
    if error > 1e-3 * max(1.0, float(expected.abs().max())):
        raise HFFormatError(f"{path}: transformers' logits differ from the MetaLM's by {error:.3g}")
    return error


def _one_sequence(ids: torch.Tensor) -> SimpleNamespace:
    """A packed batch (the attributes MetaLM.logits reads) of one plain-token sequence."""
    none = torch.zeros(0, dtype=torch.int64)
    return SimpleNamespace(
        input_ids=ids,
        cu_seqlens=torch.tensor([0, ids.numel()]),
        span_starts=none,
        span_ends=none,
        encoder_ids=none,
        encoder_cu_seqlens=torch.zeros(1, dtype=torch.int64),
        feature_index=torch.full_like(ids, -1),
        images=None,
        image_index=None,
    )


def _float_copy(model: MetaLM) -> MetaLM:
    """``model`` itself when it is float32 on the CPU, else such a copy of it."""
    weight = model.embedding.weight
    if weight.dtype == torch.float32 and weight.device.type == "cpu":
        return model.eval()
    copy = MetaLM(model.config)
    copy.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    return copy.eval()


# ----------------------------------------------------------------------------- whole MetaLM
def export_metalm(model: MetaLM, path) -> Path:
    """Write any MetaLM as ``metalm_config.json`` (its MetaLMConfig, ``hf_source``
    included) and model.safetensors; :func:`load_metalm` rebuilds it."""
    if not isinstance(model, MetaLM):
        raise TypeError(f"model must be a MetaLM, got {type(model).__name__}")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the embedding's own tensor (safetensors refuses sharing)
    save_file(state, directory / WEIGHTS_FILE, {"format": "pt"})
    _write_json(
        directory / METALM_CONFIG_FILE,
        {
            "format": METALM_FORMAT,
            "config": dataclasses.asdict(model.config),
        },
    )
    return directory


def load_metalm(path, dtype: torch.dtype | None = None) -> MetaLM:
    """The MetaLM :func:`export_metalm` wrote to ``path`` (eval mode; floating weights cast
    to ``dtype`` when given)."""
    directory = Path(path)
    file = directory / METALM_CONFIG_FILE
    if not file.is_file():
        raise HFFormatError(f"{file}: no {METALM_CONFIG_FILE} (not written by export_metalm)")
    saved = json.loads(file.read_text())
    if saved.get("format") != METALM_FORMAT:
        raise HFFormatError(f"{file}: format is {saved.get('format')!r}, not {METALM_FORMAT!r}")
    try:
        config = MetaLMConfig(**saved["config"])
    except (TypeError, ValueError) as error:
        raise HFFormatError(f"{file}: config: {error}") from None
    with torch.device("meta"):
        model = MetaLM(config)
    state = load_file(str(directory / WEIGHTS_FILE))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if config.tie_embeddings and "embedding.weight" in state:
        state["lm_head.weight"] = state["embedding.weight"]
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise HFFormatError(f"{directory / WEIGHTS_FILE}: {error}") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    check_loaded(model)
    return model.eval()
