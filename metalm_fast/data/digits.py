"""The embedded image data: scikit-learn's handwritten digits, with generated text.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 scans of handwritten
digits (UCI optdigits, grey levels 0..16) inside the package: nothing to
download. Captions and visual questions are generated from the labels, so
every image has exact, checkable text:

- :func:`caption`: a sentence naming the digit (several templates);
- :data:`QUESTIONS`: visual question answering tasks with single-word answers
  and their candidate sets, so accuracy can be compared with chance.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "DIGIT_SPLITS",
    "QUESTIONS",
    "DigitImages",
    "DigitQuestion",
    "caption",
    "caption_variants",
    "load_digits",
    "question_answer",
]

#: Accepted values of ``split``.
DIGIT_SPLITS = ("train", "test")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MAX_GREY_LEVEL = 16.0


@dataclass
class DigitImages:
    """A set of digit scans.

    images : float32 [N, 1, 8, 8], grey levels scaled to [0, 1]
    labels : int64 [N], the digit 0..9
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return bunch.images, bunch.target


def _stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """bool [N]: ``round(test_fraction * n_c)`` seeded random images of each class c."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(labels.shape[0], dtype=bool)
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        count = int(round(test_fraction * members.size))
        is_test[rng.permutation(members)[:count]] = True
    return is_test


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> DigitImages:
    """The train or test split of the 1,797 digit scans (stratified by label, seeded).

    Parameters
    ----------
    split : "train" or "test"; the two are disjoint and together hold every scan.
    test_fraction : share of each digit's scans in the test split, in (0, 1).
    seed : seed of the split; the same seed gives the same split.

    Returns
    -------
    DigitImages : images float32 [N, 1, 8, 8] in [0, 1], labels int64 [N],
        in the dataset's original order.

    Example
    -------
    >>> len(load_digits("train")) + len(load_digits("test"))
    1797
    """
    if split not in DIGIT_SPLITS:
        raise ValueError(f"split must be one of {DIGIT_SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels = _raw_digits()
    is_test = _stratified_test_mask(labels, test_fraction, seed)
    keep = is_test if split == "test" else ~is_test
    scaled = images[keep].astype(np.float32) / _MAX_GREY_LEVEL
    return DigitImages(
        images=torch.from_numpy(scaled).unsqueeze(1),
        labels=torch.from_numpy(labels[keep].astype(np.int64)),
    )


def _parity(label: int) -> str:
    return "even" if label % 2 == 0 else "odd"


_CAPTION_TEMPLATES: tuple[Callable[[int], str], ...] = (
    lambda d: f"a handwritten digit {d}.",
    lambda d: f"this image shows the number {_NUMBER_WORDS[d]}, an {_parity(d)} number.",
    lambda d: f"a scan of a handwritten {_NUMBER_WORDS[d]}.",
    lambda d: f"the digit {d}, written by hand.",
    lambda d: f"a small grey picture of the number {d} ({_NUMBER_WORDS[d]}).",
)


def _check_label(label: int) -> int:
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"label must be a digit 0..9, got {label}")
    return label


def caption_variants(label: int) -> tuple[str, ...]:
    """Every caption of a scan of ``label``, one per template.

    >>> caption_variants(3)[1]
    'this image shows the number three, an odd number.'
    """
    label = _check_label(label)
    return tuple(template(label) for template in _CAPTION_TEMPLATES)


def caption(label: int, rng: random.Random) -> str:
    """A caption for a scan of ``label``, one of :func:`caption_variants` chosen by ``rng``."""
    return rng.choice(caption_variants(label))


@dataclass(frozen=True)
class DigitQuestion:
    """One visual question answering task over digit scans.

    name : short identifier ("digit", "even", "greater_than_four")
    question : the question text
    answer_for : label -> answer string (one word, one of ``candidates``)
    candidates : every possible answer; guessing uniformly scores ``chance``
    """

    name: str
    question: str
    answer_for: Callable[[int], str]
    candidates: tuple[str, ...]

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the candidates."""
        return 1.0 / len(self.candidates)


def _yes_no(condition: bool) -> str:
    return "yes" if condition else "no"


#: The digit VQA tasks.
QUESTIONS: tuple[DigitQuestion, ...] = (
    DigitQuestion("digit", "what digit is this?", str, tuple(str(d) for d in range(10))),
    DigitQuestion("even", "is it even?", lambda d: _yes_no(d % 2 == 0), ("yes", "no")),
    DigitQuestion(
        "greater_than_four", "is it greater than four?", lambda d: _yes_no(d > 4), ("yes", "no")
    ),
)


def question_answer(task: DigitQuestion | str, label: int) -> str:
    """The answer of ``task`` (a :class:`DigitQuestion` or its name) for a scan of ``label``.

    >>> question_answer("even", 4)
    'yes'
    """
    if isinstance(task, str):
        by_name = {question.name: question for question in QUESTIONS}
        if task not in by_name:
            raise ValueError(f"task must be one of {sorted(by_name)}, got {task!r}")
        task = by_name[task]
    return task.answer_for(_check_label(label))
