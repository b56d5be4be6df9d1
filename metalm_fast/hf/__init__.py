"""Hugging Face interoperability: pretrained parts in, trained models out.

- :func:`load_decoder`: a Llama/Mistral, Qwen2, GPT-NeoX or GPT-2 causal LM directory
  (``save_pretrained``'s format: config.json and safetensors) -> a decoder-only MetaLM;
- :func:`load_text_encoder`: BERT, RoBERTa, ELECTRA -> a packed text encoder;
- :func:`load_vision_encoder`: ViT, CLIP vision, SigLIP vision -> a vision encoder;
- :func:`export_decoder`: a MetaLM's decoder -> a transformers model directory;
- :func:`register`: ``attn_implementation="metalm_span"`` inside transformers' models.

Loading reads weights with safetensors and never imports transformers; only
:func:`register` and the export's checks import it.
"""

from __future__ import annotations

from metalm_fast.hf.files import HFFormatError

__all__ = [
    "HFFormatError",
    "export_decoder",
    "load_decoder",
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


def export_decoder(model, path, **kwargs):
    """See :func:`metalm_fast.hf.export.export_decoder`."""
    from metalm_fast.hf.export import export_decoder as export

    return export(model, path, **kwargs)


def register(name: str = "metalm_span"):
    """See :func:`metalm_fast.hf.attention.register`."""
    from metalm_fast.hf.attention import register as register_attention

    return register_attention(name)
