"""--device / --dtype: the autocast rule and moving batches."""

import math

import pytest
import torch

from metalm_fast.models.metalm import PRESETS, MetaLM
from metalm_fast.training.command import synthetic_micro_batches
from metalm_fast.training.runtime import autocast, autocast_dtype, move_batch


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp32") is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        autocast_dtype(torch.device("cpu"), "fp16")


def test_bf16_forward_on_cpu_runs_in_bf16_and_gives_a_finite_loss():
    torch.manual_seed(0)
    model = MetaLM(PRESETS["tiny"])
    batch = next(synthetic_micro_batches(model.config.vocab_size, 256, seed=0))
    seen = []
    # A projection inside the decoder (the LM head is fused with the loss, in fp32).
    projection = model.decoder.blocks[0].mlp.up
    hook = projection.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with autocast(torch.device("cpu"), "bf16"):
        loss = model(batch)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_move_batch_returns_the_same_batch_when_already_there():
    batch = next(synthetic_micro_batches(64, 32, seed=0))
    assert move_batch(batch, torch.device("cpu")) is batch
