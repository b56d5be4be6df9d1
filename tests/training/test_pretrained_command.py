"""``metalm-fast train --decoder DIR --text-encoder DIR --vision-encoder DIR``, then
``generate`` and ``eval`` on the run, as a user would call them."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from metalm_fast import hf  # noqa: E402
from metalm_fast.cli import main as cli_main  # noqa: E402
from metalm_fast.data.tokenizer import load_tokenizer  # noqa: E402
from metalm_fast.training.checkpoint import load_model  # noqa: E402
from metalm_fast.training.command import main as train_main  # noqa: E402
from metalm_fast.training.pretrained import run_tokenizer  # noqa: E402
from tests.hf import tiny_parts  # noqa: E402

DECODER_VOCAB, ENCODER_VOCAB = 300, 280


def _save(model, directory, tokenizer=None):
    model.save_pretrained(directory)
    if tokenizer is not None:  # as a transformers fast tokenizer directory holds it
        tokenizer.save(directory / "tokenizer.json")
        settings = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    llama = tiny_parts.llama(transformers, DECODER_VOCAB, width=32, num_attention_heads=2)
    # The encoder has another vocabulary: each span is re-tokenized with its tokenizer.
    bert = tiny_parts.bert(transformers, ENCODER_VOCAB, num_hidden_layers=2, intermediate_size=40)
    return {
        "decoder": _save(llama, root / "llama", load_tokenizer(DECODER_VOCAB)),
        "text": _save(bert, root / "bert", load_tokenizer(ENCODER_VOCAB)),
        "vision": _save(tiny_parts.clip_vision(transformers), root / "clip"),
    }


def _train(parts, out, *extra):
    return train_main(
        [
            "--decoder", str(parts["decoder"]),
            "--text-encoder", str(parts["text"]),
            "--vision-encoder", str(parts["vision"]),
            "--steps", "2",
            "--micro-batch-tokens", "512",
            "--device", "cpu",
            "--no-progress",
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip


def test_train_generate_and_eval_a_pretrained_run(parts, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(parts, out, "--freeze-encoder-layers", "1") == 0
    model = load_model(out)
    assert model.config.text_encoder is not None and model.config.freeze_encoder_layers == 1
    assert model.config.tokens_per_image == 5  # CLIP: 2 x 2 patches and the class row
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "encoder_tokenizer" / "tokenizer.json").is_file()
    assert run_tokenizer(out, model.config.vocab_size).vocab_size == DECODER_VOCAB
    # The frozen embeddings did not move.
    bert = transformers.BertModel.from_pretrained(parts["text"])
    assert torch.equal(
        bert.embeddings.word_embeddings.weight, model.text_encoder.word_embeddings.weight
    )
    capsys.readouterr()
    code = cli_main(
        [
            "generate", "--checkpoint", str(out), "--prompt", "def <image> f",
            "--image", "digit:0", "--max-new-tokens", "3", "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("> def <image> f")
    assert len(printed.strip().splitlines()) >= 2
    code = cli_main(
        ["eval", "--checkpoint", str(out), "--shots", "0", "--limit", "4", "--device", "cpu"]
    )
    assert code == 0
    assert "chance" in capsys.readouterr().out


def test_pretrained_flags_refuse_what_cannot_work(parts, tmp_path, capsys):
    assert train_main(["--text-encoder", str(parts["text"]), "--steps", "1"]) == 2
    assert "need --decoder" in capsys.readouterr().err
    assert train_main(["--decoder", str(parts["decoder"]), "--preset", "tiny"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    # No tokenizer.json beside the CLIP weights: it cannot be a decoder.
    assert train_main(["--decoder", str(parts["vision"])]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    # A decoder alone has no text encoder for the default data's spans.
    assert train_main(["--decoder", str(parts["decoder"]), "--data", "synthetic"]) == 2
    assert "no text encoder" in capsys.readouterr().err
    # A run already there is refused, and its tokenizer copies are left alone.
    out = tmp_path / "run"
    assert _train(parts, out) == 0
    before = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert _train(parts, out) == 2
    assert "overwrite" in capsys.readouterr().err
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == before


def test_a_decoder_alone_trains_as_the_single_stack(parts, tmp_path):
    out = tmp_path / "single"
    argv = ["--decoder", str(parts["decoder"]), "--variant", "single_stack", "--data",
            "synthetic", "--steps", "1", "--micro-batch-tokens", "256", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert train_main(argv) == 0
    assert load_model(out).config.variant == "single_stack"


def test_export_a_pretrained_run_back_to_its_family(parts, tmp_path):
    out = tmp_path / "run"
    assert _train(parts, out) == 0
    exported, whole = tmp_path / "hf", tmp_path / "whole"
    argv = ["export", "--checkpoint", str(out), "--hf-out", str(exported), "--metalm-out",
            str(whole), "--verify"]  # fmt: skip
    assert cli_main(argv) == 0
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (exported / "tokenizer.json").read_bytes() == (
        parts["decoder"] / "tokenizer.json"
    ).read_bytes()
    trained = load_model(out)
    llama = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert torch.equal(llama.model.embed_tokens.weight, trained.embedding.weight)
    assert torch.equal(
        llama.model.layers[1].mlp.down_proj.weight, trained.decoder.blocks[1].mlp.down.weight
    )
    rebuilt = hf.load_metalm(whole)
    for (name, ours), (_, theirs) in zip(
        trained.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
