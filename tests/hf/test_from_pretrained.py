"""MetaLM.from_pretrained: a Llama decoder, a BERT text encoder and a CLIP vision tower
docked through fresh connectors, trained a step, checkpointed and read back."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from metalm_fast import hf  # noqa: E402
from metalm_fast.data.collator import build_batch  # noqa: E402
from metalm_fast.models import MetaLM  # noqa: E402
from metalm_fast.training.checkpoint import load_model, save_checkpoint  # noqa: E402
from tests.hf import tiny_parts  # noqa: E402
from tests.hf.tiny_parts import randomise  # noqa: E402

VOCAB = 300


def _save(model, directory):
    randomise(model).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    llama = tiny_parts.llama(transformers, VOCAB, tie_word_embeddings=False)
    bert = tiny_parts.bert(transformers, 200, max_position_embeddings=64)
    clip = tiny_parts.clip_vision(transformers)
    return {
        "llama": (llama, _save(llama, root / "llama")),
        "bert": (bert, _save(bert, root / "bert")),
        "clip": (clip, _save(clip, root / "clip")),
    }


def _batch(model: MetaLM):
    """Two documents: a span of 5 tokens in the first, one image in the second."""
    per_image = model.config.tokens_per_image
    image_id = 7
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(10, VOCAB, (20,), generator=generator).tolist()
    second = [1, *[image_id] * per_image, *torch.randint(10, VOCAB, (6,)).tolist()]
    images = torch.randn(1, 3, 16, 16, generator=generator)
    batch = build_batch(
        [first, second],
        [4],
        [9],
        images=images,
        image_token_id=image_id,
        tokens_per_image=per_image,
    )
    # The BERT encoder has its own (smaller) vocabulary: its span ids must fit it.
    batch.encoder_ids = batch.encoder_ids % 200
    return batch


def test_the_parts_are_docked_as_they_are(parts):
    model = hf.from_pretrained(
        parts["llama"][1], parts["bert"][1], parts["clip"][1], freeze_encoder_layers=2
    )
    config = model.config
    assert (config.encoder_dim, config.encoder_layers, config.vision_dim) == (32, 3, 32)
    assert config.tokens_per_image == 5  # 4 patches and CLIP's class row
    # The decoder keeps transformers' logits exactly: the connectors only add inputs.
    llama = parts["llama"][0]
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        theirs = llama(ids).logits[0]
        ours = model.logits(build_batch([ids[0].tolist()], [], []))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_freezing_leaves_exactly_the_frozen_parameters_without_gradient(parts):
    model = hf.from_pretrained(
        parts["llama"][1],
        parts["bert"][1],
        parts["clip"][1],
        freeze_encoder_layers=2,
        freeze_vision_layers=2,
        freeze_decoder=True,
    )
    model.train()
    model(_batch(model)).backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert trained.isdisjoint(frozen)
    assert all(
        name.startswith(("connector.", "vision_connector.", "text_encoder.stack.blocks.2."))
        for name in trained
    )
    assert any(name.startswith("text_encoder.stack.blocks.2.") for name in trained)
    assert any(name.startswith("connector.") for name in trained)
    assert "text_encoder.word_embeddings.weight" in frozen
    assert "vision_encoder.patch_embedding.weight" in frozen
    assert "decoder.blocks.0.attention.qkv.weight" in frozen
    with pytest.raises(ValueError, match="freeze_encoder_layers \\(4\\) exceeds"):
        hf.from_pretrained(parts["llama"][1], parts["bert"][1], freeze_encoder_layers=4)


def test_a_composed_model_survives_a_checkpoint(parts, tmp_path):
    model = hf.from_pretrained(parts["llama"][1], parts["bert"][1], parts["clip"][1])
    batch = _batch(model)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "run", 1, model, optimizer, model_config=model.config)
    loaded = load_model(tmp_path / "run")
    assert loaded.config == model.config
    for (name, ours), (_, theirs) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))


def test_parts_of_the_wrong_kind_are_refused(parts):
    decoder = hf.load_decoder(parts["llama"][1])
    with pytest.raises(TypeError, match="text_encoder must be a TextEncoder"):
        MetaLM.from_pretrained(decoder, text_encoder=decoder)
    composed = MetaLM.from_pretrained(decoder, hf.load_text_encoder(parts["bert"][1]))
    with pytest.raises(TypeError, match="decoder must be a decoder-only MetaLM"):
        MetaLM.from_pretrained(composed)
