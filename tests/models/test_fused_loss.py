"""MetaLM's training loss through fused_linear_cross_entropy equals the eager logits path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metalm_fast.data.collator import IGNORE_INDEX, SemiCausalCollator
from metalm_fast.models import PRESETS, MetaLM


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = (300, 90, 201)
    documents = [torch.randint(0, 1024, (n,), generator=generator).tolist() for n in lengths]
    return SemiCausalCollator(seed=seed)(documents)


def _loss_and_grads(model: MetaLM, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(batch, **kwargs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_and_gradients_equal_the_eager_path(reduction, tied):
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS["tiny"], vision_layers=0, tie_embeddings=tied)
    model = MetaLM(config)
    batch = _batch()
    fused, fused_grads = _loss_and_grads(model, batch, reduction=reduction)
    eager, eager_grads = _loss_and_grads(model, batch, reduction=reduction, fused_loss=False)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        # The embedding's gradient holds the head's (tied) and the input rows'.
        scale = grad.abs().max().clamp_min(1e-12)
        error = (fused_grads[name] - grad).abs().max() / scale
        assert error < 1e-4, f"{name}: relative error {float(error):.2e}"


def test_no_scored_position_gives_zero_loss_and_zero_gradients_everywhere():
    torch.manual_seed(0)
    model = MetaLM(dataclasses.replace(PRESETS["tiny"], vision_layers=0))
    batch = _batch()
    batch.labels = torch.full_like(batch.labels, IGNORE_INDEX)
    loss, grads = _loss_and_grads(model, batch)
    assert float(loss) == 0.0
    # Every parameter takes part (DDP needs it) and gets an exact zero.
    assert grads.keys() == {name for name, _ in model.named_parameters()}
    assert all(not grad.any() for grad in grads.values())


def test_fused_loss_under_bf16_autocast_is_close_to_eager():
    torch.manual_seed(0)
    model = MetaLM(dataclasses.replace(PRESETS["tiny"], vision_layers=0))
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(batch)
        eager = model(batch, fused_loss=False)
    fused.backward()
    # The fused head keeps fp32 where autocast runs the eager head in bf16.
    assert fused.dtype == torch.float32
    assert abs(float(fused) - float(eager)) < 2e-2 * float(eager)
