"""paged_decode_attention against the float64 reference over gathered pages (tolerance rule)."""

from __future__ import annotations

import pytest
import torch

from metalm_fast import paged_decode_attention, reference
from tests.paged_cases import paged_layout, random_caches, require_backend
from tests.tolerance import assert_within_tolerance

BACKENDS = ["reference", "cpu", "triton"]
CPU_OP = "_paged_decode_attention_cpu"


def _problem(
    lengths, block_size, heads, kv_heads, head_dim, dtype, seed=0, strided_q=False, contiguous=False
):
    num_blocks, table = paged_layout(lengths, block_size, seed=seed, contiguous=contiguous)
    k_cache, v_cache = random_caches(num_blocks, block_size, kv_heads, head_dim, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 3)
    if strided_q:  # q sliced from a fused [B, Hq + 2 Hkv, D] projection
        fused = torch.randn(len(lengths), heads + 2 * kv_heads, head_dim, generator=generator)
        q = fused.to(dtype)[:, :heads]
    else:
        q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32)


def _check(backend, q, k_cache, v_cache, table, seq_lens, **kwargs):
    out = paged_decode_attention(
        q, k_cache, v_cache, table, seq_lens, validate=True, backend=backend, **kwargs
    )
    golden = reference.paged_decode_attention(
        q.double(), k_cache.double(), v_cache.double(), table, seq_lens, **kwargs
    )
    baseline = reference.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, **kwargs)
    assert out.dtype == q.dtype and out.is_contiguous()
    assert_within_tolerance(out, golden, baseline, "out")
    assert torch.all(out[seq_lens == 0] == 0), "an empty sequence must give exact zeros"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lengths_around_the_page(backend, block_size, dtype):
    """kv_len 1, page - 1, page, page + 1, 97 and an empty sequence, in one batch, GQA."""
    require_backend(backend, CPU_OP)
    lengths = [1, max(block_size - 1, 1), block_size, block_size + 1, 97, 0]
    _check(backend, *_problem(lengths, block_size, 8, 2, 64, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [8, 128])
def test_long_sequence_splits(backend, block_size):
    """kv_len 1000 beside short ones: the cpu and triton backends split it and merge."""
    require_backend(backend, CPU_OP)
    _check(backend, *_problem([1000, 3, 130], block_size, 4, 1, 32, torch.float32, seed=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim",
    # The cpu kernel's cases: query heads per score vector 1 (5), 2 (6), 4 (12), 8 (24:
    # three blocks), 16 (16, 32); head dims in registers (16, 32, 64, 128) or looped (80,
    # 40 -> 48); one kv head per query head (adjacent heads) or shared (GQA).
    [
        (4, 4, 16),
        (6, 2, 80),
        (12, 4, 40),
        (2, 1, 128),
        (32, 1, 32),
        (5, 5, 32),
        (24, 24, 32),
        (16, 4, 64),
    ],
)
def test_gqa_and_head_dims(backend, heads, kv_heads, head_dim):
    require_backend(backend, CPU_OP)
    _check(backend, *_problem([37, 16, 5], 16, heads, kv_heads, head_dim, torch.float32, seed=2))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("block_size", [1, 8, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_one_query_head_per_kv_head(backend, block_size, dtype):
    """Hq = Hkv = 8, D = 32 (the small preset's decoder): the cpu backend reads the pages in
    place and scores 16 keys per vector; lengths around its 16-key blocks and 32-key tiles."""
    require_backend(backend, CPU_OP)
    lengths = [1, 15, 16, 17, 31, 32, 33, 97, 700, 0]
    problem = _problem(lengths, block_size, 8, 8, 32, dtype, seed=6)
    if dtype != torch.float64:
        _check(backend, *problem)
        return
    # float64 is its own golden (the rule's bound would be atol alone): compare closely.
    out = paged_decode_attention(*problem, backend=backend)
    torch.testing.assert_close(out, reference.paged_decode_attention(*problem))
    assert torch.all(out[problem[-1] == 0] == 0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim",
    # The cpu kernel's register-resident step (Hq a power of two, Hq * D <= 256), adjacent
    # heads and GQA, 1 to 16 keys per score vector; (16, 16, 32) does not fit: tile step.
    [
        (8, 8, 32),
        (8, 2, 32),
        (16, 16, 16),
        (16, 4, 16),
        (4, 1, 64),
        (2, 2, 128),
        (1, 1, 256),
        (16, 16, 32),
    ],
)
def test_pages_in_order(backend, block_size, dtype, heads, kv_heads, head_dim):
    """Pages handed out in order, as a fresh cache does: the cpu kernel's tiles are
    contiguous runs of rows, which it streams with its register-resident step."""
    require_backend(backend, CPU_OP)
    lengths = [1, 2, 15, 16, 17, 33, 97, 700, 0]
    _check(
        backend,
        *_problem(lengths, block_size, heads, kv_heads, head_dim, dtype, seed=8, contiguous=True),
    )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_pages_in_order_then_scattered(backend):
    """A prompt's pages in order, then decode pages taken one at a time among other
    sequences: tiles of both kinds in one sequence, and a long one split across threads."""
    require_backend(backend, CPU_OP)
    lengths = [1000, 300, 45]
    q, k_cache, v_cache, table, seq_lens = _problem(
        lengths, 16, 8, 8, 32, torch.float32, seed=9, contiguous=True
    )
    tail = table[0, table.shape[1] // 2 :].clone()  # the second half of sequence 0's pages
    table[0, table.shape[1] // 2 :] = tail[
        torch.randperm(len(tail), generator=torch.Generator().manual_seed(9))
    ]
    _check(backend, q, k_cache, v_cache, table, seq_lens)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)])
def test_non_contiguous_caches(backend, heads, kv_heads):
    """Caches sliced from a wider pool (every stride differs from a packed layout)."""
    require_backend(backend, CPU_OP)
    q, k_cache, v_cache, table, seq_lens = _problem(
        [45, 130, 3], 8, heads, kv_heads, 32, torch.float32, seed=7
    )
    wide = torch.randn(2, k_cache.shape[0], 8, kv_heads, 64)
    wide[0, :, :, :, 16:48], wide[1, :, :, :, 16:48] = k_cache, v_cache
    k_view, v_view = wide[0, ..., 16:48], wide[1, ..., 16:48]
    assert not k_view.is_contiguous()
    _check(backend, q, k_view, v_view, table, seq_lens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_q_and_scale(backend, dtype):
    require_backend(backend, CPU_OP)
    q, *rest = _problem([50, 20], 8, 4, 2, 64, dtype, seed=4, strided_q=True)
    assert not q.is_contiguous()
    _check(backend, q, *rest, scale=0.3)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_and_bfloat16(backend):
    require_backend(backend, CPU_OP)
    q, k_cache, v_cache, table, seq_lens = _problem([40, 0, 7], 16, 4, 2, 32, torch.float64)
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)
    torch.testing.assert_close(
        out, reference.paged_decode_attention(q, k_cache, v_cache, table, seq_lens)
    )
    _check(backend, *_problem([40, 0, 7], 16, 4, 2, 32, torch.bfloat16))


def test_cpu_threads_agree():
    """The cpu backend splits the long sequence by thread count (1, 4, 8 splits here) and
    merges the parts; the result must not depend on it beyond rounding."""
    require_backend("cpu", CPU_OP)
    problem = _problem([4000, 20], 16, 8, 2, 64, torch.float32, seed=5)
    _check("cpu", *problem)
    threads = torch.get_num_threads()
    try:
        outs = []
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            outs.append(paged_decode_attention(*problem, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_garbage_indices_never_read_out_of_bounds(backend):
    """Without validate, out-of-pool pages are skipped and lengths clamped: finite output."""
    require_backend(backend, CPU_OP)
    q, k_cache, v_cache, table, _ = _problem([20, 20], 8, 4, 2, 16, torch.float32)
    table[0, 1] = 10_000
    table[1, 0] = -5
    seq_lens = torch.tensor([20, 1_000_000], dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- errors
def _args(dtype=torch.float32):
    return _problem([10, 3], 8, 4, 2, 16, dtype)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "q": a["q"].half()}, TypeError, "q dtype"),
        (lambda a: {**a, "q": a["q"][:, :3]}, ValueError, r"multiple of key/value heads"),
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must be 3-D"),
        (lambda a: {**a, "v_cache": a["v_cache"][:, :4]}, ValueError, "k_cache and v_cache"),
        (lambda a: {**a, "block_table": a["block_table"].float()}, TypeError, "block_table"),
        (lambda a: {**a, "block_table": a["block_table"][:1]}, ValueError, "block_table"),
        (lambda a: {**a, "seq_lens": a["seq_lens"][None]}, ValueError, "seq_lens must be 1-D"),
        (lambda a: {**a, "scale": float("nan")}, ValueError, "scale"),
    ],
)
def test_errors_name_the_argument(change, error, match):
    names = ("q", "k_cache", "v_cache", "block_table", "seq_lens")
    args = change({**dict(zip(names, _args())), "scale": None})
    with pytest.raises(error, match=match):
        paged_decode_attention(*(args[name] for name in names), scale=args["scale"])


def test_validate_catches_bad_pages_and_lengths():
    q, k_cache, v_cache, table, seq_lens = _args()
    bad = table.clone()
    bad[1, 0] = k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = .* outside the pool"):
        paged_decode_attention(q, k_cache, v_cache, bad, seq_lens, validate=True)
    too_long = torch.tensor([10, table.shape[1] * 8 + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = .* beyond the sequence's pages"):
        paged_decode_attention(q, k_cache, v_cache, table, too_long, validate=True)
    # A page past a sequence's length is never used, so it may hold anything.
    unused = table.clone()
    unused[1, 1] = -1
    paged_decode_attention(q, k_cache, v_cache, unused, seq_lens, validate=True)


def test_triton_rejects_float64():
    require_backend("triton", CPU_OP)
    with pytest.raises(TypeError, match="triton backend supports"):
        paged_decode_attention(*_args(torch.float64), backend="triton")


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_torch_compile_traces_the_ops(backend):
    """Both custom ops have fake implementations: fullgraph compile runs and matches eager."""
    from metalm_fast import kv_cache_append

    require_backend("cpu", CPU_OP)
    require_backend("cpu", "_kv_cache_append_cpu")
    q, k_cache, v_cache, table, seq_lens = _args()
    k_new, v_new = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    slots = torch.tensor([3, 9])

    def step(q, k_cache, v_cache, k_new, v_new):
        kv_cache_append(k_cache, v_cache, k_new, v_new, slots, backend=backend)
        return paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)

    eager_caches = (k_cache.clone(), v_cache.clone())
    expected = step(q, *eager_caches, k_new, v_new)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k_cache, v_cache, k_new, v_new), expected)
    assert torch.equal(k_cache, eager_caches[0]) and torch.equal(v_cache, eager_caches[1])
