"""TextEncoder and TextEncoderConfig: packing, positions, checks, gradients, round trip.

Numerics follow the tolerance rule (tests/tolerance.py): the golden is the encoder in
float64 on the reference backend, each sequence run alone; the baseline the same in
fp32; the packed fp32 forward on the default backend must meet the rule.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from metalm_fast.models.text_encoder import BERT_ARCHITECTURE, TextEncoder, TextEncoderConfig
from metalm_fast.nn.architecture import BlockArchitecture
from tests.tolerance import assert_within_tolerance

BERT = TextEncoderConfig(
    vocab_size=300, dim=64, num_layers=2, num_heads=4, mlp_hidden=100, max_positions=40
)
CONFIGS = {
    "bert": BERT,
    "roberta": dataclasses.replace(
        BERT, position_style="roberta", pad_token_id=1, max_positions=42
    ),
    "electra": dataclasses.replace(BERT, embedding_size=32),
    "native": TextEncoderConfig.native(300, 64, 2, 4, mlp_hidden=100),
}
LENGTHS = (7, 1, 12)


def encoder(config: TextEncoderConfig, seed: int = 0, **changes) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(dataclasses.replace(config, **changes))


def packed(lengths=LENGTHS, seed=0, vocab=300, pad=None):
    """(ids [N], cu_seqlens, sequences): random ids, with ``pad`` inside the first and
    last sequences when given (RoBERTa numbers positions around pad tokens)."""
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(2, vocab, (n,), generator=generator) for n in lengths]
    if pad is not None:
        sequences[0][2] = pad
        sequences[-1][-1] = pad
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return torch.cat(sequences), cu, sequences


def twin(model: TextEncoder, dtype: torch.dtype) -> TextEncoder:
    """The same weights on the reference backend, in ``dtype``."""
    other = TextEncoder(dataclasses.replace(model.config, backend="reference"))
    other.load_state_dict(model.state_dict())
    return other.to(dtype)


def alone(model: TextEncoder, sequences) -> torch.Tensor:
    """Each sequence encoded by itself, outputs concatenated."""
    return torch.cat([model(s, torch.tensor([0, s.numel()])) for s in sequences])


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", CONFIGS)
def test_packed_forward_matches_each_sequence_alone(name):
    model = encoder(CONFIGS[name])
    ids, cu, sequences = packed(pad=model.pad_token_id)
    with torch.no_grad():
        out = model(ids, cu)
        golden = alone(twin(model, torch.float64), sequences)
        baseline = alone(twin(model, torch.float32), sequences)
    assert out.shape == (ids.numel(), 64)
    assert_within_tolerance(out, golden, baseline, f"{name} packed forward")


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name):
    model = encoder(CONFIGS[name])
    ids, cu, _ = packed()
    model(ids, cu).pow(2).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


def test_empty_batch_gives_no_rows():
    model = encoder(BERT)
    out = model(torch.zeros(0, dtype=torch.int64), torch.tensor([0]))
    assert out.shape == (0, 64)


# ----------------------------------------------------------------------------- positions
def test_bert_positions_count_from_zero_in_each_sequence():
    model = encoder(BERT)
    ids, cu, _ = packed(lengths=(3, 0, 2))
    assert model.absolute_positions(ids, cu).tolist() == [0, 1, 2, 0, 1]


def test_roberta_positions_skip_pad_tokens():
    model = encoder(CONFIGS["roberta"])  # pad_token_id 1: positions start at 2
    ids = torch.tensor([5, 1, 7, 8, 9, 1])
    cu = torch.tensor([0, 3, 3, 6])
    assert model.absolute_positions(ids, cu).tolist() == [2, 1, 3, 2, 3, 1]


@pytest.mark.parametrize(("name", "limit"), [("bert", 40), ("roberta", 40)])
def test_positions_beyond_the_table_raise(name, limit):
    model = encoder(CONFIGS[name])
    ids, cu, _ = packed(lengths=(limit,))
    assert model(ids, cu).shape == (limit, 64)  # the longest sequence the table holds
    ids, cu, _ = packed(lengths=(3, limit + 1))
    with pytest.raises(ValueError, match=rf"max_positions.*at most {limit} tokens"):
        model(ids, cu)


# ----------------------------------------------------------------------------- input checks
def test_input_ids_out_of_range_raise():
    model = encoder(BERT)
    with pytest.raises(ValueError, match=r"input_ids\[2\] = 300"):
        model(torch.tensor([1, 2, 300]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"input_ids\[0\] = -1"):
        model(torch.tensor([-1, 2]), torch.tensor([0, 2]))


def test_input_ids_must_be_integers():
    model = encoder(BERT)
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))


@pytest.mark.parametrize("cu", [[0, 2], [0, 3, 2, 3], [1, 3]])
def test_bad_cu_seqlens_raise(cu):
    model = encoder(BERT)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.tensor([1, 2, 3]), torch.tensor(cu))


# ----------------------------------------------------------------------------- structure
def test_attributes_and_pieces():
    electra = encoder(CONFIGS["electra"])
    assert (electra.dim, electra.vocab_size, electra.pad_token_id) == (64, 300, 0)
    assert electra.word_embeddings.weight.shape == (300, 32)
    assert electra.embedding_project.weight.shape == (64, 32)
    assert electra.tokenizer_file is None
    native = encoder(CONFIGS["native"])
    for piece in ("position_embeddings", "token_type_embeddings", "embedding_norm"):
        assert not hasattr(native, piece)
    assert native.stack.architecture.rotary
    assert not hasattr(encoder(BERT), "embedding_project")


def test_fresh_weights_follow_bert_initialisation():
    model = encoder(BERT, vocab_size=4000)
    weight = model.word_embeddings.weight
    assert torch.equal(weight[0], torch.zeros(64))  # the pad row
    assert abs(float(weight[1:].detach().std()) - 0.02) < 0.002
    assert torch.equal(model.stack.blocks[0].attention.qkv.bias, torch.zeros(3 * 64))


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_through_json(name):
    config = CONFIGS[name]
    text = json.dumps(dataclasses.asdict(config))
    rebuilt = TextEncoderConfig(**json.loads(text))
    assert rebuilt == config
    assert isinstance(rebuilt.architecture, BlockArchitecture)


def test_default_architecture_is_bert():
    arch = BERT.architecture
    assert arch == BERT_ARCHITECTURE
    assert (arch.post_norm, arch.final_norm, arch.positions) == (True, False, "none")
    assert (arch.qkv_bias, arch.out_bias, arch.mlp_bias, arch.norm_eps) == (True, True, True, 1e-12)


@pytest.mark.parametrize(
    ("changes", "error", "pattern"),
    [
        ({"num_heads": 5}, ValueError, "divisible by num_heads"),
        ({"vocab_size": True}, TypeError, "vocab_size"),
        ({"mlp_hidden": 0}, ValueError, "mlp_hidden"),
        ({"pad_token_id": 300}, ValueError, "pad_token_id"),
        ({"position_style": "alibi"}, ValueError, "position_style"),
        ({"position_style": "roberta", "pad_token_id": None}, ValueError, "pad_token_id"),
        ({"position_style": "roberta", "max_positions": 1}, ValueError, "max_positions"),
        ({"embedding_norm_eps": 0.0}, ValueError, "embedding_norm_eps"),
        ({"initializer_range": -1.0}, ValueError, "initializer_range"),
        ({"architecture": "bert"}, TypeError, "architecture"),
        (
            {"architecture": BlockArchitecture(positions="learned", max_positions=8)},
            ValueError,
            "max_positions=None",
        ),
    ],
)
def test_config_refuses_bad_fields(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        dataclasses.replace(BERT, **changes)
