"""The lm-evaluation-harness adapter ("metalm-fast"): its scores against direct computation.

The references here are computed one request at a time from the checkpoint's whole
model (``MetaLM.logits`` with its encoders, which the adapter leaves out) and from
``generate`` directly, with lm-eval's tokenization rules restated, so the adapter's
packing, truncation, window and stop-string code is checked, not reused. Tasks are
YAML files in a temporary directory over local JSONL files (offline).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from metalm_fast.data.collator import build_batch
from metalm_fast.data.tokenizer import load_tokenizer
from metalm_fast.evaluation.lm_eval import (
    MODEL_NAME,
    MetaLMEval,
    pack_by_tokens,
    resolve_device,
)
from metalm_fast.models import PRESETS, MetaLM
from metalm_fast.models.generation import generate
from metalm_fast.nn.architecture import BlockArchitecture
from metalm_fast.training.checkpoint import load_model, save_checkpoint

CONFIG = PRESETS["tiny"]  # a text encoder and a ViT too: the adapter runs the decoder only
#: |adapter - direct| of a summed log-probability (fp32 logits, sums of 10-250 nats;
#: measured at most 1.5e-6)
ATOL = 1e-5
REPO = Path(__file__).resolve().parents[2]

CONTEXTS = [
    ("def add(a, b):", " return a + b"),
    ("import os ", "path"),  # a trailing space moves to the continuation
    ("", "hello world"),  # empty context: the bos token
    ("for i in range(10):\n    ", "print(i)"),
    ("x", " = 1"),
    ("The quick brown fox jumps over the lazy dog. " * 3, "The end."),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A random tiny MetaLM saved as a training run (a run directory with ``latest``)."""
    torch.manual_seed(0)
    model = MetaLM(CONFIG)
    out = tmp_path_factory.mktemp("lm_eval_run") / "run"
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(out, 0, model, optimizer, model_config=CONFIG)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CONFIG.vocab_size)


@pytest.fixture(scope="module")
def model(run_dir):
    """The whole checkpoint (encoders included): the reference's model."""
    return load_model(run_dir)


def adapter(run_dir, **options) -> MetaLMEval:
    args = ",".join([f"checkpoint={run_dir}", *(f"{k}={v}" for k, v in options.items())])
    return get_model(MODEL_NAME).create_from_arg_string(args, {"device": "cpu"})


@pytest.fixture(scope="module")
def lm(run_dir) -> MetaLMEval:
    return adapter(run_dir, batch_tokens=64)  # small: the requests span several packs


def requests(kind: str, arguments) -> list[Instance]:
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


# ----------------------------------------------------------------------------- references
def encode_pair(tokenizer, context: str, continuation: str, bos: bool = True):
    """lm-eval's causal tokenization, with the bos token every document starts with
    (``bos``; an empty context is the bos token either way): (context, continuation) ids."""
    if context == "":
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    start = [tokenizer.bos_id] if bos else []
    context_ids = start + tokenizer.encode(context)
    whole = start + tokenizer.encode(context + continuation)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def direct_score(model, tokens: list[int], targets: list[int]) -> tuple[float, bool]:
    """The log-probability of ``targets`` after ``tokens[:-len(targets)]``, one document."""
    logits = model.logits(build_batch([tokens], [], []))[-len(targets) :]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    target = torch.tensor(targets)
    picked = log_probs.gather(1, target[:, None]).sum().item()
    return picked, bool((logits.argmax(dim=-1) == target).all())


def direct_loglikelihood(model, tokenizer, context, continuation, max_length=2048, bos=True):
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, bos)
    tokens = (context_ids + continuation_ids)[-(max_length + 1) :]
    return direct_score(model, tokens[:-1], continuation_ids)


def greedy_text(model, tokenizer, context: str, max_new_tokens: int) -> str:
    prompt = [tokenizer.bos_id, *tokenizer.encode(context)]
    tokens = generate(model, [prompt], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    return tokenizer.decode(tokens[0])


def assert_scores_close(got, expected):
    assert len(got) == len(expected)
    for (score, greedy), (want, want_greedy) in zip(got, expected, strict=True):
        assert abs(score - want) <= ATOL, (score, want)
        assert greedy == want_greedy


# ----------------------------------------------------------------------------- registration
def test_registered_under_its_name_next_to_the_built_in_models():
    assert get_model(MODEL_NAME) is MetaLMEval
    assert "hf" in lm_eval.api.registry.model_registry  # registering ours hid nothing


def test_import_metalm_fast_does_not_import_lm_eval():
    code = (
        "import sys, metalm_fast, metalm_fast.evaluation, metalm_fast.evaluation.digits_vqa; "
        "print('lm_eval' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- loglikelihood
def test_loglikelihood_equals_direct_computation_one_by_one(lm, model, tokenizer):
    got = lm.loglikelihood(requests("loglikelihood", CONTEXTS))
    expected = [direct_loglikelihood(model, tokenizer, c, x) for c, x in CONTEXTS]
    assert_scores_close(got, expected)


def test_without_bos_only_an_empty_context_reads_the_bos_token(run_dir, model, tokenizer):
    got = adapter(run_dir, add_bos_token=False).loglikelihood(requests("loglikelihood", CONTEXTS))
    expected = [direct_loglikelihood(model, tokenizer, c, x, bos=False) for c, x in CONTEXTS]
    assert_scores_close(got, expected)


def test_packed_batches_equal_one_request_per_forward(run_dir):
    instances = requests("loglikelihood", CONTEXTS)
    alone = adapter(run_dir, batch_tokens=1).loglikelihood(instances)  # every request alone
    packs = adapter(run_dir, batch_tokens=48).loglikelihood(instances)
    one_pack = adapter(run_dir, batch_tokens=100_000).loglikelihood(instances)
    assert_scores_close(packs, alone)
    assert_scores_close(one_pack, alone)


def test_is_greedy_when_every_continuation_token_is_the_argmax(lm, model, tokenizer):
    prompt = [tokenizer.bos_id, *tokenizer.encode("def f(x):")]
    new = generate(model, [prompt], max_new_tokens=4)[0]
    wrong = [*new[:-1], (new[-1] + 1) % CONFIG.vocab_size]
    scores = lm.score_tokens([(prompt + new[:-1], new), (prompt + wrong[:-1], wrong)])
    assert [greedy for _, greedy in scores] == [True, False]
    assert abs(scores[0][0] - direct_score(model, prompt + new[:-1], new)[0]) <= ATOL


def test_long_requests_lose_their_oldest_context_tokens(run_dir, model, tokenizer):
    short = adapter(run_dir, max_length=8, batch_tokens=20)
    pairs = [("alpha beta gamma delta epsilon zeta eta theta", " iota kappa"), ("a", " b")]
    got = short.loglikelihood(requests("loglikelihood", pairs))
    expected = [direct_loglikelihood(model, tokenizer, c, x, max_length=8) for c, x in pairs]
    assert_scores_close(got, expected)
    with pytest.raises(ValueError, match="continuation of .* tokens exceeds max_length=8"):
        short.loglikelihood(requests("loglikelihood", [("a", " one two three four five six")]))


def test_an_empty_continuation_is_certain(lm):
    assert lm.score_tokens([([1, 5, 6], [])]) == [(0.0, True)]


# ----------------------------------------------------------------------------- rolling
def test_rolling_in_one_window_is_the_whole_string_after_bos(lm, model, tokenizer):
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    tokens = [tokenizer.bos_id, *tokenizer.encode(text)]
    assert abs(got - direct_score(model, tokens[:-1], tokens[1:])[0]) <= ATOL


def test_rolling_windows_sum_the_direct_window_scores(run_dir, model, tokenizer):
    texts = ["the for statement iterates over the items of any sequence " * 3, "short", ""]
    rolling = adapter(run_dir, max_length=8, batch_tokens=20)
    got = rolling.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, total in zip(texts, got, strict=True):
        windows = get_rolling_token_windows(tokenizer.encode(text), tokenizer.bos_id, 8, 1)
        expected = 0.0
        for context, continuation in map(make_disjoint_window, windows):
            tokens = context + continuation
            expected += direct_score(model, tokens[:-1], continuation)[0]
        assert abs(total - expected) <= ATOL
    assert len(tokenizer.encode(texts[0])) > 3 * 8  # several windows were summed
    assert got[2] == 0.0


# ----------------------------------------------------------------------------- generation
def test_generate_until_equals_greedy_generate_cut_at_the_first_stop(lm, model, tokenizer):
    contexts = ["def f(x):", "class Point:\n    ", "import"]
    texts = [greedy_text(model, tokenizer, c, 12) for c in contexts]
    assert all(len(t) >= 6 for t in texts), texts
    # stop strings taken from the greedy texts themselves (the weights are random)
    stops = [[t[3:5]] for t in texts]
    stops[1] = [texts[1][4:6], texts[1][2:3]]  # two stops: the earlier one cuts
    args = [(c, {"until": s, "max_gen_toks": 12}) for c, s in zip(contexts, stops, strict=True)]
    args.append((contexts[0], {"until": [], "max_gen_toks": 12}))  # another group: no stop
    got = lm.generate_until(requests("generate_until", args))
    cut = [min(t.index(s) for s in stop) for t, stop in zip(texts, stops, strict=True)]
    assert got[:3] == [t[:end] for t, end in zip(texts, cut, strict=True)]
    assert got[3] == texts[0]


def test_generate_until_batched_equals_one_by_one(run_dir, lm):
    args = [(c, {"until": [], "max_gen_toks": 6}) for c in ("a", "def g(y, z):", "x = [1, 2")]
    instances = requests("generate_until", args)
    together = adapter(run_dir, batch_tokens=100_000).generate_until(instances)
    alone = [lm.generate_until([instance])[0] for instance in instances]
    assert together == alone


def test_generate_until_samples_when_asked(lm):
    args = [("def f(x):", {"until": [], "max_gen_toks": 6, "do_sample": True, "temperature": 1.5})]
    torch.manual_seed(3)
    first = lm.generate_until(requests("generate_until", args))
    torch.manual_seed(3)
    assert lm.generate_until(requests("generate_until", args)) == first


def test_generate_until_refuses_what_it_cannot_honour(lm):
    with pytest.raises(ValueError, match=r"gen_kwargs \['num_beams'\]: not supported"):
        lm.generate_until(requests("generate_until", [("a", {"until": [], "num_beams": 4})]))
    with pytest.raises(ValueError, match="max_gen_toks=4096 leaves no room"):
        lm.generate_until(requests("generate_until", [("a", {"max_gen_toks": 4096})]))


def test_a_sliding_window_decoder_generates_by_recomputation(tmp_path, tokenizer):
    """The paged decode path refuses sequences past the window; the adapter recomputes
    them under the window's mask. A learned position table also bounds max_length."""
    architecture = BlockArchitecture(positions="learned", max_positions=64, sliding_window=4)
    config = dataclasses.replace(
        CONFIG, encoder_layers=0, vision_layers=0, decoder_architecture=architecture
    )
    torch.manual_seed(1)
    windowed = MetaLM(config).eval()
    save_checkpoint(
        tmp_path, 0, windowed, torch.optim.AdamW(windowed.parameters()), model_config=config
    )
    lm = MetaLMEval(checkpoint=str(tmp_path), device="cpu")
    assert lm.max_length == 64
    context = "def function(argument):"
    (got,) = lm.generate_until(
        requests("generate_until", [(context, {"until": [], "max_gen_toks": 6})])
    )
    prompt = [tokenizer.bos_id, *tokenizer.encode(context)]
    assert len(prompt) > 4
    new = generate(windowed, [prompt], max_new_tokens=6, eos_id=tokenizer.eos_id, use_cache=False)
    assert got == tokenizer.decode(new[0])


# ----------------------------------------------------------------------------- harness runs
def write_task(directory: Path, name: str, rows: list[dict], config: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {directory / 'datasets_cache'}\n"
        "test_split: test\n" + config
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    choices = [
        {"question": "def add(a, b):", "choices": [" return a + b", " pass"], "answer": 0},
        {"question": "for i in", "choices": [" range(10):", " the house", " 42"], "answer": 0},
        {"question": "import", "choices": [" os", " sys", " re"], "answer": 2},
        {"question": "x =", "choices": [" 1", " None"], "answer": 1},
    ]
    write_task(
        directory,
        "metalm_mc",
        choices,
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n",
    )
    prompts = [{"prompt": p, "target": "1"} for p in ("def f(x):", "class A:", "while True:")]
    write_task(
        directory,
        "metalm_gen",
        prompts,
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{target}}"\n'
        "generation_kwargs:\n  until: ['(', 'e']\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    )
    return directory


def evaluate(run_dir, task_dir, task: str) -> dict:
    return lm_eval.simple_evaluate(
        model=MODEL_NAME,
        model_args=f"checkpoint={run_dir},batch_tokens=32",
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=4,
        bootstrap_iters=0,
        log_samples=True,
    )


def test_multiple_choice_task_end_to_end(run_dir, task_dir, model, tokenizer):
    results = evaluate(run_dir, task_dir, "metalm_mc")
    assert 0.0 <= results["results"]["metalm_mc"]["acc,none"] <= 1.0
    samples = results["samples"]["metalm_mc"]
    assert len(samples) == 4
    for sample in samples:
        got = [resp[0] for resp in sample["resps"]]
        expected = [direct_loglikelihood(model, tokenizer, c, x) for c, x in sample["arguments"]]
        assert_scores_close(got, expected)


def test_generate_until_task_end_to_end(run_dir, task_dir, model, tokenizer):
    results = evaluate(run_dir, task_dir, "metalm_gen")
    assert results["results"]["metalm_gen"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    samples = results["samples"]["metalm_gen"]
    assert len(samples) == 3
    for sample in samples:
        ((context, _),) = sample["arguments"]
        text = greedy_text(model, tokenizer, context, 10)
        assert sample["resps"] == [[text.split("(")[0].split("e")[0]]]


def test_the_command_line_wrapper_runs_a_task(run_dir, task_dir):
    """``python -m metalm_fast.evaluation.lm_eval``: lm-eval's CLI with the model registered
    (and without --device: the CLI's cuda:0 default falls back where there is no CUDA)."""
    command = [
        sys.executable,
        "-m",
        "metalm_fast.evaluation.lm_eval",
        "--model",
        MODEL_NAME,
        "--model_args",
        f"checkpoint={run_dir}",
        "--tasks",
        "metalm_mc",
        "--include_path",
        str(task_dir),
        "--limit",
        "2",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "metalm_mc" in out.stdout and "acc" in out.stdout


# ----------------------------------------------------------------------------- bad input
def test_a_missing_checkpoint_argument_is_named():
    with pytest.raises(ValueError, match="checkpoint: missing; pass model_args checkpoint=DIR"):
        get_model(MODEL_NAME).create_from_arg_string("batch_tokens=64")


def test_an_unknown_checkpoint_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="checkpoint=.*nowhere: no such directory"):
        MetaLMEval(checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="checkpoint=.*: no checkpoint at"):
        MetaLMEval(checkpoint=str(tmp_path))  # a directory, but no run in it


def test_bad_model_args_are_named(run_dir):
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        MetaLMEval(checkpoint=str(run_dir), pretrained="gpt2")
    with pytest.raises(ValueError, match="batch_tokens must be an int >= 1"):
        MetaLMEval(checkpoint=str(run_dir), batch_tokens=0)
    with pytest.raises(TypeError, match="add_bos_token must be True or False"):
        MetaLMEval(checkpoint=str(run_dir), add_bos_token="yes")
    with pytest.raises(ValueError, match="device='tpu': expected cpu, cuda, cuda:N or auto"):
        MetaLMEval(checkpoint=str(run_dir), device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_devices_without_cuda():
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available here"):
        resolve_device("cuda")
    # the harness's device is a preference (its CLI passes cuda:0 unless told otherwise)
    assert resolve_device(None, "cuda:0") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_model_args_device_wins_over_the_harness_device(run_dir):
    lm = get_model(MODEL_NAME).create_from_arg_string(
        f"checkpoint={run_dir},device=cpu", {"device": "cuda:0", "batch_size": 8}
    )
    assert lm.device == torch.device("cpu")


def test_pack_by_tokens_keeps_order_and_budget():
    assert pack_by_tokens([], 4) == []
    assert pack_by_tokens([3, 1, 5, 2, 2], 4) == [[0, 1], [2], [3, 4]]
