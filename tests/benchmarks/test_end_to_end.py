"""The end-to-end benchmark's baseline is the same model: HF-style loss, gradients and
greedy tokens equal the fast path's (tiny preset), and ``--quick`` runs end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import bench_end_to_end
from benchmarks.hf_style import hf_style_generate, hf_style_loss
from metalm_fast.data.collator import SemiCausalCollator, build_batch
from metalm_fast.models import PRESETS, MetaLM

TINY = PRESETS["tiny"]
IMAGE = 1  # image placeholder token id of these tests


def _model(variant="two_stack", seed=0) -> MetaLM:
    torch.manual_seed(seed)
    return MetaLM(dataclasses.replace(TINY, variant=variant))


def _text_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    documents = [
        torch.randint(0, TINY.vocab_size, (n,), generator=generator).tolist()
        for n in (300, 90, 200, 7)
    ]
    return SemiCausalCollator(seed=seed)(documents)


def _image_batch(seed=0):
    """Two documents with 16-token image placeholder runs and text spans beside them."""
    generator = torch.Generator().manual_seed(seed)
    documents = [
        torch.randint(2, TINY.vocab_size, (n,), generator=generator).tolist() for n in (120, 90)
    ]
    per_image = TINY.tokens_per_image
    for document, offset in ((0, 10), (1, 40)):
        documents[document][offset : offset + per_image] = [IMAGE] * per_image
    images = torch.rand(
        2, TINY.image_channels, TINY.image_size, TINY.image_size, generator=generator
    )
    return build_batch(
        documents,
        [60, 125],
        [100, 150],
        images=images,
        image_token_id=IMAGE,
        tokens_per_image=per_image,
    )


def _loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = loss_fn(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "variant,make_batch",
    [("two_stack", _text_batch), ("single_stack", _text_batch), ("two_stack", _image_batch)],
    ids=["two_stack", "single_stack", "two_stack_images"],
)
def test_hf_style_loss_and_gradients_equal_the_fast_path(variant, make_batch):
    batch = make_batch()
    assert batch.span_starts.numel() > 0
    model = _model(variant)
    fast_loss, fast_grads = _loss_and_grads(model, lambda m, b: m(b), batch)
    hf_loss, hf_grads = _loss_and_grads(model, hf_style_loss, batch)
    torch.testing.assert_close(hf_loss, fast_loss, rtol=1e-5, atol=0)
    # The fast path runs the vision encoder on zero images for text batches (for DDP);
    # those parameters get zero gradients there and none on the HF-style path.
    for name, grad in fast_grads.items():
        expected = hf_grads.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(expected, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hf_style_masks_are_the_span_masks():
    from benchmarks.hf_style import packed_causal_mask, packed_semi_causal_mask
    from metalm_fast import SpanMask

    batch = _text_batch()
    total = batch.input_ids.numel()
    causal = SpanMask.causal(batch.cu_seqlens).to_dense()
    semi = SpanMask.semi_causal(batch.cu_seqlens, batch.span_starts, batch.span_ends).to_dense()
    assert torch.equal(packed_causal_mask(batch.cu_seqlens, total)[0, 0], causal)
    semi_dense = packed_semi_causal_mask(
        batch.cu_seqlens, batch.span_starts, batch.span_ends, total
    )
    assert torch.equal(semi_dense[0, 0], semi)


def _prompts(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, TINY.vocab_size, (n,), generator=generator).tolist()
        for n in (5, 37, 1, 19, 64)
    ]


needs_generation = pytest.mark.skipif(
    importlib.util.find_spec("metalm_fast.models.generation") is None,
    reason="metalm_fast.models.generation (the fast path's generate) is not present yet",
)


@needs_generation
def test_hf_style_greedy_generation_equals_the_fast_path():
    from metalm_fast.models.generation import generate

    model = _model().eval()
    prompts = _prompts()
    fast = generate(model, build_batch(prompts, [], []), max_new_tokens=12)
    assert hf_style_generate(model, prompts, max_new_tokens=12) == fast
    assert [len(tokens) for tokens in fast] == [12] * len(prompts)


@needs_generation
def test_hf_style_generation_stops_at_eos_like_the_fast_path():
    from metalm_fast.models.generation import generate

    model = _model().eval()
    prompts = _prompts(seed=1)
    free_run = generate(model, build_batch(prompts, [], []), max_new_tokens=10)
    eos_id = free_run[0][3]  # a token some sequence emits mid-way
    fast = generate(model, build_batch(prompts, [], []), max_new_tokens=10, eos_id=eos_id)
    assert any(len(tokens) < 10 for tokens in fast)
    assert hf_style_generate(model, prompts, max_new_tokens=10, eos_id=eos_id) == fast


@needs_generation
def test_quick_benchmark_runs_end_to_end(capsys):
    status = bench_end_to_end.main(["--quick", "--no-write", "--repeats", "1"])
    out = capsys.readouterr().out
    assert status == 0  # --quick judges only correctness (identical tokens), not speed
    for line in (
        "training (fwd+bwd+AdamW)",
        "generation (incl. prefill)",
        "training peak memory (one step)",
        "| fused loss: training (fwd+bwd+AdamW) | tokens/s |",
        "| fused loss: training peak memory (one step) | MiB over baseline |",
    ):
        assert line in out
    assert "PASS: fast and HF-style greedy generation produce the same tokens" in out


def test_fused_loss_rows_judge_speed_and_the_logits_saved():
    training = {
        "tokens_per_s": {"fast": 1300.0, "hf_style": 400.0, "eager_logits": 1000.0},
        "eager_loss_relative_diff": 0.0,
        "logits_mib": 256.0,
    }
    peaks = {"fast": {"peak_mib": 1000.0}, "eager_logits": {"peak_mib": 1200.0}}
    speed, memory = bench_end_to_end.fused_loss_rows(training, peaks)
    assert (speed.fast, speed.peer, speed.peer_name) == (1300.0, 1000.0, "eager_logits")
    assert speed.passed  # 1.3x >= 1.2x
    assert memory.ratio == pytest.approx(1.2) and not memory.passed  # 200 MiB < 256 MiB
    assert "FAIL" in memory.check() and "256 MiB" in memory.check()
    peaks["eager_logits"]["peak_mib"] = 1300.0
    assert bench_end_to_end.fused_loss_rows(training, peaks)[1].passed


@needs_generation
def test_gpu_e2e_suite_dry_runs_on_cpu():
    path = Path(bench_end_to_end.__file__).parent / "gpu" / "e2e_cases.py"
    spec = importlib.util.spec_from_file_location("e2e_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e_cases"] = module  # its dataclasses resolve their module through this
    spec.loader.exec_module(module)
    rows = module.run(None, device="cpu", log=lambda line: None)
    quantities = [row.quantity for row in rows]
    assert quantities == [
        "training (fwd+bwd+AdamW)",
        "training peak memory (one step)",
        "generation (incl. prefill)",
    ]
    assert all(row.device == "cpu" for row in rows)
    assert "same tokens" in rows[2].note
    assert "not GPU figures" in module.to_markdown(rows)
