"""Encoders (text, vision), decoder, MetaLM and generation."""

from metalm_fast.models.generation import generate
from metalm_fast.models.metalm import PRESETS, MetaLM, MetaLMConfig
from metalm_fast.models.transformer import TransformerStack
from metalm_fast.models.vision import VisionEncoder

__all__ = ["MetaLM", "MetaLMConfig", "PRESETS", "TransformerStack", "VisionEncoder", "generate"]
