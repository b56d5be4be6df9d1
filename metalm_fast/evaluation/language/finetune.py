"""The multitask finetuning stream: solved training examples of every language task, packed.

Each micro-batch holds whole :func:`example_document` s (a task drawn uniformly
per document, that task's next example) up to ``token_budget`` tokens, passages
as spans when the model reads spans (as the evaluation prompts), and only the
answer and its <eos> are scored: the model learns to answer, not to predict
the passage. Every pass over a task's training examples rebuilds them with a
fresh epoch (new distractors, new negatives), so finetuning does not memorise
one draw.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from metalm_fast.data.collator import IGNORE_INDEX, SemiCausalBatch, build_batch
from metalm_fast.data.default_data import answer_tokens
from metalm_fast.evaluation.language.example import Example, example_document, example_prompt
from metalm_fast.evaluation.language.tasks import LANGUAGE_TASKS, LanguageTask, language_tasks

__all__ = ["LanguageFinetuneData"]


def _task_epochs(task: LanguageTask, seed: int) -> Iterator[Example]:
    epoch = 0
    while True:
        yield from task.examples("train", seed, epoch)
        epoch += 1


class LanguageFinetuneData:
    """The tasks' training splits as an infinite deterministic stream of micro-batches.

    Parameters
    ----------
    tokenizer : the model's tokenizer.
    encode_passages : passages are spans (a model with a non-causal reader).
    tasks : task names mixed (default: all).
    token_budget : most tokens per micro-batch (whole documents only).
    seed : the task draws and the examples' epochs.
    """

    def __init__(
        self,
        tokenizer,
        *,
        encode_passages: bool,
        tasks: Sequence[str] = LANGUAGE_TASKS,
        token_budget: int = 2048,
        seed: int = 0,
    ):
        self.tasks = language_tasks(tasks)
        self.tokenizer, self.encode_passages = tokenizer, encode_passages
        self.token_budget, self.seed = token_budget, seed

    def _item(self, example: Example) -> tuple[list[int], list[tuple[int, int]], int]:
        """(document, its spans, how many of its last targets are scored)."""
        prompt = example_prompt(self.tokenizer, example, encode_passages=self.encode_passages)
        document = example_document(self.tokenizer, example)
        scored = len(answer_tokens(self.tokenizer, example.answer)) + 1  # and its <eos>
        if len(document) > self.token_budget:
            raise ValueError(
                f"token_budget {self.token_budget} cannot hold a {len(document)}-token "
                "finetuning document; raise token_budget"
            )
        return document, prompt.spans, scored

    def micro_batches(self) -> Iterator[SemiCausalBatch]:
        """Packed micro-batches, forever; the same sequence at every call."""
        rng = random.Random(f"language-finetune-{self.seed}")
        streams = [_task_epochs(task, self.seed) for task in self.tasks]
        pending = self._item(next(rng.choice(streams)))
        while True:
            group, used = [], 0
            while used + len(pending[0]) <= self.token_budget:
                group.append(pending)
                used += len(pending[0])
                pending = self._item(next(rng.choice(streams)))
            yield self._batch(group)

    def _batch(self, group) -> SemiCausalBatch:
        documents, starts, ends, keep = [], [], [], []
        offset = 0
        for document, spans, scored in group:
            documents.append(document)
            starts += [offset + s for s, _ in spans]
            ends += [offset + e for _, e in spans]
            # position t predicts t + 1: the answer and <eos> are the last `scored`
            # targets, at positions len - 1 - scored ... len - 2 (the last has none)
            keep += [
                len(document) - 1 - scored <= t < len(document) - 1 for t in range(len(document))
            ]
            offset += len(document)
        batch = build_batch(documents, starts, ends)
        batch.labels = torch.where(torch.tensor(keep), batch.labels, IGNORE_INDEX)
        return batch
