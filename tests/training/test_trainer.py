"""The training loop: exact resume, gradient accumulation, learning, config checks."""

import dataclasses
import itertools
import os
import signal

import pytest
import torch

from metalm_fast.data.collator import build_batch
from metalm_fast.models import PRESETS, MetaLM
from metalm_fast.training.command import synthetic_micro_batches
from metalm_fast.training.trainer import (
    ExistingRunError,
    TrainConfig,
    TrainingInterrupted,
    accumulate_gradients,
    learning_rate,
    rank_micro_batches,
    train,
)

CONFIG = PRESETS["tiny"]


def _stream(tokens=256, seed=0):
    return lambda: synthetic_micro_batches(CONFIG.vocab_size, tokens, seed=seed)


def _config(**changes):
    base = TrainConfig(
        steps=4, grad_accum=2, lr=3e-3, warmup_steps=1, device="cpu", progress=False, log_every=100
    )
    return dataclasses.replace(base, **changes)


class _Interrupted(Exception):
    pass


def test_resume_equals_the_uninterrupted_run(tmp_path):
    """4 steps straight == 2 steps, a crash, then a fresh model + optimizer resumed from disk.

    CPU fp32 training is deterministic here (same kernels, same order, same
    data), so losses and final weights must be bit-identical.
    """
    straight = train(CONFIG, _config(), _stream())

    def crash_after_step_2(record):
        if record["step"] == 2:
            raise _Interrupted

    interrupted = _config(out_dir=str(tmp_path), save_every=2)
    with pytest.raises(_Interrupted):
        train(CONFIG, interrupted, _stream(), on_log=crash_after_step_2)
    assert (tmp_path / "latest").read_text().strip() == "step-2"

    resumed = train(CONFIG, dataclasses.replace(interrupted, resume=True), _stream())
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert resumed.losses == straight.losses[2:]
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert resumed.checkpoint == tmp_path / "step-4"


def _two_micro_batches():
    generator = torch.Generator().manual_seed(3)
    docs = [
        torch.randint(0, CONFIG.vocab_size, (n,), generator=generator).tolist()
        for n in (70, 41, 90)
    ]
    first = build_batch(docs[:2], [5, 80], [17, 100])
    second = build_batch(docs[2:], [30], [45])
    whole = build_batch(docs, [5, 80, 141], [17, 100, 156])  # the same spans, packed together
    return first, second, whole


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradients_equal_the_single_big_batch():
    first, second, whole = _two_micro_batches()
    torch.manual_seed(0)
    model = MetaLM(CONFIG)
    scored = int(whole.loss_mask.sum())
    loss_sum = accumulate_gradients(model, [first, second], scored)
    accumulated = _grads(model)

    model.zero_grad(set_to_none=True)
    mean = model(whole)
    mean.backward()
    torch.testing.assert_close(loss_sum / scored, mean.detach(), rtol=1e-6, atol=0)
    assert accumulated.keys() == _grads(model).keys()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_step_loss_is_the_global_mean_over_micro_batches():
    batches = list(itertools.islice(_stream()(), 2))
    torch.manual_seed(0)  # train() seeds the same way before building the model
    model = MetaLM(CONFIG)
    with torch.no_grad():
        sums = [float(model(batch, reduction="sum")) for batch in batches]
    counts = [int(batch.loss_mask.sum()) for batch in batches]
    result = train(CONFIG, _config(steps=1, seed=0), _stream())
    assert result.losses[0] == pytest.approx(sum(sums) / sum(counts), rel=1e-6)
    assert result.tokens == sum(batch.input_ids.numel() for batch in batches)


LEARN_STEPS = 60
LEARN_THRESHOLD = 4.0  # nats; measured ~2.4-3.0 (mean of the last 5 steps) on this seed


def test_tiny_model_learns_synthetic_data():
    """Seed 0, tiny preset, synthetic successor-rule data (512-token micro-batches),
    lr 1e-2: the mean loss of steps 56-60 falls below 4.0 nats within 60 steps.

    It starts near or above ln(vocab_size) (6.93 for 1024 tokens); the data's
    best possible loss is ~1.9 nats (see synthetic_micro_batches).
    """
    config = _config(steps=LEARN_STEPS, grad_accum=1, lr=1e-2, warmup_steps=5, seed=0)
    result = train(CONFIG, config, _stream(tokens=512))
    last = sum(result.losses[-5:]) / 5
    print(f"learning: first {result.losses[0]:.3f}, last-5 mean {last:.3f}")
    assert result.losses[0] > 6.0
    assert last < LEARN_THRESHOLD


def test_rank_share_and_schedule():
    assert list(rank_micro_batches(range(20), 4, 1, 3)) == [5, 8, 11, 14, 17]
    config = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [learning_rate(s, config) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert learning_rate(10, config) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grad_accum": 0}, "grad_accum must be >= 1"),
        ({"parallel": "zero"}, "parallel must be one of"),
        ({"device": "tpu"}, "device must be one of"),
        ({"resume": True}, "resume needs out_dir"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"keep_checkpoints": -1}, "keep_checkpoints must be >= 0"),
        ({"out_dir": "x", "resume": True, "overwrite": True}, "overwrite cannot be combined"),
    ],
)
def test_bad_train_config(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_resume_without_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(CONFIG, _config(out_dir=str(tmp_path), resume=True), _stream())


def test_a_signal_stops_after_the_step_with_a_checkpoint_there(tmp_path):
    """SIGTERM during step 2 (here: from on_log) -> step 2 saved, then TrainingInterrupted."""

    def terminate_at_step_2(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    config = _config(out_dir=str(tmp_path), save_every=0)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(CONFIG, config, _stream(), on_log=terminate_at_step_2)
    assert stopped.value.step == 2 and stopped.value.exit_status == 143
    assert stopped.value.checkpoint == tmp_path / "step-2"
    assert (tmp_path / "latest").read_text().strip() == "step-2"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    resumed = train(CONFIG, dataclasses.replace(config, resume=True), _stream())
    assert resumed.resumed_from == tmp_path / "step-2" and resumed.step == 4


def test_an_existing_run_needs_resume_or_overwrite(tmp_path):
    config = _config(steps=1, out_dir=str(tmp_path))
    train(CONFIG, config, _stream())
    with pytest.raises(ExistingRunError, match="already holds a run"):
        train(CONFIG, config, _stream())
    again = train(CONFIG, dataclasses.replace(config, overwrite=True), _stream())
    assert again.checkpoint == tmp_path / "step-1" and len(again.losses) == 1
