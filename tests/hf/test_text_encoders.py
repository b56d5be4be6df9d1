"""load_text_encoder: BERT, RoBERTa and ELECTRA directories against transformers itself.

Tiny models with random weights (hidden 64, 2 layers, 4 heads, an odd MLP width of
100, vocab 300; ELECTRA's embeddings 32 wide) are saved with save_pretrained, loaded,
and run on a packed batch of 3 sequences (lengths 7, 1, 12). The tolerance rule
(tests/tolerance.py) decides: the golden is transformers in float64, the baseline
transformers in fp32, both on each sequence alone and on the padded batch with an
attention mask; the packed fp32 encoder must meet it.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from metalm_fast.hf import HFFormatError, load_text_encoder  # noqa: E402
from tests.tolerance import assert_within_tolerance  # noqa: E402

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=100,
    vocab_size=300,
    max_position_embeddings=40,
)
#: name -> (config class, model class, config changes). One activation each of the
#: mapped kinds; the MLM and pretraining classes put the encoder under a prefix.
MODELS = {
    "bert": ("BertConfig", "BertModel", {}),
    "bert_mlm": ("BertConfig", "BertForMaskedLM", {"hidden_act": "relu"}),
    "roberta": ("RobertaConfig", "RobertaModel", {"max_position_embeddings": 42}),
    "roberta_mlm": (
        "RobertaConfig",
        "RobertaForMaskedLM",
        {"max_position_embeddings": 42, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5},
    ),
    "electra": ("ElectraConfig", "ElectraForPreTraining", {"embedding_size": 32}),
}
SHARDED = ("bert_mlm", "electra")  # saved in shards: model.safetensors.index.json
LENGTHS = (7, 1, 12)


def hf_model(name: str):
    """A tiny transformers model with every weight randomised (LayerNorm weights near 1):
    fresh LayerNorms and biases are ones and zeros, which would hide a mapping mistake."""
    config_class, model_class, changes = MODELS[name]
    config = getattr(transformers, config_class)(
        **{**SIZES, **changes}, attn_implementation="eager"
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            noise = 0.1 * torch.randn_like(param)
            param.copy_(1 + noise if "LayerNorm.weight" in param_name else noise)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (transformers model, its save_pretrained directory)."""
    out = {}
    for name in MODELS:
        model = hf_model(name)
        directory = tmp_path_factory.mktemp(name)
        shard = {"max_shard_size": "50KB"} if name in SHARDED else {}
        model.save_pretrained(directory, **shard)
        out[name] = (model, directory)
    return out


def packed_batch(pad: int):
    """Random ids (never ``pad``, except one inside the first sequence: RoBERTa numbers
    positions around it) -> (ids [N], cu_seqlens, sequences)."""
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(2, 300, (n,), generator=generator) for n in LENGTHS]
    sequences = [torch.where(s == pad, pad + 1, s) for s in sequences]
    sequences[0][3] = pad
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    return torch.cat(sequences), cu, sequences


def hf_alone(model, sequences) -> torch.Tensor:
    """last_hidden_state of each sequence run by itself, concatenated."""
    base = model.base_model
    return torch.cat([base(input_ids=s[None]).last_hidden_state[0] for s in sequences])


def hf_padded(model, sequences, pad: int) -> torch.Tensor:
    """last_hidden_state of the right-padded batch (attention_mask), valid rows only."""
    longest = max(s.numel() for s in sequences)
    ids = torch.full((len(sequences), longest), pad)
    mask = torch.zeros(len(sequences), longest, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : sequence.numel()], mask[row, : sequence.numel()] = sequence, 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[mask.bool()]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", MODELS)
def test_packed_forward_matches_transformers(saved, name):
    model, directory = saved[name]
    encoder = load_text_encoder(directory)
    pad = model.config.pad_token_id
    ids, cu, sequences = packed_batch(pad)
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        out = encoder(ids, cu)
        assert_within_tolerance(
            out, hf_alone(double, sequences), hf_alone(model, sequences), f"{name} alone"
        )
        assert_within_tolerance(
            out,
            hf_padded(double, sequences, pad),
            hf_padded(model, sequences, pad),
            f"{name} padded",
        )
    assert encoder.dim == 64 and encoder.vocab_size == 300 and encoder.pad_token_id == pad


def test_sharded_directories_were_sharded(saved):
    for name in SHARDED:
        assert (saved[name][1] / "model.safetensors.index.json").is_file(), name


def test_gradients_match_transformers(saved):
    """Backward runs, every gradient is finite, and the gradients of the word embeddings
    and of the first layer's query weight meet the rule against transformers'."""
    model, directory = saved["bert"]
    encoder = load_text_encoder(directory)
    ids, cu, sequences = packed_batch(model.config.pad_token_id)
    encoder(ids, cu).pow(2).sum().backward()
    for param_name, param in encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name

    def hf_grads(reference):
        reference.zero_grad()
        hf_alone(reference, sequences).pow(2).sum().backward()
        layer = reference.encoder.layer[0].attention.self
        return reference.embeddings.word_embeddings.weight.grad, layer.query.weight.grad

    golden, baseline = hf_grads(copy.deepcopy(model).double()), hf_grads(copy.deepcopy(model))
    ours = (encoder.word_embeddings.weight.grad, encoder.stack.blocks[0].attention.qkv.weight.grad)
    ours = (ours[0], ours[1][:64])  # the query rows of the fused qkv
    for label, mine, gold, base in zip(("word_embeddings", "query"), ours, golden, baseline):
        assert_within_tolerance(mine, gold, base, f"grad {label}")


def test_loads_through_the_package_entry_point_with_a_dtype(saved):
    encoder = load_text_encoder(saved["electra"][1], dtype=torch.bfloat16)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert encoder.embedding_project.weight.shape == (64, 32)
    ids, cu, _ = packed_batch(0)
    assert encoder(ids, cu).dtype == torch.bfloat16


def test_records_the_tokenizer_file(saved, tmp_path):
    directory = copy_of(saved["bert"][1], tmp_path)
    assert load_text_encoder(directory).tokenizer_file is None
    (directory / "tokenizer.json").write_text("{}")
    assert load_text_encoder(directory).tokenizer_file == str(directory / "tokenizer.json")


def test_legacy_layernorm_gamma_beta_names_load(saved, tmp_path):
    model, source = saved["bert"]
    directory = copy_of(source, tmp_path)

    def legacy(name):
        return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )

    rewrite_tensors(directory, lambda tensors: {legacy(k): v for k, v in tensors.items()})
    ids, cu, _ = packed_batch(0)
    with torch.no_grad():
        assert torch.equal(
            load_text_encoder(directory)(ids, cu), load_text_encoder(source)(ids, cu)
        )


# ----------------------------------------------------------------------------- errors
def copy_of(directory, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(directory, target)
    return target


def rewrite_config(directory, **changes):
    file = directory / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def rewrite_tensors(directory, edit):
    """Apply ``edit`` (dict -> dict) to the single-file weights of ``directory``."""
    file = directory / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not a supported text encoder"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
        ({"is_decoder": True}, "is_decoder is true"),
        ({"add_cross_attention": True}, "add_cross_attention is true"),
        ({"hidden_act": "tanh"}, "hidden_act 'tanh' is not supported"),
        ({"hidden_size": None}, "'hidden_size' is required"),
        ({"num_attention_heads": 5}, "divisible by num_heads"),
    ],
)
def test_unsupported_configs_raise(saved, tmp_path, changes, pattern):
    directory = copy_of(saved["bert"][1], tmp_path)
    rewrite_config(directory, **changes)
    with pytest.raises(HFFormatError, match=pattern):
        load_text_encoder(directory)


def _drop(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def _set(name, value):
    return lambda tensors: {**tensors, name: value}


@pytest.mark.parametrize(
    ("model", "edit", "pattern"),
    [
        (
            "bert",
            _drop("encoder.layer.1.attention.self.key.bias"),
            r"'encoder\.layer\.1\.attention\.self\.key\.bias' is missing",
        ),
        (
            "roberta_mlm",
            _drop("roberta.embeddings.position_embeddings.weight"),
            r"'roberta\.embeddings\.position_embeddings\.weight' is missing",
        ),
        (
            "bert",
            _set("encoder.layer.0.intermediate.dense.weight", torch.zeros(99, 64)),
            r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \[99, 64\], "
            r"expected \[100, 64\]",
        ),
        (
            "bert",
            _set("encoder.layer.2.output.dense.bias", torch.zeros(64)),
            r"unexpected tensor 'encoder\.layer\.2\.output\.dense\.bias'",
        ),
        (
            "roberta_mlm",
            _set("classifier.dense.weight", torch.zeros(2, 64)),
            r"unexpected tensor 'classifier\.dense\.weight'",
        ),
    ],
)
def test_bad_tensors_raise_naming_them(saved, tmp_path, model, edit, pattern):
    directory = copy_of(saved[model][1], tmp_path)
    rewrite_tensors(directory, edit)
    with pytest.raises(HFFormatError, match=pattern):
        load_text_encoder(directory)
