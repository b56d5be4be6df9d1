"""Scoring language tasks: candidate log-likelihoods in packed forwards, exact-match generation.

A classification question is answered as evaluation harnesses do: each
(prompt, candidate) pair is one document of a packed batch, ``prompt +
encode(" " + candidate)``, and the candidate's score is its tokens'
log-probabilities given the prompt. Many questions' candidates share one
forward (up to ``max_batch_tokens`` tokens per batch).

Normalisation, each task's own (``LanguageTask.normalize``) unless the caller
names one:

- ``"mean"`` averages over the candidate's tokens, so a title of eight tokens is
  not out-scored by one of two merely for being longer (topic, cloze);
- ``"sum"`` is the plain log-likelihood (what digit VQA uses: its candidates
  are one or two tokens);
- ``"pmi"`` is the pointwise mutual information of the candidate and the
  passage: its log-likelihood after the prompt less its log-likelihood after
  the question alone (:func:`question_prompt`, no passage, no demonstration),
  lm-evaluation-harness's ``acc_mutual_info``. A sentence of common words is
  likely after any passage; PMI asks how much *this* passage raises it
  (continuation: 34% held-out with "mean", 48% with "pmi", for one tiny
  two-stack model, 4000 pretraining and 1200 finetuning steps).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from metalm_fast.data.collator import SemiCausalBatch, build_batch
from metalm_fast.data.default_data import answer_tokens
from metalm_fast.evaluation.digits_vqa import TaskAccuracy
from metalm_fast.evaluation.language.example import (
    Example,
    Prompt,
    example_prompt,
    question_prompt,
    reads_spans,
)
from metalm_fast.evaluation.language.tasks import LANGUAGE_TASKS, LanguageTask, language_tasks
from metalm_fast.training.runtime import move_batch

__all__ = [
    "NORMALIZATIONS",
    "candidate_scores",
    "evaluate_language",
    "exact_match",
    "generate_answers",
    "packed_batch",
]

#: Accepted values of ``normalize``.
NORMALIZATIONS = ("mean", "sum", "pmi")


def _check_normalize(normalize) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def packed_batch(prompts: Sequence[Prompt], continuations: Sequence[list[int]]) -> SemiCausalBatch:
    """One packed document per (prompt, continuation), the prompts' spans kept."""
    documents, starts, ends = [], [], []
    offset = 0
    for prompt, continuation in zip(prompts, continuations, strict=True):
        documents.append(prompt.tokens + continuation)
        starts += [offset + s for s, _ in prompt.spans]
        ends += [offset + e for _, e in prompt.spans]
        offset += len(documents[-1])
    return build_batch(documents, starts, ends)


def _chunks(lengths: Sequence[int], max_batch_tokens: int):
    """Consecutive index ranges whose lengths sum to at most ``max_batch_tokens``
    (a longer single item is a chunk of its own)."""
    start, used = 0, 0
    for index, length in enumerate(lengths):
        if index > start and used + length > max_batch_tokens:
            yield range(start, index)
            start, used = index, 0
        used += length
    if start < len(lengths):
        yield range(start, len(lengths))


@torch.no_grad()
def candidate_scores(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    candidates: Sequence[Sequence[str]],
    *,
    normalize: str = "mean",
    unconditional: Sequence[Prompt] | None = None,
    max_batch_tokens: int = 16384,
) -> list[torch.Tensor]:
    """Each prompt's candidates' scores (float64 [len(candidates[i])]).

    The score is the sum (``normalize="sum"``) or the mean (``"mean"``) of the
    candidate tokens' log-probabilities given the prompt, or (``"pmi"``) that sum
    less the same sum given ``unconditional[i]`` (one prompt per prompt, needed
    for "pmi" only); batches run on the device of the model's parameters, under
    the caller's autocast, if any.
    """
    _check_normalize(normalize)
    if (normalize == "pmi") != (unconditional is not None):
        raise ValueError('unconditional prompts are needed with normalize="pmi", and only then')
    if normalize == "pmi":
        if len(unconditional) != len(prompts):
            raise ValueError(
                f"unconditional has {len(unconditional)} prompts, prompts has {len(prompts)}"
            )
        given = _log_likelihoods(model, tokenizer, prompts, candidates, False, max_batch_tokens)
        alone = _log_likelihoods(
            model, tokenizer, unconditional, candidates, False, max_batch_tokens
        )
        return [a - b for a, b in zip(given, alone, strict=True)]
    mean = normalize == "mean"
    return _log_likelihoods(model, tokenizer, prompts, candidates, mean, max_batch_tokens)


def _log_likelihoods(
    model, tokenizer, prompts, candidates, mean: bool, max_batch_tokens: int
) -> list[torch.Tensor]:
    """The candidates' summed (or mean) token log-probabilities given their prompt."""
    device = next(model.parameters()).device
    pairs = [
        (p, answer_tokens(tokenizer, c)) for p, options in enumerate(candidates) for c in options
    ]
    flat = torch.empty(len(pairs), dtype=torch.float64)
    lengths = [len(prompts[p].tokens) + len(tokens) for p, tokens in pairs]
    for chunk in _chunks(lengths, max_batch_tokens):
        batch = packed_batch([prompts[pairs[i][0]] for i in chunk], [pairs[i][1] for i in chunk])
        log_probs = torch.log_softmax(model.logits(move_batch(batch, device)).float(), dim=-1)
        log_probs = log_probs.cpu()
        for i, end in zip(chunk, batch.cu_seqlens[1:].tolist(), strict=True):
            targets = torch.tensor(pairs[i][1])
            # position t predicts token t + 1: the candidate is the document's last tokens
            positions = torch.arange(end - len(targets) - 1, end - 1)
            picked = log_probs[positions, targets].double()
            flat[i] = picked.mean() if mean else picked.sum()
    return list(flat.split([len(options) for options in candidates]))


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, *, batch_size: int = 64
) -> list[str]:
    """Each prompt's greedy continuation up to <eos> (or ``max_new_tokens``), decoded and
    stripped; through the paged KV cache."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = move_batch(packed_batch(chunk, [[] for _ in chunk]), device)
        for tokens in model.generate(batch, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id):
            if tokens and tokens[-1] == tokenizer.eos_id:
                tokens = tokens[:-1]
            answers.append(tokenizer.decode(tokens).strip())
    return answers


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> int:
    """How many predictions equal their answer, both stripped of surrounding whitespace.

    >>> exact_match(["Lambdas ", "Calls"], ["Lambdas", "Slicings"])
    1
    """
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers, strict=True))


def _answer_budget(tokenizer, examples: Sequence[Example]) -> int:
    """New tokens a generation may take: the longest answer's, plus its <eos>."""
    return 1 + max(len(answer_tokens(tokenizer, e.answer)) for e in examples)


def _correct(model, tokenizer, task: LanguageTask, prompts, test, normalize) -> int:
    if task.generative:
        predicted = generate_answers(model, tokenizer, prompts, _answer_budget(tokenizer, test))
        return exact_match(predicted, [e.answer for e in test])
    normalize = normalize or task.normalize
    unconditional = [question_prompt(tokenizer, e) for e in test] if normalize == "pmi" else None
    scores = candidate_scores(
        model,
        tokenizer,
        prompts,
        [e.candidates for e in test],
        normalize=normalize,
        unconditional=unconditional,
    )
    return sum(
        int(e.candidates[int(s.argmax())] == e.answer) for e, s in zip(test, scores, strict=True)
    )


def evaluate_language(
    model,
    tokenizer,
    tasks: Sequence[str] = LANGUAGE_TASKS,
    *,
    shots: int = 0,
    encoder_demos: bool = False,
    encode_passages: bool | None = None,
    limit: int | None = None,
    seed: int = 0,
    normalize: str | None = None,
) -> list[TaskAccuracy]:
    """Held-out accuracy of every task, against its chance level.

    Parameters
    ----------
    tasks : task names (:data:`LANGUAGE_TASKS`).
    shots : solved training examples before each question (0: zero-shot), drawn
        (seeded) afresh per question from the task's training split.
    encoder_demos : the demonstrations are read by the non-causal reader (needs
        ``shots > 0`` and a model with a text encoder).
    encode_passages : passages are spans (default: when the model reads spans).
    limit : the first ``limit`` held-out questions of each task (None: all).
    seed : the demonstration draws and the questions' distractors.
    normalize : candidate score normalisation (:data:`NORMALIZATIONS`) for every
        task; None: each task's own (``LanguageTask.normalize``).
    """
    if normalize is not None:
        _check_normalize(normalize)
    chosen = language_tasks(tasks)
    if limit is not None and limit < 1:  # an accuracy over no question is undefined
        raise ValueError(f"limit must be >= 1 (or None: every question), got {limit}")
    if encoder_demos and shots == 0:
        raise ValueError("encoder_demos needs shots > 0 (there is no demonstration to encode)")
    if encoder_demos and not getattr(model, "has_text_encoder", False):
        raise ValueError("encoder_demos needs a model with a text encoder")
    if encode_passages is None:
        encode_passages = reads_spans(model)
    pools = {task.name: task.examples("train", seed) for task in chosen}
    for name, pool in pools.items():
        if not 0 <= shots <= len(pool):  # k distinct demonstrations per question
            raise ValueError(
                f"shots must lie in [0, {len(pool)}] ({name}'s training examples), got {shots}"
            )
    rng = random.Random(f"language-demos-{seed}")
    results = []
    was_training = model.training
    model.eval()
    try:
        for task in chosen:
            test = task.examples("held_out", seed)[:limit]
            prompts = [
                example_prompt(
                    tokenizer,
                    example,
                    rng.sample(pools[task.name], shots),
                    encode_passages=encode_passages,
                    encoder_demos=encoder_demos,
                )
                for example in test
            ]
            correct = _correct(model, tokenizer, task, prompts, test, normalize)
            results.append(
                TaskAccuracy(task.name, shots, encoder_demos, correct, len(test), task.chance)
            )
    finally:
        model.train(was_training)
    return results
