"""Digit VQA evaluation: zero-shot, in-context (k-shot) and after finetuning.

Every held-out digit image is asked every question of
:data:`metalm_fast.data.digits.QUESTIONS` ("what digit is this?", "is it
even?", ...). The model's answer is the candidate with the highest
log-likelihood after the prompt (summed over the candidate's tokens), so an
accuracy is read against chance = 1 / number of candidates.

Prompts (formats from metalm_fast.data.default_data, one document each)::

    zero-shot   <bos> <image>*P " question: what digit is this? answer:"
    k-shot      k demonstrations  <bos> <image>*P " question: ... answer: 3" <eos>
                from the training split, then the zero-shot prompt

With ``encoder_demos=True`` the demonstrations' text (question, answer and
<eos>) is read by the non-causal text encoder as spans, and the decoder sees
their features instead of their tokens: the in-context combination the MetaLM
paper highlights. Images are always read by the vision encoder.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metalm_fast.data.collator import SemiCausalBatch, build_batch
from metalm_fast.data.default_data import answer_tokens, vqa_document, vqa_prompt
from metalm_fast.data.digits import QUESTIONS, DigitImages
from metalm_fast.training.runtime import move_batch

__all__ = ["Prompt", "TaskAccuracy", "build_prompt", "evaluate", "rank_candidates"]


@dataclass
class Prompt:
    """One prompt: tokens, the images it shows (in order), encoder spans (offsets in tokens)."""

    tokens: list[int]
    images: torch.Tensor  # float [I, C, H, W]
    spans: list[tuple[int, int]]


@dataclass
class TaskAccuracy:
    task: str
    shots: int
    encoder_demos: bool
    correct: int
    total: int
    chance: float

    @property
    def accuracy(self) -> float:
        """correct / total; NaN over zero examples (undefined, never a 0.0% that reads
        as a score). :meth:`accuracy_text` prints it."""
        return self.correct / self.total if self.total else math.nan

    def accuracy_text(self) -> str:
        """The accuracy as a percentage, or ``n/a (0 examples)``.

        >>> TaskAccuracy("digit", 0, False, 3, 4, 0.1).accuracy_text()
        '75.0%'
        >>> TaskAccuracy("digit", 0, False, 0, 0, 0.1).accuracy_text()
        'n/a (0 examples)'
        """
        return f"{self.accuracy:.1%}" if self.total else "n/a (0 examples)"


def build_prompt(
    tokenizer,
    tokens_per_image: int,
    question: str,
    image: torch.Tensor,
    demos: Sequence[tuple[str, str, torch.Tensor]] = (),
    *,
    encoder_demos: bool = False,
) -> Prompt:
    """The prompt for ``image`` [C, H, W], after ``demos`` (question, answer, image) triples."""
    tokens: list[int] = []
    spans: list[tuple[int, int]] = []
    images = []
    for demo_question, demo_answer, demo_image in demos:
        document = vqa_document(tokenizer, demo_question, demo_answer, tokens_per_image)
        if encoder_demos:
            # the demonstration's text follows its <bos> and image run
            spans.append((len(tokens) + 1 + tokens_per_image, len(tokens) + len(document)))
        tokens += document
        images.append(demo_image)
    tokens += vqa_prompt(tokenizer, question, tokens_per_image)
    images.append(image)
    return Prompt(tokens, torch.stack(images), spans)


def _batch(
    prompts: Sequence[Prompt], continuations: Sequence[list[int]], tokenizer, tokens_per_image: int
) -> SemiCausalBatch:
    documents, starts, ends, images = [], [], [], []
    offset = 0
    for prompt, continuation in zip(prompts, continuations, strict=True):
        documents.append(prompt.tokens + continuation)
        starts += [offset + s for s, _ in prompt.spans]
        ends += [offset + e for _, e in prompt.spans]
        images.append(prompt.images)
        offset += len(documents[-1])
    return build_batch(
        documents,
        starts,
        ends,
        images=torch.cat(images),
        image_token_id=tokenizer.image_id,
        tokens_per_image=tokens_per_image,
    )


@torch.no_grad()
def rank_candidates(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    candidates: Sequence[str],
    *,
    max_batch_tokens: int = 8192,
) -> list[int]:
    """Index of the most likely candidate answer for each prompt.

    Every (prompt, candidate) pair is one packed document; the score of a
    candidate is the sum of its tokens' log-probabilities given the prompt.
    Batches run on the device of the model's parameters (under the caller's
    autocast, if any).
    """
    tokens_per_image = model.config.tokens_per_image
    device = next(model.parameters()).device
    encoded = [answer_tokens(tokenizer, candidate) for candidate in candidates]
    pairs = [(p, c) for p in range(len(prompts)) for c in range(len(candidates))]
    scores = torch.empty(len(prompts), len(candidates), dtype=torch.float64)
    for chunk in _chunks(pairs, prompts, encoded, max_batch_tokens):
        batch = _batch(
            [prompts[p] for p, _ in chunk],
            [encoded[c] for _, c in chunk],
            tokenizer,
            tokens_per_image,
        )
        log_probs = torch.log_softmax(model.logits(move_batch(batch, device)).float(), dim=-1)
        log_probs = log_probs.cpu()
        ends = batch.cu_seqlens[1:].tolist()
        for (p, c), end in zip(chunk, ends, strict=True):
            targets = torch.tensor(encoded[c])
            # position t predicts token t + 1: the candidate's tokens are the last len(targets)
            positions = torch.arange(end - len(targets) - 1, end - 1)
            scores[p, c] = log_probs[positions, targets].sum().double()
    return scores.argmax(dim=1).tolist()


def _chunks(pairs, prompts, encoded, max_batch_tokens):
    chunk, used = [], 0
    for p, c in pairs:
        length = len(prompts[p].tokens) + len(encoded[c])
        if chunk and used + length > max_batch_tokens:
            yield chunk
            chunk, used = [], 0
        chunk.append((p, c))
        used += length
    if chunk:
        yield chunk


def evaluate(
    model,
    tokenizer,
    test: DigitImages,
    demo_pool: DigitImages,
    *,
    shots: int = 0,
    encoder_demos: bool = False,
    limit: int | None = None,
    seed: int = 0,
    tasks=QUESTIONS,
) -> list[TaskAccuracy]:
    """Accuracy of every task over the first ``limit`` test images.

    Demonstrations for k-shot prompts are drawn (seeded) from ``demo_pool``, a
    fresh draw per query, answered with the task's true answers.
    """
    if not 0 <= shots <= len(demo_pool.labels):  # k distinct demonstrations per prompt
        raise ValueError(
            f"shots must lie in [0, {len(demo_pool.labels)}] (demo_pool's images), got {shots}"
        )
    if limit is not None and limit < 1:  # an accuracy over no image is undefined
        raise ValueError(f"limit must be >= 1 (or None: every test image), got {limit}")
    if len(test.labels) == 0:
        raise ValueError("test holds no image: an accuracy over no image is undefined")
    if encoder_demos and shots == 0:
        raise ValueError("encoder_demos needs shots > 0 (there is no demonstration to encode)")
    count = len(test.labels) if limit is None else min(limit, len(test.labels))
    rng = random.Random(seed)
    results = []
    was_training = model.training
    model.eval()
    try:
        for task in tasks:
            prompts, truth = [], []
            for i in range(count):
                label = int(test.labels[i])
                demos = []
                for j in rng.sample(range(len(demo_pool.labels)), shots):
                    demo_label = int(demo_pool.labels[j])
                    demos.append((task.question, task.answer_for(demo_label), demo_pool.images[j]))
                prompts.append(
                    build_prompt(
                        tokenizer,
                        model.config.tokens_per_image,
                        task.question,
                        test.images[i],
                        demos,
                        encoder_demos=encoder_demos,
                    )
                )
                truth.append(task.candidates.index(task.answer_for(label)))
            predicted = rank_candidates(model, tokenizer, prompts, task.candidates)
            correct = sum(int(p == t) for p, t in zip(predicted, truth, strict=True))
            results.append(
                TaskAccuracy(
                    task.name, shots, encoder_demos, correct, count, 1.0 / len(task.candidates)
                )
            )
    finally:
        model.train(was_training)
    return results
