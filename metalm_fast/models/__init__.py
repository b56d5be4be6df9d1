"""Encoders, decoder and MetaLM."""

from metalm_fast.models.metalm import PRESETS, MetaLM, MetaLMConfig
from metalm_fast.models.transformer import TransformerStack

__all__ = ["MetaLM", "MetaLMConfig", "PRESETS", "TransformerStack"]
