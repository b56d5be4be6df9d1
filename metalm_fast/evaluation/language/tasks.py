"""The language tasks by name, each with its examples per split and its chance level."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from metalm_fast.evaluation.language.cloze import cloze_examples
from metalm_fast.evaluation.language.continuation import continuation_examples
from metalm_fast.evaluation.language.corpus import LANGUAGE_SPLITS
from metalm_fast.evaluation.language.example import Example
from metalm_fast.evaluation.language.title import title_chance, title_examples
from metalm_fast.evaluation.language.topic import topic_examples

__all__ = ["LANGUAGE_TASKS", "TASKS", "LanguageTask", "language_tasks"]


@dataclass(frozen=True)
class LanguageTask:
    """A task: its name, its example builder, whether it is scored by exact match, and
    how its candidates are scored (a normalisation of
    :func:`~metalm_fast.evaluation.language.scoring.candidate_scores`)."""

    name: str
    build: Callable[[str, random.Random], list[Example]]
    generative: bool = False
    normalize: str = "mean"

    def examples(self, split: str, seed: int = 0, epoch: int = 0) -> list[Example]:
        """The task's examples of ``split`` ("train" or "held_out"), in a seeded order.

        The same (split, seed, epoch) gives the same list; another epoch of the
        training split draws fresh distractors and negatives (finetuning).
        """
        if split not in LANGUAGE_SPLITS:
            raise ValueError(f"split must be one of {LANGUAGE_SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}-{split}-{seed}-{epoch}")
        examples = self.build(split, rng)
        # shuffled: a --limit then takes a sample of every topic, not the first few
        rng.shuffle(examples)
        return examples

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess: 1 / candidates, or 1 / titles for exact match."""
        if self.generative:
            return title_chance()
        return self.examples("held_out")[0].chance


#: Every language task, by name (the ``--task`` values).
TASKS = {
    task.name: task
    for task in (
        LanguageTask("topic", topic_examples),
        # Candidate sentences differ in how likely they are on their own; what tells the
        # answer is how much the passage raises its likelihood (see continuation.py).
        LanguageTask("continuation", continuation_examples, normalize="pmi"),
        LanguageTask("cloze", cloze_examples),
        LanguageTask("title", title_examples, generative=True),
    )
}
#: Their names, in table order.
LANGUAGE_TASKS = tuple(TASKS)


def language_tasks(names=LANGUAGE_TASKS) -> list[LanguageTask]:
    """The tasks named; ValueError naming an unknown one."""
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown language task {unknown[0]!r}; choose from {LANGUAGE_TASKS}")
    return [TASKS[name] for name in names]
