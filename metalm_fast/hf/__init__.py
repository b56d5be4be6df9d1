"""Hugging Face interoperability: pretrained parts in, trained models out.

- :func:`load_decoder`: a Llama/Mistral, Qwen2, GPT-NeoX or GPT-2 causal LM directory
  (``save_pretrained``'s format: config.json and safetensors) -> a decoder-only MetaLM;
- :func:`load_text_encoder`: BERT, RoBERTa, ELECTRA -> a packed text encoder;
- :func:`load_vision_encoder`: ViT, CLIP vision, SigLIP vision -> a vision encoder;
- :func:`from_pretrained`: a MetaLM of such parts and fresh connectors;
- :func:`export_decoder`: a MetaLM's decoder -> a transformers model directory;
- :func:`export_metalm` / :func:`load_metalm`: any MetaLM as safetensors plus its config;
- :func:`register`: ``attn_implementation="metalm_span"`` inside transformers' models.

Loading reads weights with safetensors and never imports transformers; only
:func:`register` and the export's checks import it.
"""

from __future__ import annotations

import torch

from metalm_fast.hf.files import HFFormatError

__all__ = [
    "HFFormatError",
    "export_decoder",
    "export_metalm",
    "from_pretrained",
    "load_decoder",
    "load_metalm",
    "load_text_encoder",
    "load_vision_encoder",
    "register",
]


def load_decoder(path, dtype=None):
    """See :func:`metalm_fast.hf.decoders.load_decoder`."""
    from metalm_fast.hf.decoders import load_decoder as load

    return load(path, dtype=dtype)


def load_text_encoder(path, dtype=None):
    """See :func:`metalm_fast.hf.text_encoders.load_text_encoder`."""
    from metalm_fast.hf.text_encoders import load_text_encoder as load

    return load(path, dtype=dtype)


def load_vision_encoder(path, dtype=None):
    """See :func:`metalm_fast.hf.vision_encoders.load_vision_encoder`."""
    from metalm_fast.hf.vision_encoders import load_vision_encoder as load

    return load(path, dtype=dtype)


def from_pretrained(decoder, text_encoder=None, vision_encoder=None, *, dtype=None, **options):
    """A MetaLM composed of pretrained parts, each a directory or an already loaded module:
    ``decoder`` (:func:`load_decoder`), ``text_encoder`` (:func:`load_text_encoder`),
    ``vision_encoder`` (:func:`load_vision_encoder`); ``options`` are
    :meth:`metalm_fast.models.MetaLM.from_pretrained`'s (connectors, freezing).

    Example: ``hf.from_pretrained("llama-dir", text_encoder="bert-dir",
    freeze_encoder_layers=10)``.
    """
    from metalm_fast.models.metalm import MetaLM

    def part(value, load):
        return value if value is None or isinstance(value, torch.nn.Module) else load(value, dtype)

    return MetaLM.from_pretrained(
        part(decoder, load_decoder),
        part(text_encoder, load_text_encoder),
        part(vision_encoder, load_vision_encoder),
        **options,
    )


def export_decoder(model, path, **kwargs):
    """See :func:`metalm_fast.hf.export.export_decoder`."""
    from metalm_fast.hf.export import export_decoder as export

    return export(model, path, **kwargs)


def export_metalm(model, path):
    """See :func:`metalm_fast.hf.export.export_metalm`."""
    from metalm_fast.hf.export import export_metalm as export

    return export(model, path)


def load_metalm(path, dtype=None):
    """See :func:`metalm_fast.hf.export.load_metalm`."""
    from metalm_fast.hf.export import load_metalm as load

    return load(path, dtype=dtype)


def register(name: str = "metalm_span"):
    """See :func:`metalm_fast.hf.attention.register`."""
    from metalm_fast.hf.attention import register as register_attention

    return register_attention(name)
