"""VisionEncoder and images in MetaLM: shapes, placement, errors, fast path vs golden; the
configurable encoder (class token, pre norm, config round trip) and preprocess."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from metalm_fast import SpanMask
from metalm_fast.data.collator import build_batch
from metalm_fast.models import PRESETS, MetaLM, VisionEncoder
from metalm_fast.models.vision import ImagePreprocessing, VisionEncoderConfig
from metalm_fast.nn.architecture import BlockArchitecture
from tests.tolerance import assert_within_tolerance

IMAGE = 1  # the image placeholder token id of these tests
TINY = PRESETS["tiny"]


def vision_language_batch(
    lengths=(120, 60, 90),
    images_at=((0, 10), (0, 50), (2, 30)),
    spans=((70, 100), (130, 150)),
    seed=0,
):
    """Documents of random tokens (ids >= 2) with 16-token image placeholder runs at
    ``images_at`` (document, offset) and text spans at absolute packed offsets."""
    generator = torch.Generator().manual_seed(seed)
    documents = [
        torch.randint(2, TINY.vocab_size, (n,), generator=generator).tolist() for n in lengths
    ]
    per_image = TINY.tokens_per_image
    for document, offset in images_at:
        documents[document][offset : offset + per_image] = [IMAGE] * per_image
    images = (
        torch.rand(
            len(images_at),
            TINY.image_channels,
            TINY.image_size,
            TINY.image_size,
            generator=generator,
        )
        if images_at
        else None
    )
    starts, ends = (list(column) for column in zip(*spans)) if spans else ([], [])
    return build_batch(
        documents, starts, ends, images=images, image_token_id=IMAGE, tokens_per_image=per_image
    )


def tiny_model(variant="two_stack", backend="auto", seed=0, **changes) -> MetaLM:
    torch.manual_seed(seed)
    return MetaLM(dataclasses.replace(TINY, variant=variant, backend=backend, **changes))


# ----------------------------------------------------------------------------- encoder
def test_encoder_packs_patches_per_image():
    encoder = VisionEncoder(8, 3, 2, dim=32, num_layers=1, num_heads=2, backend="reference")
    images = torch.randn(3, 3, 8, 8)
    out = encoder(images)
    assert out.shape == (3 * 16, 32)
    # Images attend only to themselves: encoding one alone gives its rows of the batch.
    torch.testing.assert_close(encoder(images[1:2]), out[16:32], rtol=1e-5, atol=1e-5)
    assert encoder(torch.zeros(0, 3, 8, 8)).shape == (0, 32)


def test_patches_are_raster_order_channel_major():
    encoder = VisionEncoder(4, 2, 2, dim=8, num_layers=1, num_heads=1)
    images = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    patches = encoder.patchify(images)
    assert patches.shape == (2 * 4, 2 * 2 * 2)
    # image 1, patch (row 1, col 0) = rows 2..3, columns 0..1 of both channels
    expected = images[1, :, 2:4, 0:2].reshape(-1)
    assert torch.equal(patches[4 + 2], expected)


@pytest.mark.parametrize("shape", [(2, 1, 8, 4), (2, 3, 8, 8), (1, 8, 8), (2, 1, 16, 16)])
def test_bad_image_shape_names_images(shape):
    encoder = VisionEncoder.from_config(TINY)
    with pytest.raises(ValueError, match="images"):
        encoder(torch.zeros(shape))


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionEncoder(9, 1, 2, dim=8, num_layers=1, num_heads=1)
    with pytest.raises(TypeError, match="images"):
        VisionEncoder.from_config(TINY)(torch.zeros(1, 1, 8, 8, dtype=torch.int64))


# ----------------------------------------------------------------------------- in MetaLM
@pytest.mark.parametrize("variant", ["two_stack", "single_stack"])
def test_image_and_span_rows_land_at_their_positions(variant):
    batch = vision_language_batch()
    model = tiny_model(variant, "cpu")
    with torch.no_grad():
        hidden, _ = model.decoder_inputs(batch)
        image_rows = model.encode_images(batch.images)
        at_image = batch.image_index >= 0
        assert torch.equal(hidden[at_image], image_rows[batch.image_index[at_image]])
        if variant == "two_stack":
            at_span = batch.feature_index >= 0
            assert int(at_span.sum()) == 50
            assert torch.equal(hidden[at_span], model.encode_spans(batch))
            plain = ~at_image & ~at_span
        else:  # the decoder reads span tokens itself
            plain = ~at_image
        assert torch.equal(hidden[plain], model.embedding.weight[batch.input_ids[plain]])


def test_zero_image_rows_equal_the_connector_output():
    batch = vision_language_batch()
    batch.images = torch.zeros_like(batch.images)
    model = tiny_model()
    per_image = model.config.tokens_per_image
    with torch.no_grad():
        hidden, _ = model.decoder_inputs(batch)
        encoder = model.vision_encoder
        patches = encoder.patch_embedding.bias + encoder.position_embedding  # zero pixels
        expected = model.vision_connector(
            encoder.transformer(patches, SpanMask.bidirectional(torch.tensor([0, per_image])))
        )
    for image in range(batch.images.shape[0]):
        rows = hidden[
            (batch.image_index >= image * per_image) & (batch.image_index < (image + 1) * per_image)
        ]
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)


def test_images_without_vision_encoder_raise():
    model = tiny_model(vision_layers=0)
    with pytest.raises(ValueError, match="no vision encoder"):
        model(vision_language_batch())
    text_only = vision_language_batch(images_at=())
    assert torch.isfinite(model(text_only))


def test_no_text_encoder():
    model = tiny_model(encoder_layers=0)
    assert not model.has_text_encoder
    with pytest.raises(ValueError, match="no text encoder"):
        model(vision_language_batch())
    loss = model(vision_language_batch(spans=()))
    loss.backward()
    assert model.vision_encoder.patch_embedding.weight.grad.abs().sum() > 0


def test_text_batch_still_trains_every_vision_parameter():
    """No images: the vision encoder runs on zero images, so its parameters get (zero) grads."""
    model = tiny_model()
    model(vision_language_batch(images_at=())).backward()
    grads = [p.grad for p in model.vision_encoder.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def _token_losses_and_grads(model, batch):
    """Per scored position cross-entropy (float64 for a float64 model) and the grads of its
    mean, which is ``model(batch)``. The rule is applied to the per-position losses: one
    scalar's error is a single sample, too few for a max-error bound."""
    scored = batch.labels != -100
    logits = model.logits(batch)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    losses = F.cross_entropy(logits, batch.labels, reduction="none")[scored]
    losses.mean().backward()
    return losses.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["two_stack", "single_stack"])
def test_fast_path_matches_golden_with_images(variant):
    """Tolerance rule: |cpu - golden| <= 2 |reference fp32 - golden| + atol, for the loss at
    every scored position and every gradient."""
    batch = vision_language_batch()
    fast = tiny_model(variant, "cpu")
    baseline = tiny_model(variant, "reference")
    golden = tiny_model(variant, "reference").double()
    baseline.load_state_dict(fast.state_dict())
    golden.load_state_dict(fast.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        losses, grads = _token_losses_and_grads(fast, batch)
        base_losses, base_grads = _token_losses_and_grads(baseline, batch)
        gold_losses, gold_grads = _token_losses_and_grads(golden, batch)
        with torch.no_grad():
            torch.testing.assert_close(fast(batch), losses.mean())
    assert_within_tolerance(losses, gold_losses, base_losses, "loss per position")
    assert grads.keys() == gold_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        assert_within_tolerance(grad, gold_grads[name], base_grads[name], name)
    assert grads["vision_encoder.patch_embedding.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- configurable
def pretrained_style_encoder(backend="auto", seed=0, **changes) -> VisionEncoder:
    """A CLIP-like encoder: class token, pre norm, no patch bias, quick_gelu, odd MLP width,
    no final norm; parameters randomised so every norm and bias matters."""
    torch.manual_seed(seed)
    options = dict(
        mlp_hidden=50,
        architecture=BlockArchitecture(
            positions="none", mlp_kind="quick_gelu", qkv_bias=True, out_bias=True, final_norm=False
        ),
        patch_bias=False,
        class_token=True,
        pre_norm=True,
        backend=backend,
    )
    encoder = VisionEncoder(8, 3, 4, 32, 2, 2, **(options | changes))
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return encoder


def test_config_is_json_and_round_trips():
    encoder = pretrained_style_encoder()
    config = encoder.config
    text = json.dumps(dataclasses.asdict(config))
    rebuilt = VisionEncoderConfig(**json.loads(text))
    assert rebuilt == config
    assert isinstance(rebuilt.architecture, BlockArchitecture)
    assert isinstance(rebuilt.preprocessing, ImagePreprocessing)
    assert config.final_norm is False and config.tokens_per_image == 4 + 1
    # The config rebuilds the same module: same parameter names and shapes.
    clone = VisionEncoder.from_config(rebuilt, backend="reference")
    assert {k: v.shape for k, v in clone.state_dict().items()} == {
        k: v.shape for k, v in encoder.state_dict().items()
    }


def test_native_config_and_state_dict_are_unchanged():
    encoder = VisionEncoder.from_config(TINY)
    assert encoder.config == VisionEncoderConfig(
        TINY.image_size,
        TINY.image_channels,
        TINY.patch_size,
        TINY.vision_dim,
        TINY.vision_layers,
        TINY.vision_heads,
    )
    assert encoder.tokens_per_image == encoder.num_patches == TINY.tokens_per_image
    names = {n for n in encoder.state_dict() if not n.startswith("transformer.")}
    assert names == {"patch_embedding.weight", "patch_embedding.bias", "position_embedding"}


def test_class_token_rows_and_batch_layout():
    encoder = pretrained_style_encoder(backend="reference")
    images = torch.randn(3, 3, 8, 8)
    packed = encoder(images)
    per_image = encoder.tokens_per_image
    assert packed.shape == (3 * per_image, 32)
    batched = encoder.last_hidden_state(images)
    assert batched.shape == (3, per_image, 32)
    assert torch.equal(batched.reshape(-1, 32), packed)
    torch.testing.assert_close(encoder.last_hidden_state(images[2:]), batched[2:])
    assert torch.equal(encoder.cu_seqlens(3, "cpu"), torch.tensor([0, 5, 10, 15]))
    assert encoder.last_hidden_state(torch.zeros(0, 3, 8, 8)).shape == (0, per_image, 32)


def test_embeddings_are_the_conv_then_class_row_then_positions():
    """patchify + Linear equals the Conv2d with the Linear's weight as [D, C, p, p]."""
    encoder = pretrained_style_encoder(patch_bias=True)
    images = torch.randn(2, 3, 8, 8)
    weight = encoder.patch_embedding.weight.view(32, 3, 4, 4)
    conv = F.conv2d(images, weight, encoder.patch_embedding.bias, stride=4)
    rows = torch.cat((encoder.class_embedding.expand(2, 1, 32), conv.flatten(2).transpose(1, 2)), 1)
    expected = encoder.pre_norm(rows + encoder.position_embedding)
    torch.testing.assert_close(encoder.embed(images), expected, rtol=1e-5, atol=1e-5)


def _outputs_and_grads(encoder, images, weights):
    out = encoder.last_hidden_state(images)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad for n, p in encoder.named_parameters()}


def test_configurable_encoder_fast_path_matches_golden():
    """Tolerance rule (tests/tolerance.py) for the output and every gradient."""
    images, weights = torch.randn(3, 3, 8, 8), torch.randn(3, 5, 32)
    fast = pretrained_style_encoder("cpu")
    baseline = pretrained_style_encoder("reference")
    golden = pretrained_style_encoder("reference").double()
    baseline.load_state_dict(fast.state_dict())
    golden.load_state_dict(fast.state_dict())
    out, grads = _outputs_and_grads(fast, images, weights)
    base_out, base_grads = _outputs_and_grads(baseline, images, weights)
    gold_out, gold_grads = _outputs_and_grads(golden, images.double(), weights)
    assert_within_tolerance(out, gold_out, base_out, "last_hidden_state")
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_within_tolerance(grad, gold_grads[name], base_grads[name], name)


def test_configurable_errors():
    with pytest.raises(ValueError, match="architecture.positions"):
        VisionEncoder(8, 3, 4, 32, 1, 4, architecture=BlockArchitecture())
    with pytest.raises(ValueError, match="mlp_kind"):
        VisionEncoder(
            8, 3, 4, 32, 1, 4, mlp_kind="relu", architecture=BlockArchitecture(positions="none")
        )
    with pytest.raises(ValueError, match=r"preprocessing.size \(16, 16\)"):
        VisionEncoder(8, 3, 4, 32, 1, 4, preprocessing=ImagePreprocessing(size=(16, 16)))
    with pytest.raises(ValueError, match="image_mean has 1 values"):
        VisionEncoder(
            8, 3, 4, 32, 1, 4, preprocessing=ImagePreprocessing(image_mean=(0.5,), image_std=(1,))
        )
    with pytest.raises(ValueError, match="mlp_hidden"):
        VisionEncoderConfig(8, 3, 4, 32, 1, 4, mlp_hidden=0)
    with pytest.raises(TypeError, match="class_token"):
        VisionEncoderConfig(8, 3, 4, 32, 1, 4, class_token=1)
    with pytest.raises(ValueError, match="resample"):
        ImagePreprocessing(resample="lanczos")
    with pytest.raises(ValueError, match="at most one of size and shortest_edge"):
        ImagePreprocessing(size=(8, 8), shortest_edge=8)
    with pytest.raises(ValueError, match="together"):
        ImagePreprocessing(image_mean=(0.5,))


# ----------------------------------------------------------------------------- preprocess
NORMALISED = ImagePreprocessing(
    shortest_edge=8, crop_size=(8, 8), image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.6, 0.7)
)


def test_preprocess_at_the_model_size_only_rescales_and_normalises():
    encoder = VisionEncoder(8, 3, 4, 32, 1, 4, preprocessing=NORMALISED)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    expected = (images / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(encoder.preprocess(images), expected)
    assert encoder.preprocess(images.double()).dtype == torch.float64
    assert encoder.preprocess(torch.zeros(0, 3, 8, 8)).shape == (0, 3, 8, 8)


def test_preprocess_shortest_edge_then_center_crop():
    """A constant image stays constant through resize and crop (the filters sum to one);
    the crop is the centre of the resized image."""
    encoder = VisionEncoder(8, 3, 4, 32, 1, 4, preprocessing=NORMALISED)
    assert NORMALISED.resized_size(10, 17) == (8, 13)
    assert NORMALISED.resized_size(17, 10) == (13, 8)
    flat = torch.full((1, 3, 10, 17), 51, dtype=torch.uint8)
    out = encoder.preprocess(flat)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, encoder.preprocess(torch.full((1, 3, 8, 8), 51.0)))
    # A left-right ramp: the crop keeps the middle columns, so the middle stays the middle.
    ramp = torch.arange(16.0).expand(1, 3, 8, 16).contiguous()
    crop_only = VisionEncoder(
        8, 3, 4, 32, 1, 4, preprocessing=ImagePreprocessing(crop_size=(8, 8), rescale_factor=None)
    )
    assert torch.equal(crop_only.preprocess(ramp), ramp[..., 4:12])


def test_preprocess_errors_name_the_problem():
    encoder = VisionEncoder(8, 3, 4, 32, 1, 4, preprocessing=ImagePreprocessing(shortest_edge=8))
    with pytest.raises(ValueError, match=r"preprocessing gives \(8, 16\)"):
        encoder.preprocess(torch.zeros(1, 3, 4, 8))
    with pytest.raises(ValueError, match="image_channels = 3"):
        encoder.preprocess(torch.zeros(1, 1, 8, 8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        encoder.preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.int64))
    cropping = VisionEncoder(8, 3, 4, 32, 1, 4, preprocessing=ImagePreprocessing(crop_size=(8, 8)))
    with pytest.raises(ValueError, match="crop_size"):
        cropping.preprocess(torch.zeros(1, 3, 6, 6))
