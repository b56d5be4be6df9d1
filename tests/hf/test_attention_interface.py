"""attn_implementation="metalm_span" in unmodified transformers models, against sdpa.

Every model test builds one tiny random-weight model and runs it three ways on the
same weights and inputs: metalm_span in fp32 (actual), sdpa in float64 (golden) and
sdpa in fp32 (baseline). Outputs, the gradient of the input embeddings and every
parameter's gradient must meet docs/ARCHITECTURE.md's rule (tests/tolerance.py):
``max|actual - golden| <= 2 * max|baseline - golden| + atol``, i.e. metalm_span is as
close to exact attention as sdpa itself is in fp32. The loss is a fixed random
weighting of the outputs at real (non-padding) positions only: a padding row is
whatever each implementation makes of it (a left-padding query allowed no key gets
exact zeros from metalm_span, something else from sdpa), and no real row reads it.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from metalm_fast import SpanMask, span_attention
from tests.tolerance import assert_within_tolerance

transformers = pytest.importorskip("transformers")

import metalm_fast.hf  # noqa: E402
from metalm_fast.hf.attention import padding_mask, span_attention_forward  # noqa: E402

NAME = metalm_fast.hf.register()
VOCAB, HIDDEN = 97, 64


# ----------------------------------------------------------------------------- models
def _llama(**overrides):
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA: two query heads per key/value head
        "max_position_embeddings": 64,
    }
    config = transformers.LlamaConfig(**{**settings, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _qwen2_sliding():
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,  # layer 0 full attention, layer 1 a window of 6 keys
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    return model


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _trio(model):
    """(actual, golden, baseline): metalm_span fp32, sdpa float64, sdpa fp32, one set of weights."""
    baseline = model.float().eval()
    golden = copy.deepcopy(baseline).double()
    actual = copy.deepcopy(baseline)
    actual.set_attn_implementation(NAME)
    assert actual.config._attn_implementation == NAME
    assert baseline.config._attn_implementation == "sdpa"
    return actual, golden, baseline


def _run(model, embeds, weights, rows, **inputs):
    """Outputs at ``rows`` (bool [B, S]) and the gradients of a weighted sum of them."""
    dtype = next(model.parameters()).dtype
    embeds = embeds.detach().to(dtype).clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(inputs_embeds=embeds, **inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    (out[rows] * weights.to(dtype)[rows]).sum().backward()
    results = {"output": out[rows].detach(), "inputs_embeds.grad": embeds.grad[rows]}
    for name, param in model.named_parameters():
        if param.grad is not None:
            results[f"{name}.grad"] = param.grad
    return results


def _assert_matches_sdpa(model, embeds, rows, actual_inputs, reference_inputs=None):
    """Run the trio (see the module docstring) and hold every result to the rule."""
    reference_inputs = actual_inputs if reference_inputs is None else reference_inputs
    actual_model, golden_model, baseline_model = _trio(model)
    width = actual_model.config.vocab_size if hasattr(model, "lm_head") else HIDDEN
    weights = torch.randn(*embeds.shape[:2], width, generator=torch.Generator().manual_seed(1))
    actual = _run(actual_model, embeds, weights, rows, **actual_inputs)
    golden = _run(golden_model, embeds, weights, rows, **reference_inputs)
    baseline = _run(baseline_model, embeds, weights, rows, **reference_inputs)
    assert actual.keys() == golden.keys()
    assert len(actual) > 10  # output, embeddings and the parameters of both layers
    for name in actual:
        assert_within_tolerance(actual[name], golden[name], baseline[name], name)


def _embeds(batch, seq, seed=0):
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _padding(lengths, seq, side):
    positions = torch.arange(seq)[None]
    lengths = torch.tensor(lengths)[:, None]
    mask = positions < lengths if side == "right" else positions >= seq - lengths
    return mask.long()


def _flattened(lengths, seed=0):
    """What DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes of documents."""
    generator = torch.Generator().manual_seed(seed)
    features = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=generator)} for n in lengths]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator(features, return_tensors="pt")
    assert batch["position_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens_q"].tolist() == torch.tensor([0, *lengths]).cumsum(0).tolist()
    return batch


# ----------------------------------------------------------------------------- packaging
def test_importing_the_package_does_not_import_transformers():
    code = (
        "import sys, metalm_fast, metalm_fast.hf, metalm_fast.hf.attention\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_installs_both_interfaces():
    from transformers.masking_utils import AttentionMaskInterface

    assert metalm_fast.hf.register() == NAME == "metalm_span"  # again: harmless
    assert transformers.AttentionInterface()[NAME] is span_attention_forward
    assert AttentionMaskInterface()[NAME] is padding_mask
    model = transformers.AutoModelForCausalLM.from_config(_llama().config, attn_implementation=NAME)
    assert model.config._attn_implementation == NAME


@pytest.mark.parametrize(
    "name, error", [(3, TypeError), ("", ValueError), ("org/repo", ValueError)]
)
def test_register_rejects_a_bad_name(name, error):
    with pytest.raises(error, match="name"):
        metalm_fast.hf.register(name)


# ----------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_sdpa(side):
    torch.manual_seed(0)
    mask = _padding([20, 13, 7], 20, side)
    _assert_matches_sdpa(_llama(), _embeds(3, 20), mask.bool(), {"attention_mask": mask})


def test_packed_cu_seq_lens_match_sdpa():
    """The collator's varlen kwargs (what flash attention reads) against sdpa's packed mask."""
    torch.manual_seed(0)
    batch = _flattened([9, 14, 6])
    varlen = {
        k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    }
    positions = {"position_ids": batch["position_ids"], "use_cache": False}
    rows = torch.ones(1, 29, dtype=torch.bool)
    _assert_matches_sdpa(_llama(), _embeds(1, 29), rows, {**varlen, **positions}, positions)


def test_packed_position_ids_match_sdpa():
    """Positions that restart mark documents, with no other kwarg (and batch 2)."""
    torch.manual_seed(0)
    position_ids = torch.tensor([list(range(7)) + list(range(13)), list(range(20))])
    inputs = {"position_ids": position_ids, "use_cache": False}
    _assert_matches_sdpa(_llama(), _embeds(2, 20), torch.ones(2, 20, dtype=torch.bool), inputs)


def test_cu_seq_lens_are_read_before_position_ids():
    """The varlen kwargs decide the documents (the same op call as SpanMask.causal)."""
    q, k, v = torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    module = torch.nn.Module()
    out, weights = span_attention_forward(
        module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, position_ids=torch.arange(12)
    )
    expected = span_attention(
        *(t[0].transpose(0, 1) for t in (q, k, v)), SpanMask.causal(cu.long())
    )
    assert weights is None
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)


def test_training_steps_on_flattened_batches():
    """model.train() (dropout 0), the collator's batch as Trainer would pass it, AdamW."""
    torch.manual_seed(0)
    actual, _, baseline = _trio(_llama())
    batch = dict(_flattened([11, 7, 14]), use_cache=False)
    reference = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "use_cache")}
    expected = baseline.train()(**reference).loss
    optimizer = torch.optim.AdamW(actual.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = actual.train()(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[0]), expected.detach(), rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("layout", ["left padding", "packed"])
def test_sliding_window_matches_sdpa(layout):
    torch.manual_seed(0)
    if layout == "packed":
        position_ids = torch.tensor([list(range(15)) + list(range(9))])
        rows = torch.ones(1, 24, dtype=torch.bool)
        inputs = {"position_ids": position_ids, "use_cache": False}
        _assert_matches_sdpa(_qwen2_sliding(), _embeds(1, 24), rows, inputs)
    else:
        mask = _padding([24, 17], 24, "left")
        inputs = {"attention_mask": mask}
        _assert_matches_sdpa(_qwen2_sliding(), _embeds(2, 24), mask.bool(), inputs)


def test_greedy_generation_with_left_padding_matches_sdpa():
    """Prefill and cached decode steps (one query over the cache, padding mask)."""
    torch.manual_seed(0)
    actual, golden, _ = _trio(_llama(pad_token_id=0))
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = _padding([9, 5], 9, "left")
    ids = ids * mask
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = golden.generate(ids, **kwargs)
    assert torch.equal(actual.double().generate(ids, **kwargs), expected)


def test_the_mask_is_built_once_per_forward_not_per_layer(monkeypatch):
    """Every layer gets the same padding mask / positions; the SpanMask (and its host
    syncs) is made once for them all."""
    built = []
    for name in ("from_intervals", "causal"):
        original = getattr(SpanMask, name).__func__

        def counted(cls, *args, _original=original, **kwargs):
            built.append(1)
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(SpanMask, name, classmethod(counted))
    model = _llama(num_hidden_layers=3)
    model.set_attn_implementation(NAME)
    ids = torch.randint(0, VOCAB, (2, 10))
    model(ids, attention_mask=_padding([10, 6], 10, "left"))
    assert len(built) == 1
    model(ids[:1], position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]), use_cache=False)
    assert len(built) == 2


# ----------------------------------------------------------------------------- encoders
def test_bidirectional_bert_with_padding_matches_sdpa():
    torch.manual_seed(0)
    mask = _padding([18, 11, 4], 18, "right")
    model = _bert()
    assert not model.encoder.layer[0].attention.self.is_causal
    _assert_matches_sdpa(model, _embeds(3, 18), mask.bool(), {"attention_mask": mask})


# ----------------------------------------------------------------------------- SpanMask
def _block_diagonal(mask: SpanMask, batch: int, seq: int) -> torch.Tensor:
    """The dense [B, 1, S, S] bool mask of a SpanMask over B rows of S (it must not cross rows)."""
    dense = mask.to_dense()
    blocks = [dense[b * seq : (b + 1) * seq, b * seq : (b + 1) * seq] for b in range(batch)]
    assert int(sum(block.sum() for block in blocks)) == int(dense.sum())
    return torch.stack(blocks)[:, None]


@pytest.mark.parametrize("kind", ["prefix_lm", "semi_causal"])
def test_span_mask_matches_a_dense_mask(kind):
    """A user's SpanMask (prefix-LM over two rows; spans in a packed row) against sdpa
    given the same mask dense."""
    torch.manual_seed(0)
    if kind == "prefix_lm":
        batch, seq = 2, 16
        span = SpanMask.prefix_lm(torch.tensor([0, 16, 32]), prefix_lens=[5, 9])
    else:
        batch, seq = 1, 28
        span = SpanMask.semi_causal(torch.tensor([0, 12, 28]), [2, 15], [6, 22])
    dense = _block_diagonal(span, batch, seq)
    assert not torch.equal(dense, torch.ones(seq, seq).tril().bool().expand_as(dense))
    rows = torch.ones(batch, seq, dtype=torch.bool)
    _assert_matches_sdpa(
        _llama(),
        _embeds(batch, seq),
        rows,
        {"span_mask": span, "use_cache": False},
        {"attention_mask": dense, "use_cache": False},
    )


# ----------------------------------------------------------------------------- the op's contract
def test_a_query_with_no_key_gets_zeros_and_finite_gradients():
    """Left padding: a padding query before every real key attends nothing."""
    q = torch.randn(2, 4, 6, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 6, 16, requires_grad=True) for _ in range(2))
    mask = _padding([6, 2], 6, "left").bool()
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = span_attention_forward(module, q, k, v, mask)
    assert out.shape == (2, 6, 4, 16)
    assert torch.equal(out[1, :4], torch.zeros(4, 4, 16))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[1, :, :4], torch.zeros(4, 4, 16))


def test_dropout_in_training_is_an_error_and_ignored_in_eval():
    model = _llama(attention_dropout=0.1)
    model.set_attn_implementation(NAME)
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="dropout=0.1"):
        model.train()(ids)
    assert torch.isfinite(model.eval()(ids).logits).all()


def test_bad_masks_are_clear_errors():
    model = _llama()
    model.set_attn_implementation(NAME)
    ids = torch.randint(0, VOCAB, (2, 8))
    dense = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(TypeError, match="2-D padding mask"):
        model(ids, attention_mask=dense)
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1], [1] * 8])
    with pytest.raises(ValueError, match="row 0 has padding between real tokens"):
        model(ids, attention_mask=holes)
    with pytest.raises(ValueError, match="flattened batch"):
        model(ids, span_mask=SpanMask.causal(torch.tensor([0, 8])), use_cache=False)
    with pytest.raises(TypeError, match="span_mask must be a SpanMask"):
        model(ids, span_mask=dense, use_cache=False)


def test_unsupported_features_are_clear_errors():
    module = torch.nn.Module()
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="softcap"):
        span_attention_forward(module, q, k, k, None, softcap=30.0)
    overlaid = padding_mask(1, 8, 8, attention_mask=None, use_vmap=True)
    with pytest.raises(ValueError, match="or_mask_function"):
        span_attention_forward(module, q, k, k, overlaid)
    module.is_causal = False
    with pytest.raises(ValueError, match="causal layers only"):
        span_attention_forward(module, q, k, k, None, sliding_window=4)
    module.config = SimpleNamespace(attention_chunk_size=4)  # Llama 4's chunked layers
    with pytest.raises(ValueError, match="chunked attention"):
        span_attention_forward(module, q, k, k, None)
