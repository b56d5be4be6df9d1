"""Embedded, offline language tasks on the pydoc topics: topic classification,
continuation, cloze and title generation, with fixed train / held-out splits
(:mod:`.corpus`), chance levels, packed candidate scoring (:mod:`.scoring`) and
a multitask finetuning stream (:mod:`.finetune`)."""

from metalm_fast.evaluation.language.example import (
    Example,
    Prompt,
    example_prompt,
    question_prompt,
    reads_spans,
)
from metalm_fast.evaluation.language.finetune import LanguageFinetuneData
from metalm_fast.evaluation.language.scoring import (
    candidate_scores,
    evaluate_language,
    exact_match,
    generate_answers,
)
from metalm_fast.evaluation.language.tasks import LANGUAGE_TASKS, TASKS, LanguageTask

__all__ = [
    "LANGUAGE_TASKS",
    "TASKS",
    "Example",
    "LanguageFinetuneData",
    "LanguageTask",
    "Prompt",
    "candidate_scores",
    "evaluate_language",
    "exact_match",
    "example_prompt",
    "generate_answers",
    "question_prompt",
    "reads_spans",
]
