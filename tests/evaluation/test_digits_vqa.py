"""Digit VQA evaluation: prompts, candidate ranking, and a finetuned tiny model beating chance."""

import math

import pytest
import torch

from metalm_fast.commands.evaluate import finetune_on_vqa, format_table
from metalm_fast.data.digits import QUESTIONS, load_digits
from metalm_fast.data.tokenizer import load_tokenizer
from metalm_fast.evaluation.digits_vqa import TaskAccuracy, build_prompt, evaluate
from metalm_fast.models import PRESETS, MetaLM

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CONFIG.vocab_size)


def test_prompt_places_demonstrations_and_encoder_spans(tokenizer):
    digits = load_digits("train")
    per_image = CONFIG.tokens_per_image
    demos = [("is it even?", "yes", digits.images[0]), ("is it even?", "no", digits.images[1])]
    prompt = build_prompt(
        tokenizer, per_image, "is it even?", digits.images[2], demos, encoder_demos=True
    )
    assert prompt.images.shape == (3, 1, 8, 8)
    assert sum(t == tokenizer.image_id for t in prompt.tokens) == 3 * per_image
    assert len(prompt.spans) == 2
    for start, end in prompt.spans:  # the demonstration text up to its <eos>, never an image
        assert prompt.tokens[end - 1] == tokenizer.eos_id
        assert tokenizer.image_id not in prompt.tokens[start:end]
        assert prompt.tokens[start - 1] == tokenizer.image_id


def test_encoder_demos_need_shots(tokenizer):
    model = MetaLM(CONFIG)
    test = load_digits("test")
    with pytest.raises(ValueError, match="shots"):
        evaluate(model, tokenizer, test, test, shots=0, encoder_demos=True, limit=1)


@pytest.mark.parametrize("limit", [0, -3])
def test_no_image_is_refused_not_scored_zero(tokenizer, limit):
    """An accuracy over zero images is undefined: refused, never a 0.0% that reads as a score."""
    model = MetaLM(CONFIG)
    test = load_digits("test")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluate(model, tokenizer, test, test, limit=limit)


def test_accuracy_over_zero_examples_is_not_a_number():
    empty = TaskAccuracy("digit", 0, False, 0, 0, 0.1)
    assert math.isnan(empty.accuracy)
    assert empty.accuracy_text() == "n/a (0 examples)"
    assert "n/a (0 examples)" in format_table([empty], "title")
    assert "0.0%" not in format_table([empty], "title").splitlines()[-1].split()  # 10.0% is chance
    assert TaskAccuracy("digit", 0, False, 1, 4, 0.1).accuracy_text() == "25.0%"


def test_finetuned_tiny_model_beats_chance_on_held_out_digits(tokenizer):
    """250 finetuning steps from scratch lift every task well above chance.

    Threshold: halfway from chance to perfect; measured on this seed: digit > 0.6, even 0.87.
    """
    torch.manual_seed(0)
    model = MetaLM(CONFIG)
    finetune_on_vqa(model, tokenizer, 250, token_budget=2048, lr=3e-3, progress=False)
    test, pool = load_digits("test"), load_digits("train")
    results = evaluate(model, tokenizer, test, pool, shots=0, limit=100)
    assert [r.task for r in results] == [task.name for task in QUESTIONS]
    for r in results:
        assert r.total == 100
        assert r.accuracy > r.chance + 0.5 * (1 - r.chance), r  # halfway from chance to perfect
    # the k-shot and encoder-demonstration prompts run through the same model
    k_shot = evaluate(model, tokenizer, test, pool, shots=2, encoder_demos=True, limit=4)
    assert all(r.total == 4 and r.shots == 2 and r.encoder_demos for r in k_shot)
