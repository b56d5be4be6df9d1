"""load_vision_encoder against transformers' ViT, CLIP and SigLIP vision towers.

Tiny random-weight models (32 x 32 images, 8 x 8 patches, 3 channels, width 64, 2
layers, 4 heads, MLP width 100) are saved with save_pretrained and loaded back. The
loaded forward is held to the tolerance rule of tests/tolerance.py with transformers
as the reference: golden is the transformers model in float64, baseline the same
model in float32. Preprocessing is compared with transformers' PIL image processors
(built from keyword arguments, saved into the model directory).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from metalm_fast.hf import HFFormatError, load_vision_encoder
from metalm_fast.models.vision import VisionEncoderConfig
from tests.tolerance import assert_within_tolerance

transformers = pytest.importorskip("transformers")

SIZES = dict(
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=100,
)
TEXT = dict(
    vocab_size=99,
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=100,
    bos_token_id=0,
    eos_token_id=2,
)


def _vit(**changes):
    return transformers.ViTModel(transformers.ViTConfig(**SIZES, **changes))


def _vit_classifier():
    return transformers.ViTForImageClassification(transformers.ViTConfig(**SIZES, num_labels=3))


def _clip_vision():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SIZES))


def _clip():
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=SIZES)
    return transformers.CLIPModel(config)


def _siglip_vision():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIZES))


def _siglip():
    config = transformers.SiglipConfig(text_config=TEXT, vision_config=SIZES)
    return transformers.SiglipModel(config)


#: name -> (builder, the vision tower inside the saved model, tokens per image)
CASES = {
    "vit": (_vit, lambda m: m, 17),
    "vit_no_qkv_bias_gelu_new": (
        lambda: _vit(qkv_bias=False, hidden_act="gelu_new", layer_norm_eps=1e-6),
        lambda m: m,
        17,
    ),
    "vit_classifier": (_vit_classifier, lambda m: m.vit, 17),
    "clip_vision_model": (_clip_vision, lambda m: m, 17),
    "clip": (_clip, lambda m: m.vision_model, 17),
    "siglip_vision_model": (_siglip_vision, lambda m: m, 16),
    "siglip": (_siglip, lambda m: m.vision_model, 16),
}


def _randomise(model, seed: int):
    """Perturb every parameter (norm weights away from 1, biases away from 0), so a
    swapped or dropped tensor shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, the transformers vision tower in float32)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, (name, (build, tower, _)) in enumerate(CASES.items()):
            torch.manual_seed(index)
            model = _randomise(build(), seed=index)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            out[name] = (directory, tower(model))
    return out


def _pixels(count=3, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_last_hidden_state(saved, name):
    directory, tower = saved[name]
    encoder = load_vision_encoder(directory)
    pixels = _pixels()
    with torch.no_grad():
        ours = encoder(pixels)
        baseline = tower(pixel_values=pixels).last_hidden_state
        golden = tower.double()(pixel_values=pixels.double()).last_hidden_state
        tower.float()
    assert encoder.tokens_per_image == CASES[name][2]
    assert ours.shape == (3, encoder.tokens_per_image, 64) == baseline.shape
    assert_within_tolerance(ours, golden, baseline, f"{name} last_hidden_state")


def test_float64_load_matches_transformers_in_float64(saved):
    directory, tower = saved["clip"]
    encoder = load_vision_encoder(directory, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in encoder.parameters())
    pixels = _pixels().double()
    with torch.no_grad():
        golden = tower.double()(pixel_values=pixels).last_hidden_state
        tower.float()
        error = float((encoder(pixels) - golden).abs().max())
    assert error < 1e-12, error


def test_backward_reaches_every_parameter(saved):
    encoder = load_vision_encoder(saved["vit"][0])
    encoder(_pixels(2)).square().mean().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.requires_grad and not parameter.is_meta, name
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_config_round_trips_and_the_encoder_docks_packed(saved):
    loaded = load_vision_encoder(saved["clip"][0])
    config = loaded.config
    assert VisionEncoderConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    assert (config.class_token, config.pre_norm, config.patch_bias) == (True, True, False)
    assert config.final_norm is False and config.architecture.mlp_kind == "quick_gelu"
    pixels = _pixels(2)
    with torch.no_grad():  # the inner VisionEncoder gives MetaLM's packed rows
        assert torch.equal(loaded.encoder(pixels).view(2, 17, 64), loaded(pixels))


# ----------------------------------------------------------------------------- errors
def _copy(saved, name, tmp_path):
    directory = tmp_path / name
    directory.mkdir()
    source = saved[name][0]
    for file in source.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def _edit_config(directory, edit, file="config.json"):
    path = directory / file
    config = json.loads(path.read_text()) if path.exists() else {}
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "name, edit, message",
    [
        (
            "vit",
            lambda t: t.pop("encoder.layer.1.attention.attention.value.weight"),
            "missing tensor 'encoder.layer.1.attention.attention.value.weight'",
        ),
        (
            "clip",
            lambda t: t.update({"vision_model.encoder.layers.0.extra": torch.zeros(2)}),
            "unexpected tensor 'vision_model.encoder.layers.0.extra'",
        ),
        (
            "siglip_vision_model",
            lambda t: t.update({"embeddings.position_embedding.weight": torch.zeros(17, 64)}),
            r"'embeddings.position_embedding.weight' has shape \(17, 64\), expected \(16, 64\)",
        ),
        (
            "clip_vision_model",
            lambda t: t.pop("embeddings.patch_embedding.weight"),
            "no tensor 'embeddings.patch_embedding.weight' or "
            "'vision_model.embeddings.patch_embedding.weight'",
        ),
    ],
)
def test_tensor_errors_name_the_tensor(saved, tmp_path, name, edit, message):
    directory = _copy(saved, name, tmp_path)
    _edit_tensors(directory, edit)
    with pytest.raises(HFFormatError, match=message):
        load_vision_encoder(directory)


def test_ignored_tensors_are_only_the_documented_ones(saved, tmp_path):
    """Pooler / pooling head / post_layernorm tensors are in the saved files and not read;
    a tensor outside the vision prefix of a full model is not read either."""
    names = load_file(saved["siglip"][0] / "model.safetensors").keys()
    assert any(n.startswith("vision_model.head.") for n in names)
    assert any(n.startswith("text_model.") for n in names)
    assert "pooler.dense.weight" in load_file(saved["vit"][0] / "model.safetensors")
    directory = _copy(saved, "vit", tmp_path)
    _edit_tensors(directory, lambda t: t.update({"pooler_extra.weight": torch.zeros(1)}))
    with pytest.raises(HFFormatError, match="unexpected tensor 'pooler_extra.weight'"):
        load_vision_encoder(directory)


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("vit", lambda c: c.update(model_type="bert"), "model_type 'bert'"),
        ("clip_vision_model", lambda c: c.update(hidden_act="gelu_10"), "hidden_act 'gelu_10'"),
        ("clip", lambda c: c["vision_config"].update(image_size=[32, 16]), "image_size"),
        ("siglip_vision_model", lambda c: c.update(patch_size=5), "multiple of patch_size"),
        ("vit", lambda c: c.update(num_attention_heads=3), "divisible by num_attention_heads"),
        ("vit", lambda c: c.update(qkv_bias="yes"), "qkv_bias"),
        ("vit", lambda c: c.update(layer_norm_eps=0), "layer_norm_eps"),
    ],
)
def test_config_errors_name_the_field(saved, tmp_path, name, edit, message):
    directory = _copy(saved, name, tmp_path)
    _edit_config(directory, edit)
    with pytest.raises(HFFormatError, match=message):
        load_vision_encoder(directory)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"do_pad": True}, "do_pad=True is not supported"),
        ({"resample": 1}, "resample=1 is not supported"),
        ({"size": {"height": 16, "width": 16}}, r"size \(16, 16\) does not give"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must give 3 values"),
        ({"size": {"longest_edge": 32}}, "size must be"),
    ],
)
def test_preprocessor_errors_name_the_key(saved, tmp_path, settings, message):
    directory = _copy(saved, "vit", tmp_path)
    _edit_config(directory, lambda c: c.update(settings), file="preprocessor_config.json")
    with pytest.raises(HFFormatError, match=message):
        load_vision_encoder(directory)


# ----------------------------------------------------------------------------- preprocess
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _processor(kind: str, **kwargs):
    classes = {
        "vit": transformers.ViTImageProcessorPil,
        "clip": transformers.CLIPImageProcessorPil,
        "siglip": transformers.SiglipImageProcessorPil,
    }
    return classes[kind](**kwargs)


@pytest.mark.parametrize(
    "name, kind, kwargs, input_size",
    [
        # CLIP: shortest edge then centre crop, bicubic, from a non-square image (downsampling)
        (
            "clip",
            "clip",
            dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            (45, 61),
        ),
        # ViT: bilinear to the square size, downsampling
        ("vit", "vit", dict(size={"height": 32, "width": 32}), (50, 41)),
        # SigLIP: bicubic, upsampling
        ("siglip_vision_model", "siglip", dict(size={"height": 32, "width": 32}), (20, 23)),
        # nearest, and an int size (a square for ViT's processor)
        ("vit_classifier", "vit", dict(size=32, resample=0, image_mean=0.4), (45, 70)),
    ],
)
def test_preprocess_matches_transformers_image_processor(
    saved, tmp_path, name, kind, kwargs, input_size
):
    """Bound: one uint8 level after normalising (rescale_factor / min image_std) plus fp32
    rounding. PIL resamples in 8-bit fixed point; this engine in float, rounding to levels
    after each pass (see VisionEncoder.preprocess)."""
    directory = _copy(saved, name, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = _processor(kind, **kwargs)
    processor.save_pretrained(directory)
    encoder = load_vision_encoder(directory)
    images = torch.randint(
        0, 256, (3, 3, *input_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    ours = encoder.preprocess(images)
    theirs = processor([image for image in images], return_tensors="np")["pixel_values"]
    theirs = torch.from_numpy(np.asarray(theirs))
    assert ours.shape == theirs.shape == (3, 3, 32, 32)
    std = encoder.config.preprocessing.image_std
    level = processor.rescale_factor / min(std)
    error = float((ours - theirs).abs().max())
    assert error <= level + 1e-5, f"max error {error:.3e} > one level {level:.3e}"
    different = float(((ours - theirs).abs() > 1e-5).float().mean())
    assert different < 0.05, f"{different:.1%} of the pixels differ"
    with torch.no_grad():
        assert encoder(ours).shape == (3, encoder.tokens_per_image, 64)


def test_without_preprocessor_config_the_family_defaults_fit_the_model(saved):
    clip = load_vision_encoder(saved["clip"][0]).config.preprocessing
    assert (clip.shortest_edge, clip.crop_size, clip.resample) == (32, (32, 32), "bicubic")
    assert (clip.image_mean, clip.image_std) == (CLIP_MEAN, CLIP_STD)
    vit = load_vision_encoder(saved["vit"][0]).config.preprocessing
    assert (vit.size, vit.crop_size, vit.resample, vit.image_mean) == (
        (32, 32),
        None,
        "bilinear",
        (0.5, 0.5, 0.5),
    )
    siglip = load_vision_encoder(saved["siglip"][0]).config.preprocessing
    assert (siglip.size, siglip.resample) == ((32, 32), "bicubic")
