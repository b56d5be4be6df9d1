"""MetaLM (language, two-stack and single-stack): fast path vs reference path, learning, sizes."""

import dataclasses
import warnings

import pytest
import torch

from metalm_fast.data.collator import SemiCausalCollator
from metalm_fast.models import PRESETS, MetaLM
from metalm_fast.nn.rotary import packed_positions


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (300, 90, 200)]
    return SemiCausalCollator(seed=seed)(documents)


def _model(variant, backend, seed=0):
    torch.manual_seed(seed)
    config = dataclasses.replace(PRESETS["tiny"], variant=variant, backend=backend)
    return MetaLM(config)


@pytest.mark.parametrize("variant", ["two_stack", "single_stack"])
def test_fast_path_matches_reference_path(variant):
    batch = _batch()
    assert batch.span_starts.numel() > 0
    reference = _model(variant, "reference")
    fast = _model(variant, "cpu")
    fast.load_state_dict(reference.state_dict())
    losses, grads = [], []
    for model in (reference, fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            loss = model(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["two_stack", "single_stack"])
def test_decoder_output_rows_equal_the_full_forward_rows(variant):
    """output_rows prunes the last layer to some rows: their outputs are unchanged."""
    batch = _batch()
    model = _model(variant, "cpu").eval()
    hidden, mask = model.decoder_inputs(batch)
    positions = packed_positions(batch.cu_seqlens)
    rows = batch.cu_seqlens[1:].to(torch.int64) - 1
    with torch.no_grad():
        full = model.decoder(hidden, mask, positions)
        pruned = model.decoder(hidden, mask, positions, output_rows=rows)
    assert pruned.shape == (3, full.shape[1])
    torch.testing.assert_close(pruned, full[rows], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, "):
        model.decoder(hidden, mask, positions, output_rows=rows + hidden.shape[0])


def test_tiny_model_learns_a_fixed_batch():
    """Memorising one batch: the loss must fall well below its start within 30 steps."""
    batch = _batch(seed=1)
    model = _model("two_stack", "auto", seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first = float(model(batch).detach())
        for _ in range(30):
            optimizer.zero_grad()
            loss = model(batch)
            loss.backward()
            optimizer.step()
    assert first > 5.5  # ~ln(512) at initialisation
    assert float(loss.detach()) < 0.6 * first


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [
        ("paper_language", 1.0e9, 2.0e9),
        # 24 x 1024 decoder with 64k tied embeddings (~0.37 B) + ViT-B/16 (~86 M) + connector
        ("paper_vision_language", 0.40e9, 0.50e9),
    ],
)
def test_paper_sizes_build_on_meta_device(preset, low, high):
    with torch.device("meta"):
        model = MetaLM(PRESETS[preset])
    params = sum(p.numel() for p in model.parameters())
    print(f"{preset} MetaLM: {params / 1e9:.3f} B parameters")
    assert low < params < high
    if preset == "paper_vision_language":
        vision = sum(p.numel() for p in model.vision_encoder.parameters())
        print(f"  vision encoder (ViT-B/16): {vision / 1e6:.1f} M parameters")
        assert 84e6 < vision < 88e6
        assert PRESETS[preset].tokens_per_image == 196
