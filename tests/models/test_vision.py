"""VisionEncoder and images in MetaLM: shapes, placement, errors, fast path vs golden."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from metalm_fast import SpanMask
from metalm_fast.data.collator import build_batch
from metalm_fast.models import PRESETS, MetaLM, VisionEncoder
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
