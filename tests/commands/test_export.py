"""``metalm-fast export`` of a native run: transformers reads the decoder and its tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from metalm_fast.cli import main as cli_main  # noqa: E402
from metalm_fast.data.collator import build_batch  # noqa: E402
from metalm_fast.training.checkpoint import load_model  # noqa: E402


def test_a_native_run_exports_as_gpt_neox_with_its_tokenizer(tiny_checkpoint, tmp_path):
    exported = tmp_path / "hf"
    assert (
        cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--hf-out", str(exported)]) == 0
    )
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"]
    model = load_model(tiny_checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ids = tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "def f(x): return x"
    with torch.no_grad():
        ours = model.logits(build_batch([ids], [], []))
        logits = theirs(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, ours, rtol=1e-4, atol=1e-4)


def test_verify_reports_the_measured_difference(tiny_checkpoint, tmp_path, capsys):
    argv = ["export", "--checkpoint", str(tiny_checkpoint), "--hf-out", str(tmp_path / "hf")]
    assert cli_main([*argv, "--verify"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("verified: transformers' logits within ")
    assert float(line.split("within ")[1].split()[0]) < 1e-3


def test_export_needs_somewhere_to_write(tiny_checkpoint, capsys):
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "--hf-out" in capsys.readouterr().err
