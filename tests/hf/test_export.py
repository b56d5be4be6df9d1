"""export_decoder / export_metalm: MetaLMs out, read back by transformers and by us.

A loaded model exported goes back to its family bit for bit: every tensor
``torch.equal`` to the original transformers model's, and the same logits. A native
MetaLM exported loads in transformers with our logits (the rule of tests/tolerance.py:
ours in fp32 against transformers in float64, transformers in fp32 the baseline).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from metalm_fast.hf import HFFormatError
from metalm_fast.hf.decoders import load_decoder
from metalm_fast.hf.export import export_decoder, export_metalm, load_metalm, verify_export
from metalm_fast.models.metalm import MetaLM, MetaLMConfig
from metalm_fast.nn.architecture import BlockArchitecture
from tests.hf.test_decoders import CASES, VOCAB, hf_logits, packed, saved, sequences
from tests.models.test_vision import tiny_model, vision_language_batch
from tests.tolerance import assert_within_tolerance

transformers = pytest.importorskip("transformers")


def from_pretrained(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="sdpa", **kwargs
    ).eval()


def assert_same_model(original, back) -> None:
    """Same class, every tensor equal, the same logits."""
    assert type(back) is type(original)
    state, back_state = original.state_dict(), back.state_dict()
    assert state.keys() == back_state.keys()
    unequal = [name for name in state if not torch.equal(state[name], back_state[name])]
    assert not unequal, unequal
    ids = torch.tensor([sequences((12,))[0]])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, back(ids).logits)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", list(CASES))
def test_loaded_decoder_goes_back_to_its_family(case, tmp_path):
    model, path = saved(case, tmp_path / "source")
    out = export_decoder(load_decoder(path), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == model.config.architectures
    assert config["model_type"] == model.config.model_type
    assert_same_model(model, from_pretrained(out))


def test_sharded_source_round_trips(tmp_path):
    model, path = saved("llama_gqa", tmp_path / "source", max_shard_size="40KB")
    assert_same_model(model, from_pretrained(export_decoder(load_decoder(path), tmp_path / "out")))


def test_family_survives_export_metalm(tmp_path):
    """A Mistral without a window fits Llama too: its recorded family decides."""
    config = transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        sliding_window=None,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(tmp_path / "source"))
    ours = load_metalm(export_metalm(load_decoder(tmp_path / "source"), tmp_path / "metalm"))
    assert ours.hf_source["architecture"] == "MistralForCausalLM"
    assert_same_model(model, from_pretrained(export_decoder(ours, tmp_path / "out")))


def test_bfloat16_round_trips(tmp_path):
    model, path = saved("qwen2_bias_gqa", tmp_path / "source")
    out = export_decoder(load_decoder(path, dtype=torch.bfloat16), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = from_pretrained(out, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_generation_config_and_tokenizer_files(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(str(tmp_path / "tokenizer"))
    _, path = saved("gpt2_tied", tmp_path / "source")
    out = export_decoder(load_decoder(path), tmp_path / "out", tokenizer=tmp_path / "tokenizer")
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1}
    assert transformers.AutoTokenizer.from_pretrained(str(out))("w5 w7")["input_ids"] == [5, 7]
    with pytest.raises(HFFormatError, match="tokenizer"):
        export_decoder(load_decoder(path), tmp_path / "bad", tokenizer=tmp_path / "source")


# ----------------------------------------------------------------------------- native models
def native(seed: int = 0, kv_heads: int | None = None, **architecture) -> MetaLM:
    """A decoder-only MetaLM (width 64, 2 layers, 4 heads, MLP 100), weights perturbed."""
    config = MetaLMConfig(
        vocab_size=VOCAB,
        decoder_dim=64,
        decoder_layers=2,
        decoder_heads=4,
        decoder_kv_heads=kv_heads,
        decoder_mlp_hidden=100,
        encoder_dim=0,
        encoder_layers=0,
        encoder_heads=1,
        decoder_architecture=BlockArchitecture(**architecture),
    )
    torch.manual_seed(seed)
    model = MetaLM(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.15)
    return model.eval()


GATED = dict(norm="rmsnorm", mlp_kind="swiglu", mlp_bias=False, norm_eps=1e-6)
NATIVE = {
    "default": ({}, "GPTNeoXForCausalLM"),
    "neox_parallel_partial_bias": (
        dict(parallel_residual=True, rotary_fraction=0.5, qkv_bias=True, out_bias=True),
        "GPTNeoXForCausalLM",
    ),
    "neox_llama3_tanh": (
        dict(
            mlp_kind="gelu_tanh",
            rotary_base=5e4,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        "GPTNeoXForCausalLM",
    ),
    "llama_gqa": ({**GATED, "kv_heads": 2}, "LlamaForCausalLM"),
    "llama_biases_head_dim": (
        {**GATED, "mlp_bias": True, "qkv_bias": True, "out_bias": True, "head_dim": 24},
        "LlamaForCausalLM",
    ),
    "mistral_window": ({**GATED, "kv_heads": 1, "sliding_window": 5}, "MistralForCausalLM"),
    "qwen2": ({**GATED, "kv_heads": 2, "qkv_bias": True}, "Qwen2ForCausalLM"),
    "qwen2_window": ({**GATED, "qkv_bias": True, "sliding_window": 6}, "Qwen2ForCausalLM"),
    "gpt2": (
        dict(positions="learned", max_positions=40, qkv_bias=True, out_bias=True, mlp_kind="relu"),
        "GPT2LMHeadModel",
    ),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_native_decoder_loads_in_transformers(case, tmp_path):
    fields, architecture = NATIVE[case]
    fields = dict(fields)
    ours = native(kv_heads=fields.pop("kv_heads", None), **fields)
    out = export_decoder(ours, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    reference = from_pretrained(out)
    seqs = sequences()  # longer than the windows
    with torch.no_grad():
        actual = ours.logits(packed(seqs))
    golden = hf_logits(copy.deepcopy(reference).double(), seqs)
    assert_within_tolerance(actual, golden, hf_logits(reference, seqs), case)
    # ... and it reads back as the same MetaLM
    back = load_decoder(out)
    assert back.config.decoder_architecture == ours.config.decoder_architecture
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_tied_native_head_is_tied_in_transformers(tmp_path):
    out = export_decoder(native(), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reference = from_pretrained(out)
    assert reference.get_output_embeddings().weight is reference.get_input_embeddings().weight


def test_verify_compares_logits(tmp_path):
    ours = native(**GATED)
    out = export_decoder(ours, tmp_path / "out", verify=True)
    assert verify_export(ours, out) < 1e-4
    with torch.no_grad():
        ours.decoder.norm.weight.mul_(2)  # no longer the model on disk
    with pytest.raises(HFFormatError, match="differ"):
        verify_export(ours, out)


@pytest.mark.parametrize(
    "fields, reason",
    [
        (dict(post_norm=True), "pre-norm"),
        (dict(norm="rmsnorm"), "LayerNorm with bias"),  # with gelu: not Llama either
        (dict(mlp_kind="swiglu", qkv_bias=True), "RMSNorm"),  # LayerNorm: not Llama
        (dict(positions="none"), "rotary positions"),
    ],
)
def test_what_no_family_expresses_is_refused(fields, reason, tmp_path):
    with pytest.raises(HFFormatError, match="no transformers family") as error:
        export_decoder(native(**fields), tmp_path / "out")
    assert reason in str(error.value)
    for architecture in ("GPTNeoXForCausalLM", "LlamaForCausalLM", "GPT2LMHeadModel"):
        assert architecture in str(error.value)


def test_models_with_encoders_are_refused(tmp_path):
    with pytest.raises(HFFormatError, match="encoder_layers"):
        export_decoder(tiny_model(), tmp_path / "out")


# ----------------------------------------------------------------------------- whole MetaLM
def test_export_metalm_rebuilds_the_model(tmp_path):
    model = tiny_model(seed=3).eval()
    back = load_metalm(export_metalm(model, tmp_path / "metalm"))
    assert back.config == model.config
    assert back.lm_head.weight is back.embedding.weight
    state = model.state_dict()
    assert state.keys() == back.state_dict().keys()
    assert all(torch.equal(back.state_dict()[name], t) for name, t in state.items())
    batch = vision_language_batch(seed=1)
    with torch.no_grad():
        assert torch.equal(model.logits(batch), back.logits(batch))


def test_export_metalm_untied_and_cast(tmp_path):
    model = native(**GATED)
    model = MetaLM(dataclasses.replace(model.config, tie_embeddings=False)).eval()
    back = load_metalm(export_metalm(model, tmp_path / "metalm"), dtype=torch.bfloat16)
    assert back.lm_head.weight is not back.embedding.weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_load_metalm_names_a_bad_directory(tmp_path):
    with pytest.raises(HFFormatError, match="metalm_config.json"):
        load_metalm(tmp_path)
    _, path = saved("llama_gqa", tmp_path / "hf")
    with pytest.raises(HFFormatError, match="metalm_config.json"):
        load_metalm(path)
