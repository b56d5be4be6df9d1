"""load_decoder: transformers causal LMs as decoder-only MetaLMs, against transformers.

Every family is built tiny with random weights (width 64, 2 layers, 4 heads, odd
vocab and MLP widths), perturbed so norms and biases are not at their init, saved
with save_pretrained and loaded. Our logits on a packed batch (fp32, actual) are
held to docs/ARCHITECTURE.md's rule against transformers on the same sequences as a
right-padded batch in float64 (golden) and fp32 (baseline): ``max|actual - golden|
<= 2 * max|baseline - golden| + atol`` over the real tokens (tests/tolerance.py).
Greedy generation must give transformers' ``generate()`` tokens.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from metalm_fast.hf import HFFormatError
from metalm_fast.hf.decoders import load_decoder
from tests.tolerance import assert_within_tolerance

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 301, 64
SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4)
LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=50000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,  # short: the scaling changes the tested band
)
#: name -> (config class, fields): every feature each family's loader maps.
CASES = {
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2, intermediate_size=96)),
    "llama_bias_tied_head_dim": (
        "LlamaConfig",
        dict(
            intermediate_size=100,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            head_dim=24,  # != 64 / 4
            rms_norm_eps=1e-5,
        ),
    ),
    "llama3_rope": ("LlamaConfig", dict(intermediate_size=96, rope_parameters=LLAMA3)),
    "mistral_window": (
        "MistralConfig",
        dict(num_key_value_heads=1, intermediate_size=96, sliding_window=5),
    ),
    "qwen2_bias_gqa": ("Qwen2Config", dict(num_key_value_heads=2, intermediate_size=100)),
    "qwen2_window": (
        "Qwen2Config",
        dict(
            num_key_value_heads=4,
            intermediate_size=96,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=0,
        ),
    ),
    "neox_parallel": ("GPTNeoXConfig", dict(intermediate_size=100)),  # rotary_pct 0.25
    "neox_sequential_tied": (
        "GPTNeoXConfig",
        dict(
            intermediate_size=96,
            use_parallel_residual=False,
            attention_bias=False,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_theta=1000.0, partial_rotary_factor=0.5),
            hidden_act="gelu_new",
        ),
    ),
    "gpt2_tied": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=100, n_positions=40),
    ),
    "gpt2_untied_gelu": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=40,
            activation_function="gelu",
            tie_word_embeddings=False,
        ),
    ),
}
WINDOWED = ("mistral_window", "qwen2_window")
#: Sequences of the comparisons: longer than every window above, within GPT-2's 40 positions.
LENGTHS = (13, 7, 19, 1)


def hf_model(case: str, seed: int = 0):
    """A tiny random-weight transformers model of ``CASES[case]`` (eval, fp32, sdpa)."""
    class_name, fields = CASES[case]
    fields = fields if class_name == "GPT2Config" else {**SIZES, **fields}
    config = getattr(transformers, class_name)(**fields, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms off 1, biases off 0: every tensor's mapping matters
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.15)
    return model.eval()


def saved(case: str, directory, **save) -> tuple[object, str]:
    model = hf_model(case)
    model.save_pretrained(str(directory), **save)
    return model, str(directory)


def packed(sequences: list[list[int]]) -> SimpleNamespace:
    """A packed decoder batch with the attributes MetaLM.logits and generate read."""
    ids = torch.tensor([token for sequence in sequences for token in sequence])
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    none = torch.zeros(0, dtype=torch.int64)
    return SimpleNamespace(
        input_ids=ids,
        cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        span_starts=none,
        span_ends=none,
        encoder_ids=none,
        encoder_cu_seqlens=torch.zeros(1, dtype=torch.int64),
        feature_index=torch.full_like(ids, -1),
        images=None,
        image_index=None,
    )


def sequences(lengths=LENGTHS, seed: int = 5) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def hf_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """transformers' logits of ``seqs`` as one right-padded batch, real tokens packed [T, V]."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(seqs):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[mask.bool()]


def assert_logits_match(ours, model, seqs, name: str) -> float:
    """Hold our packed logits to the rule against transformers (float64 golden, fp32
    baseline); returns our max error against the golden."""
    with torch.no_grad():
        actual = ours.logits(packed(seqs))
    golden = hf_logits(copy.deepcopy(model).double(), seqs)
    baseline = hf_logits(model, seqs)
    assert_within_tolerance(actual, golden, baseline, name)
    return float((actual.double() - golden).abs().max())


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    model, path = saved(case, tmp_path)
    ours = load_decoder(path)
    assert not ours.has_text_encoder and not ours.has_vision_encoder
    assert ours.hf_source["architecture"] == model.config.architectures[0]
    error = assert_logits_match(ours, model, sequences(), case)
    assert error < 2e-5  # measured: at most 7.4e-6 (logits up to 5.2), as fp32 transformers


def test_sharded_checkpoint_loads(tmp_path):
    model, path = saved("qwen2_bias_gqa", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_logits_match(load_decoder(path), model, sequences(), "sharded")


def test_features_reach_the_architecture(tmp_path):
    """The config fields land where the block reads them (the logits test proves the math)."""
    arch = lambda case: load_decoder(saved(case, tmp_path / case)[1]).config.decoder_architecture
    assert arch("neox_parallel").parallel_residual and arch("neox_parallel").rotary_fraction == 0.25
    assert not arch("neox_sequential_tied").parallel_residual
    assert arch("mistral_window").sliding_window == 5
    assert arch("qwen2_window").sliding_window == 6
    assert arch("qwen2_bias_gqa").qkv_bias and not arch("qwen2_bias_gqa").out_bias
    assert arch("llama3_rope").rope_scaling["rope_type"] == "llama3"
    assert arch("gpt2_tied").positions == "learned" and arch("gpt2_tied").mlp_kind == "gelu_tanh"
    assert arch("llama_bias_tied_head_dim").head_dim == 24


def test_dtype_casts_the_weights(tmp_path):
    _, path = saved("llama_gqa", tmp_path)
    ours = load_decoder(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.lm_head.weight is not ours.embedding.weight  # untied stays untied
    tied = load_decoder(saved("gpt2_tied", tmp_path / "tied")[1])
    assert tied.lm_head.weight is tied.embedding.weight


@pytest.mark.parametrize(
    "case, legacy",
    [
        (
            "llama3_rope",
            {
                "rope_theta": LLAMA3["rope_theta"],
                "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"},
            },
        ),
        ("neox_sequential_tied", {"rotary_pct": 0.5, "rotary_emb_base": 1000.0}),
    ],
)
def test_pre_transformers_5_rope_fields(case, legacy, tmp_path):
    """Checkpoints written before rope_parameters: top-level rope_theta / rope_scaling
    (Llama 3.1) and rotary_pct / rotary_emb_base (Pythia)."""
    model, path = saved(case, tmp_path)
    edit_config(path, rope_parameters=None, **legacy)
    assert_logits_match(load_decoder(path), model, sequences(), case)


# ----------------------------------------------------------------------------- generation
def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the models have no eos (as our eos_id=None): 10 tokens each
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(case, tmp_path):
    model, path = saved(case, tmp_path)
    ours = load_decoder(path)
    prompts = sequences((3, 8, 13), seed=9)
    # Past the window the paged decode path would attend the whole prefix: it refuses,
    # and the recomputing path runs the window's mask.
    use_cache = case not in WINDOWED
    got = ours.generate(packed(prompts), max_new_tokens=10, use_cache=use_cache)
    assert got == [hf_greedy(model, prompt, 10) for prompt in prompts]


@pytest.mark.parametrize("case", WINDOWED)
def test_cached_generation_inside_the_window(case, tmp_path):
    model, path = saved(case, tmp_path)
    ours = load_decoder(path)
    window = ours.config.decoder_architecture.sliding_window
    prompts = sequences((2, window - 3), seed=4)  # the longer reaches exactly the window
    got = ours.generate(packed(prompts), max_new_tokens=4)
    assert got == [hf_greedy(model, prompt, 4) for prompt in prompts]
    with pytest.raises(ValueError, match="sliding_window"):
        ours.generate(packed(prompts), max_new_tokens=5)
    long_prompt = sequences((window + 4,), seed=4)  # one new token: the prefill alone
    assert ours.generate(packed(long_prompt), max_new_tokens=1) == [
        hf_greedy(model, long_prompt[0], 1)
    ]


# ----------------------------------------------------------------------------- errors
def edit_config(path: str, **changes) -> None:
    file = f"{path}/config.json"
    with open(file) as handle:
        config = json.load(handle)
    config.update(changes)
    with open(file, "w") as handle:
        json.dump(config, handle)


def edit_tensors(path: str, edit) -> None:
    file = f"{path}/model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, {"format": "pt"})


@pytest.mark.parametrize(
    "case, changes, named",
    [
        ("llama_gqa", {"architectures": ["LlamaForSequenceClassification"]}, "architecture"),
        ("llama_gqa", {"architectures": None}, "architectures"),
        ("llama_gqa", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ("llama_gqa", {"rope_parameters": None, "rope_scaling": {"type": "linear"}}, "rope_type"),
        ("llama_gqa", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
        ("llama_gqa", {"hidden_act": "relu2"}, "hidden_act"),
        ("llama_gqa", {"hidden_act": "gelu"}, "hidden_act"),  # a GeGLU: not SwiGLU
        ("llama_gqa", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ("llama_gqa", {"hidden_size": None}, "hidden_size"),
        ("llama_gqa", {"num_key_value_heads": 3}, "num_kv_heads"),
        (
            "qwen2_window",
            {"layer_types": ["full_attention", "sliding_attention"]},
            "layer_types",
        ),
        ("gpt2_tied", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2_tied", {"activation_function": "gelu_fast2"}, "activation_function"),
        ("neox_parallel", {"rope_parameters": {"partial_rotary_factor": 0.1875}}, "partial_rotary"),
    ],
)
def test_unsupported_config_is_named(case, changes, named, tmp_path):
    _, path = saved(case, tmp_path)
    edit_config(path, **changes)
    with pytest.raises(HFFormatError, match=named):
        load_decoder(path)


def test_missing_tensor_is_named(tmp_path):
    _, path = saved("llama_gqa", tmp_path)
    edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(HFFormatError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj"):
        load_decoder(path)


def test_unexpected_tensor_is_named(tmp_path):
    _, path = saved("neox_parallel", tmp_path)
    edit_tensors(path, lambda t: t.update({"gpt_neox.layers.0.extra.weight": torch.ones(3)}))
    with pytest.raises(HFFormatError, match=r"unexpected .*gpt_neox\.layers\.0\.extra\.weight"):
        load_decoder(path)


def test_a_bias_the_config_denies_is_unexpected(tmp_path):
    _, path = saved("llama_bias_tied_head_dim", tmp_path)
    edit_config(path, attention_bias=False)
    with pytest.raises(HFFormatError, match=r"unexpected .*self_attn\.\w_proj\.bias"):
        load_decoder(path)


def test_shape_mismatch_is_named(tmp_path):
    _, path = saved("gpt2_tied", tmp_path)
    edit_config(path, n_inner=128)
    with pytest.raises(HFFormatError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight has shape"):
        load_decoder(path)


def test_a_tied_head_must_equal_the_embedding(tmp_path):
    _, path = saved("gpt2_tied", tmp_path)
    edit_tensors(path, lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, HIDDEN)}))
    with pytest.raises(HFFormatError, match="lm_head.weight differs"):
        load_decoder(path)


def test_ignored_buffers_and_a_base_model_prefix(tmp_path):
    """The Hub's gpt2 layout: no ``transformer.`` prefix, causal-mask buffers stored."""
    model, path = saved("gpt2_tied", tmp_path)

    def hub_layout(tensors):
        renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
        tensors.clear()
        tensors.update(renamed)
        tensors["h.0.attn.bias"] = torch.ones(1, 1, 40, 40)

    edit_tensors(path, hub_layout)
    assert_logits_match(load_decoder(path), model, sequences(), "hub layout")
