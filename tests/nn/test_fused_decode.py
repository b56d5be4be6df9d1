"""The fused decode step of a TransformerBlock: bit for bit the module path, where it runs."""

from __future__ import annotations

import pytest
import torch

from metalm_fast.nn import BlockArchitecture, PagedKVCache, TransformerBlock, fused_decode
from metalm_fast.ops import decode_block

PROMPT_LENS = [5, 2, 7]  # three sequences, pages of 4 tokens: partial, fresh and crossing
DIM, HEAD_DIM = 64, 16


def _kernel_or_skip():
    kernel = decode_block.cpu_op()
    if kernel is None:
        pytest.skip("metalm_fast._C is not built (the fused op is part of it)")
    return kernel


def _counting(kernel, calls: list):
    def call(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    return call


def _block(heads: int, kv_heads: int, kind: str, rotary: bool, **arch) -> TransformerBlock:
    torch.manual_seed(0)
    architecture = BlockArchitecture(
        positions="rotary" if rotary else "none", mlp_kind=kind, **arch
    )
    block = TransformerBlock(DIM, heads, kv_heads, 2 * DIM, architecture).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped weight or bias shows
        for norm in (block.attention_norm, block.mlp_norm):
            norm.weight.uniform_(0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-0.1, 0.1)
    return block


def _decode_run(block, kv_heads: int, steps: int, *, grad: bool = False):
    """Prefill the prompts (module path), then ``steps`` decode steps; every step's
    output and the cache's keys and values afterwards."""
    torch.manual_seed(1)
    cache = PagedKVCache(1, 16, 4, kv_heads, HEAD_DIM, dtype=torch.float32)
    ids = [cache.allocate() for _ in PROMPT_LENS]
    step = cache.step(ids, PROMPT_LENS)
    prompt = torch.randn(sum(PROMPT_LENS), DIM)
    outputs = []
    with torch.set_grad_enabled(grad):
        block(prompt, None, None, cache=cache, layer_idx=0, step=step)
        for _ in range(steps):
            step = cache.step(ids, 1)
            outputs.append(
                block(torch.randn(len(ids), DIM), None, None, cache=cache, layer_idx=0, step=step)
            )
    return outputs, cache.key_cache(0).clone(), cache.value_cache(0).clone()


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("rotary", [True, False])
def test_fused_step_equals_module_path(monkeypatch, kind, heads, kv_heads, rotary):
    kernel = _kernel_or_skip()
    block = _block(heads, kv_heads, kind, rotary)
    calls: list = []
    monkeypatch.setattr(decode_block, "cpu_op", lambda: _counting(kernel, calls))
    fused = _decode_run(block, kv_heads, steps=3)
    assert len(calls) == 3  # it ran, once a step
    monkeypatch.setattr(decode_block, "cpu_op", lambda: None)
    modules = _decode_run(block, kv_heads, steps=3)
    for got, expected in zip(fused[0], modules[0], strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(fused[1], modules[1]) and torch.equal(fused[2], modules[2])


#: The architectures of the loaded families: Llama (RMSNorm, SwiGLU, no MLP bias),
#: GPT-NeoX / Pythia (parallel residual, a quarter of each head rotated, biases), GPT-2
#: (gelu_tanh, no rotary), CLIP-style quick_gelu, relu and silu MLPs.
ARCHITECTURES = {
    "llama": ("swiglu", True, dict(norm="rmsnorm", mlp_bias=False)),
    "neox": ("gelu", True, dict(parallel_residual=True, rotary_fraction=0.25, qkv_bias=True)),
    "gpt2": ("gelu_tanh", False, dict(qkv_bias=True, out_bias=True)),
    "quick_gelu": ("quick_gelu", True, dict(norm_bias=False)),
    "relu": ("relu", True, dict(rotary_fraction=0.5)),
    "silu": ("silu", False, dict(norm="rmsnorm", parallel_residual=True)),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fused_step_equals_module_path_for_every_pre_norm_architecture(monkeypatch, name):
    kernel = _kernel_or_skip()
    kind, rotary, arch = ARCHITECTURES[name]
    block = _block(4, 2, kind, rotary, **arch)
    calls: list = []
    monkeypatch.setattr(decode_block, "cpu_op", lambda: _counting(kernel, calls))
    fused = _decode_run(block, 2, steps=3)
    assert len(calls) == 3
    monkeypatch.setattr(decode_block, "cpu_op", lambda: None)
    modules = _decode_run(block, 2, steps=3)
    for got, expected in zip(fused[0], modules[0], strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(fused[1], modules[1]) and torch.equal(fused[2], modules[2])


def test_hooks_and_autograd_run_the_modules(monkeypatch):
    kernel = _kernel_or_skip()
    block = _block(4, 2, "gelu", True)
    calls: list = []
    monkeypatch.setattr(decode_block, "cpu_op", lambda: _counting(kernel, calls))
    seen = []
    handle = block.mlp.up.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    hooked = _decode_run(block, 2, steps=2)
    handle.remove()
    assert calls == [] and len(seen) == 3  # the prefill and both steps ran the hooked module
    with_grad = _decode_run(block, 2, steps=2, grad=True)
    assert calls == []
    fused = _decode_run(block, 2, steps=2)
    assert len(calls) == 2
    for got, a, b in zip(fused[0], hooked[0], with_grad[0], strict=True):
        assert torch.equal(got, a)
        # With autograd the projections are F.linear (decode_linear's rule): rounding only.
        torch.testing.assert_close(got, b.detach(), rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_modules(monkeypatch):
    kernel = _kernel_or_skip()
    calls: list = []
    monkeypatch.setattr(decode_block, "cpu_op", lambda: _counting(kernel, calls))
    block = _block(4, 2, "gelu", True)
    cache = PagedKVCache(1, 4, 4, 2, HEAD_DIM, dtype=torch.float32)
    step = cache.step([cache.allocate()], 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_decode.fused_decode_block(block, torch.randn(1, DIM), cache, 0, step) is None
    assert calls == []


def test_other_dtypes_and_many_rows_run_the_modules(monkeypatch):
    kernel = _kernel_or_skip()
    calls: list = []
    monkeypatch.setattr(decode_block, "cpu_op", lambda: _counting(kernel, calls))
    block = _block(4, 2, "gelu", True).double()
    cache = PagedKVCache(1, 4, 4, 2, HEAD_DIM, dtype=torch.float64)
    ids = [cache.allocate()]
    step = cache.step(ids, 1)
    with torch.no_grad():
        assert (
            fused_decode.fused_decode_block(
                block, torch.randn(1, DIM, dtype=torch.float64), cache, 0, step
            )
            is None
        )
    block = _block(4, 2, "gelu", True)
    cache = PagedKVCache(1, 40, 1, 2, HEAD_DIM, dtype=torch.float32)
    ids = [cache.allocate() for _ in range(33)]  # one more than decode_linear's kernel rows
    with torch.no_grad():
        assert (
            fused_decode.fused_decode_block(
                block, torch.randn(33, DIM), cache, 0, cache.step(ids, 1)
            )
            is None
        )
    assert calls == []


def test_op_errors_name_the_argument():
    kernel = _kernel_or_skip()
    block = _block(4, 2, "gelu", True)
    cache = PagedKVCache(1, 4, 4, 2, HEAD_DIM, dtype=torch.float32)
    step = cache.step([cache.allocate()], 1)
    a, m = block.attention, block.mlp
    args = [
        torch.randn(1, DIM),
        block.attention_norm.weight,
        block.attention_norm.bias,
        1e-5,
        a.qkv.weight,
        None,
        a.out.weight,
        None,
        block.mlp_norm.weight,
        block.mlp_norm.bias,
        1e-5,
        m.up.weight,
        m.up.bias,
        m.down.weight,
        m.down.bias,
        "relu",
        4,
        2,
        cache.key_cache(0),
        cache.value_cache(0),
        step.slot_mapping,
        step.block_table,
        step.seq_lens,
        0.35,
        None,
        None,
        "layernorm",
        False,
        HEAD_DIM,
    ]
    with torch.no_grad(), pytest.raises(RuntimeError, match="unknown mlp_kind 'geglu'"):
        kernel(*args[:15], "geglu", *args[16:])
    with torch.no_grad(), pytest.raises(RuntimeError, match="norm_kind must be"):
        kernel(*args[:-3], "batchnorm", False, HEAD_DIM)
    with torch.no_grad(), pytest.raises(RuntimeError, match="rotary_dim must be even"):
        kernel(*args[:-1], 3)
    args[-5] = torch.ones(1, 1, HEAD_DIM)
    with torch.no_grad(), pytest.raises(RuntimeError, match="both rotary tables"):
        kernel(*args)
    args[-5] = None
    args[4] = a.qkv.weight[:-1]
    with torch.no_grad(), pytest.raises(RuntimeError, match="qkv_weight must have"):
        kernel(*args)


def test_wide_block_table_is_checked_before_narrowing():
    """An int64 block-table entry of 2**32 + page is outside the pool (skipped), in the
    fused step as in the op: narrowed first, it would read ``page``."""
    import dataclasses

    _kernel_or_skip()
    block = _block(4, 2, "gelu", rotary=False)
    cache = PagedKVCache(1, 16, 4, 2, HEAD_DIM, dtype=torch.float32)
    ids = [cache.allocate() for _ in PROMPT_LENS]
    with torch.no_grad():
        block(
            torch.randn(sum(PROMPT_LENS), DIM),
            None,
            None,
            cache=cache,
            layer_idx=0,
            step=cache.step(ids, PROMPT_LENS),
        )
        step = cache.step(ids, 1)
        x = torch.randn(len(ids), DIM)
        wide, skipped = step.block_table.to(torch.int64), step.block_table.clone()
        wide[2, 0] += 2**32  # sequence 2's first page, a used one
        skipped[2, 0] = -1

        def run(table):
            changed = dataclasses.replace(step, block_table=table)
            out = fused_decode.fused_decode_block(block, x, cache, 0, changed)
            assert out is not None, "the fused step must serve this block"
            return out

        out = run(wide)
        assert torch.equal(out, run(skipped))
        assert not torch.allclose(out[2], run(step.block_table)[2])
