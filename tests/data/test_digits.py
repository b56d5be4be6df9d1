"""The digits image data: splits, scaling, captions and VQA answers."""

import random

import pytest
import torch
from sklearn.datasets import load_digits as sklearn_load_digits

from metalm_fast.data.digits import (
    QUESTIONS,
    caption,
    caption_variants,
    load_digits,
    question_answer,
)


def test_splits_hold_every_scan_once_stratified():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797
    train_counts = torch.bincount(train.labels, minlength=10)
    test_counts = torch.bincount(test.labels, minlength=10)
    fraction = test_counts / (train_counts + test_counts)
    assert torch.all((fraction - 0.2).abs() < 0.01), "each digit splits 80/20"
    # together they are the dataset as a multiset: every scan exactly once
    raw = torch.from_numpy(sklearn_load_digits().images).float().flatten(1) / 16
    both = torch.cat([train.images, test.images]).flatten(1)
    assert _row_counts(both) == _row_counts(raw)


def _row_counts(rows):
    unique, counts = torch.unique(rows, dim=0, return_counts=True)
    return list(zip(map(tuple, unique.tolist()), counts.tolist()))


def test_images_are_scaled_float32_and_labels_are_digits():
    digits = load_digits("train")
    assert digits.images.dtype == torch.float32 and digits.images.shape[1:] == (1, 8, 8)
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0
    assert digits.labels.dtype == torch.int64
    assert set(digits.labels.tolist()) == set(range(10))


def test_split_is_seeded():
    a, b, c = load_digits("test", seed=0), load_digits("test", seed=0), load_digits("test", seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("task", QUESTIONS, ids=lambda task: task.name)
def test_answers_are_single_word_candidates_for_every_label(task):
    assert len(set(task.candidates)) == len(task.candidates)
    assert task.chance == pytest.approx(1 / len(task.candidates))
    answers = {question_answer(task, label) for label in range(10)}
    assert answers == set(task.candidates), "every candidate is the answer for some digit"
    assert all(" " not in answer for answer in answers)
    assert question_answer(task.name, 7) == task.answer_for(7)


def test_the_digit_tasks():
    by_name = {task.name: task for task in QUESTIONS}
    assert by_name["digit"].question == "what digit is this?" and by_name["digit"].chance == 0.1
    assert [question_answer("even", d) for d in (0, 3, 8)] == ["yes", "no", "yes"]
    assert [question_answer("greater_than_four", d) for d in (4, 5)] == ["no", "yes"]


def test_captions_name_the_digit():
    rng = random.Random(0)
    for label in range(10):
        variants = caption_variants(label)
        assert len(set(variants)) >= 3
        assert all(str(label) in text or " " + _word(label) in text for text in variants)
        assert caption(label, rng) in variants


def _word(label):
    return ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][label]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits("train", test_fraction=1.0)
    with pytest.raises(ValueError, match="label"):
        caption(10, random.Random(0))
    with pytest.raises(ValueError, match="task"):
        question_answer("odd", 3)
