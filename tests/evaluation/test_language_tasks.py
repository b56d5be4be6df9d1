"""The language tasks: deterministic, disjoint splits, chance levels, and packed candidate
scoring that equals a direct log-probability computation from ``model.logits``."""

import dataclasses
import itertools
import re

import pytest
import torch

from metalm_fast.data.collator import IGNORE_INDEX, build_batch
from metalm_fast.data.default_data import answer_tokens
from metalm_fast.data.text_corpus import normalized, pydoc_documents
from metalm_fast.data.tokenizer import load_tokenizer
from metalm_fast.evaluation.language import (
    LANGUAGE_TASKS,
    TASKS,
    LanguageFinetuneData,
    candidate_scores,
    evaluate_language,
    exact_match,
    example_prompt,
    generate_answers,
    reads_spans,
    scoring,
)
from metalm_fast.evaluation.language.continuation import (
    CONTINUATION_CHOICES,
    LENGTH_TOLERANCE,
)
from metalm_fast.evaluation.language.corpus import paragraphs, sentences
from metalm_fast.evaluation.language.example import example_document, question_prompt
from metalm_fast.evaluation.language.topic import TOPIC_CHOICES, label_titles
from metalm_fast.models import PRESETS, MetaLM

TEXT_ONLY = dataclasses.replace(PRESETS["tiny"], vision_layers=0)
DESIGNS = {
    "two_stack": TEXT_ONLY,
    "single_stack": dataclasses.replace(TEXT_ONLY, variant="single_stack"),
    "decoder_only": dataclasses.replace(TEXT_ONLY, encoder_layers=0),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TEXT_ONLY.vocab_size)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(design="two_stack", seed=0):
    torch.manual_seed(seed)
    return MetaLM(DESIGNS[design]).eval()


# ----------------------------------------------------------------------------- the data
@pytest.mark.parametrize("name", LANGUAGE_TASKS)
def test_examples_are_deterministic_under_the_seed(name):
    task = TASKS[name]
    assert task.examples("held_out", seed=3) == task.examples("held_out", seed=3)
    assert task.examples("train", seed=3, epoch=1) == task.examples("train", seed=3, epoch=1)
    assert task.examples("held_out", seed=3) != task.examples("held_out", seed=4)  # order


def test_splits_are_disjoint_by_document():
    train, held_out = paragraphs("train"), paragraphs("held_out")
    assert {p.text for p in train}.isdisjoint(p.text for p in held_out)
    # held-out paragraphs come from the documents pretraining never reads, and no
    # paragraph pretraining reads is one of them re-wrapped or re-indented
    pretrained = {normalized(p) for doc in pydoc_documents("train") for p in doc.split("\n\n")}
    validation = " ".join(" ".join(doc.split()) for doc in pydoc_documents("validation"))
    for paragraph in held_out:
        assert paragraph.text in validation and normalized(paragraph.text) not in pretrained
    for name in LANGUAGE_TASKS:
        task = TASKS[name]
        seen = {e.passage for e in task.examples("train")}
        assert seen.isdisjoint(e.passage for e in task.examples("held_out")), name


def test_chance_levels_and_candidates():
    assert TASKS["topic"].chance == 1 / TOPIC_CHOICES == 0.25
    assert TASKS["continuation"].chance == 1 / CONTINUATION_CHOICES == 0.25
    assert TASKS["cloze"].chance == 0.25
    assert TASKS["title"].chance == 1 / len(label_titles())
    for name in ("topic", "continuation", "cloze"):
        for example in TASKS[name].examples("held_out"):
            assert example.candidates.count(example.answer) == 1
            assert len(set(example.candidates)) == len(example.candidates)
            assert example.chance == 0.25
    titles = set(label_titles())
    assert all(e.answer in titles and not e.candidates for e in TASKS["title"].examples("train"))


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_continuation_answers_follow_and_distractors_give_nothing_away(split):
    examples = TASKS["continuation"].examples(split)
    texts = [p.text for p in paragraphs(split)]
    followers = {b for text in texts for a, b in zip(sentences(text), sentences(text)[1:])}
    assert len(examples) > (100 if split == "held_out" else 600)
    trained = {s for p in paragraphs("train") for s in sentences(p.text)}
    for example in examples:
        if split == "held_out":  # a sentence recurring across paragraphs is no leak either
            assert not trained.intersection([example.passage, *example.candidates])
        # the answer is the passage's next sentence in some paragraph of the split
        assert any(f"{example.passage} {example.answer}" in text for text in texts)
        words = len(example.answer.split())
        for other in set(example.candidates) - {example.answer}:
            assert other in followers  # a second sentence too, of this split only
            assert other != example.passage
            assert abs(len(other.split()) - words) <= max(2, round(LENGTH_TOLERANCE * words))
    # no surface cue: the answer's slot and "pick the longest" are at chance
    slots = [e.candidates.index(e.answer) for e in examples]
    assert all(0.15 < slots.count(i) / len(slots) < 0.35 for i in range(CONTINUATION_CHOICES))
    longest = sum(max(e.candidates, key=len) == e.answer for e in examples) / len(examples)
    assert 0.15 < longest < 0.35


def test_cloze_distractors_never_occur_in_the_passage():
    for example in TASKS["cloze"].examples("held_out"):
        assert "____" in example.passage
        words = set(re.findall(r"[a-z]+", example.passage.lower()))
        assert example.answer in words  # it recurs in the passage
        for other in set(example.candidates) - {example.answer}:
            assert other not in words


# ----------------------------------------------------------------------------- prompts
def test_prompt_layout_spans_and_prefix(tokenizer):
    train = TASKS["topic"].examples("train")
    example, demos = train[0], train[1:3]
    prompt = example_prompt(tokenizer, example, demos, encode_passages=True)
    solved = [example_document(tokenizer, d) for d in demos]
    query = prompt.tokens[sum(map(len, solved)) :]
    assert prompt.tokens[: len(query) and sum(map(len, solved))] == solved[0] + solved[1]
    assert example_document(tokenizer, example)[: len(query)] == query  # a prefix
    passages = [tokenizer.decode(prompt.tokens[s:e]) for s, e in prompt.spans]
    assert passages == [demos[0].passage, demos[1].passage, example.passage]
    encoded = example_prompt(tokenizer, example, demos, encoder_demos=True)
    for start, end in encoded.spans:  # a whole solved demonstration after its <bos>
        assert encoded.tokens[start - 1] == tokenizer.bos_id
        assert encoded.tokens[end - 1] == tokenizer.eos_id
    assert example_prompt(tokenizer, example, demos).spans == []


# ----------------------------------------------------------------------------- scoring
def _direct_scores(model, tokenizer, prompt, candidates):
    """Each candidate's summed log-probability, one forward per candidate."""
    scores = []
    for candidate in candidates:
        target = answer_tokens(tokenizer, candidate)
        tokens = prompt.tokens + target
        starts = [s for s, _ in prompt.spans]
        ends = [e for _, e in prompt.spans]
        with torch.no_grad():
            logits = model.logits(build_batch([tokens], starts, ends))
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        n = len(prompt.tokens)
        scores.append(sum(float(log_probs[n - 1 + i, t]) for i, t in enumerate(target)))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_candidate_scores_equal_direct_log_probs(tokenizer, design):
    model = _model(design)
    examples = TASKS["topic"].examples("held_out")[:2] + TASKS["cloze"].examples("held_out")[:1]
    prompts = [example_prompt(tokenizer, e, encode_passages=reads_spans(model)) for e in examples]
    assert bool(prompts[0].spans) == (design != "decoder_only")
    sums = candidate_scores(
        model, tokenizer, prompts, [e.candidates for e in examples], normalize="sum"
    )
    means = candidate_scores(model, tokenizer, prompts, [e.candidates for e in examples])
    for prompt, example, total, mean in zip(prompts, examples, sums, means):
        direct = _direct_scores(model, tokenizer, prompt, example.candidates)
        torch.testing.assert_close(total, direct, atol=1e-4, rtol=1e-5)
        lengths = torch.tensor([len(answer_tokens(tokenizer, c)) for c in example.candidates])
        torch.testing.assert_close(mean, direct / lengths, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("design", ["two_stack", "decoder_only"])
def test_pmi_scores_are_given_less_alone(tokenizer, design):
    """PMI: the summed log-probability after the prompt less the one after the question
    alone (no passage), each a direct one-forward-per-candidate computation."""
    model = _model(design)
    examples = TASKS["continuation"].examples("held_out")[:3]
    prompts = [example_prompt(tokenizer, e, encode_passages=reads_spans(model)) for e in examples]
    alone = [question_prompt(tokenizer, e) for e in examples]
    assert all(not p.spans and p.tokens[0] == tokenizer.bos_id for p in alone)
    candidates = [e.candidates for e in examples]
    pmi = candidate_scores(
        model, tokenizer, prompts, candidates, normalize="pmi", unconditional=alone
    )
    for prompt, null, example, score in zip(prompts, alone, examples, pmi):
        given = _direct_scores(model, tokenizer, prompt, example.candidates)
        without = _direct_scores(model, tokenizer, null, example.candidates)
        torch.testing.assert_close(score, given - without, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="unconditional prompts are needed"):
        candidate_scores(model, tokenizer, prompts, candidates, normalize="pmi")
    with pytest.raises(ValueError, match="unconditional prompts are needed"):
        candidate_scores(model, tokenizer, prompts, candidates, unconditional=alone)
    with pytest.raises(ValueError, match="unconditional has 2 prompts, prompts has 3"):
        candidate_scores(
            model, tokenizer, prompts, candidates, normalize="pmi", unconditional=alone[:2]
        )


def test_each_task_scores_with_its_own_normalisation(tokenizer, monkeypatch):
    """normalize=None: continuation by PMI (against the questions alone), topic and cloze
    by the mean; a normalisation named applies to every task."""
    used = []
    real = scoring.candidate_scores

    def recording(*args, normalize, unconditional, **kwargs):
        used.append((normalize, unconditional is not None))
        return real(*args, normalize=normalize, unconditional=unconditional, **kwargs)

    monkeypatch.setattr(scoring, "candidate_scores", recording)
    model = _model()
    tasks = ["topic", "continuation", "cloze"]
    evaluate_language(model, tokenizer, tasks, limit=2)
    assert used == [("mean", False), ("pmi", True), ("mean", False)]
    used.clear()
    evaluate_language(model, tokenizer, tasks, limit=2, normalize="sum")
    assert used == [("sum", False)] * 3


@pytest.mark.parametrize("design", ["two_stack", "single_stack"])
def test_batched_scores_equal_one_by_one(tokenizer, design):
    model = _model(design)
    train = TASKS["continuation"].examples("train")
    examples = TASKS["continuation"].examples("held_out")[:6]
    prompts = [
        example_prompt(tokenizer, e, train[i : i + 1], encode_passages=True)
        for i, e in enumerate(examples)
    ]
    candidates = [e.candidates for e in examples]
    packed = candidate_scores(model, tokenizer, prompts, candidates)
    alone = candidate_scores(model, tokenizer, prompts, candidates, max_batch_tokens=1)
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_exact_match_scoring(tokenizer, monkeypatch):
    assert exact_match(["Calls", " Lambdas\n", "lambdas"], ["Calls", "Lambdas", "Lambdas"]) == 2
    model = _model()
    test = TASKS["title"].examples("held_out")[:5]
    # generation itself: greedy through the KV cache, the same as model.generate
    prompts = [example_prompt(tokenizer, e, encode_passages=True) for e in test[:2]]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # scoring: one wrong answer of five
    wrong = [e.answer for e in test[:4]] + ["not a title"]
    monkeypatch.setattr(scoring, "generate_answers", lambda *args, **kwargs: list(wrong))
    (result,) = evaluate_language(model, tokenizer, ["title"], limit=5)
    assert (result.correct, result.total) == (4, 5)
    assert result.chance == TASKS["title"].chance


def test_evaluate_counts_and_shots(tokenizer):
    model = _model()
    results = evaluate_language(model, tokenizer, shots=1, encoder_demos=True, limit=3)
    assert [r.task for r in results] == list(LANGUAGE_TASKS)
    assert all(r.total == 3 and r.shots == 1 and r.encoder_demos for r in results)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": ["nope"]}, "unknown language task 'nope'"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"shots": 10**6}, "shots must lie in"),
        ({"encoder_demos": True}, "encoder_demos needs shots > 0"),
        ({"normalize": "max", "tasks": ["topic"]}, "normalize must be one of"),
    ],
)
def test_errors(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_language(_model(), tokenizer, **{"limit": 1, **kwargs})


def test_encoder_demos_need_a_text_encoder(tokenizer):
    with pytest.raises(ValueError, match="text encoder"):
        evaluate_language(_model("single_stack"), tokenizer, shots=1, encoder_demos=True, limit=1)


# ----------------------------------------------------------------------------- finetuning
def test_finetuning_stream_scores_only_answers(tokenizer):
    data = LanguageFinetuneData(tokenizer, encode_passages=True, token_budget=512, seed=1)
    first = list(itertools.islice(data.micro_batches(), 3))
    again = list(itertools.islice(data.micro_batches(), 3))
    for a, b in zip(first, again):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    for batch in first:
        assert batch.input_ids.numel() <= 512 and batch.span_starts.numel() > 0
        scored = batch.labels[batch.labels != IGNORE_INDEX]
        ends = batch.cu_seqlens[1:] - 1
        # every document's last scored target is its <eos>
        assert torch.equal(batch.labels[ends - 1], batch.input_ids[ends])
        assert (batch.input_ids[ends] == tokenizer.eos_id).all()
        assert 0 < scored.numel() < batch.input_ids.numel() // 4
    with pytest.raises(ValueError, match="token_budget"):
        next(
            LanguageFinetuneData(tokenizer, encode_passages=False, token_budget=16).micro_batches()
        )
