"""Tiny random-weight transformers parts (a Llama decoder, a BERT text encoder, a CLIP
vision tower) that tests save with save_pretrained and dock into a MetaLM."""

from __future__ import annotations

import torch


def randomise(model, std: float = 0.05, seed: int = 1):
    """Every weight normal(0, std): fresh norms and biases (ones, zeros) would hide a
    mapping mistake."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def llama(transformers, vocab_size: int, width: int = 64, **changes):
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=width * 3 // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**sizes, **changes})).eval()


def bert(transformers, vocab_size: int, **changes):
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=50,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**{**sizes, **changes})).eval()


def clip_vision(transformers, **changes):
    """16 x 16 RGB images in 8 x 8 patches: 4 patches and the class row per image."""
    sizes = dict(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**{**sizes, **changes})
    return transformers.CLIPVisionModel(config).eval()
