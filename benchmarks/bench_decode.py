"""CPU benchmark of paged decode: the kernel against SDPA, and cached generation.

Run ``python benchmarks/bench_decode.py`` (``--quick`` for small sizes). It prints
one table, writes a markdown copy with the machine's description to
benchmarks/results/cpu_decode_<date>.md and ends with one PASS/FAIL line per
acceptance criterion. Only ratios within one run mean anything: the decode
implementations are timed round-robin in one loop, so load from other
processes hits them alike.

Decode (B=16 sequences of 2048 cached tokens, Hq=16, Hkv=4, D=64, fp32, pages
of 16 tokens scattered over a pool three times larger):

- ``ours``: ``paged_decode_attention(..., backend="cpu")`` over the pages;
- ``gather+sdpa``: gather each sequence's pages into contiguous [B, Hkv, L, D]
  keys and values, then SDPA (``enable_gqa=True``); the gather is timed;
- ``sdpa contiguous``: SDPA over keys and values that are already contiguous
  [B, Hkv, L, D] (no paging at all: the practical limit).

GB/s counts the K and V bytes a decode step must read (2 * B * L * Hkv * D * 4).

Generation (greedy, a small decoder: 4 layers, width 256, 8 query / 2 kv heads,
SiLU MLP, vocab 1024): a 512-token prompt, then 128 new tokens,

- ``cached``: prefill once into a PagedKVCache, then one decode step per token;
- ``recompute``: run the whole prefix through the model again for every token
  (span_attention with a causal mask, the cpu backend).

Both generate the same tokens (checked). Tokens/s counts the 128 new tokens,
prompt processing included in both.

Criteria: decode at least as fast as gather+sdpa and within 1.5x of the
contiguous limit; cached generation at least 5x the recompute loop's tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Panel, machine_lines, time_interleaved, write_result  # noqa: E402
from metalm_fast import PagedKVCache, SpanMask, paged_decode_attention  # noqa: E402
from metalm_fast.nn import SpanSelfAttention, packed_positions  # noqa: E402


@dataclass(frozen=True)
class DecodeSizes:
    batch: int = 16
    kv_len: int = 2048
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    block_size: int = 16


@dataclass(frozen=True)
class GenerationSizes:
    prompt: int = 512
    new_tokens: int = 128
    layers: int = 4
    dim: int = 256
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 1024


# ----------------------------------------------------------------------------- decode
def paged_inputs(sizes: DecodeSizes, seed: int = 0):
    """q, caches over 3x the pages needed, a random block table, and the same K/V contiguous."""
    generator = torch.Generator().manual_seed(seed)
    pages_per_seq = math.ceil(sizes.kv_len / sizes.block_size)
    num_blocks = 3 * sizes.batch * pages_per_seq
    shape = (num_blocks, sizes.block_size, sizes.kv_heads, sizes.head_dim)
    k_cache = torch.randn(shape, generator=generator)
    v_cache = torch.randn(shape, generator=generator)
    order = torch.randperm(num_blocks, generator=generator)[: sizes.batch * pages_per_seq]
    block_table = order.view(sizes.batch, pages_per_seq).to(torch.int32)
    seq_lens = torch.full((sizes.batch,), sizes.kv_len, dtype=torch.int32)
    q = torch.randn(sizes.batch, sizes.heads, sizes.head_dim, generator=generator)
    return q, k_cache, v_cache, block_table, seq_lens


def gather_contiguous(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Pages -> contiguous [B, Hkv, L, D] (what a paged cache costs SDPA)."""
    pages = cache[block_table.long()]  # [B, pages, block, Hkv, D]
    batch = block_table.shape[0]
    rows = pages.reshape(batch, -1, *cache.shape[2:])[:, :kv_len]
    return rows.transpose(1, 2).contiguous()


def bench_decode(sizes: DecodeSizes, warmup: int, repeats: int) -> dict:
    q, k_cache, v_cache, block_table, seq_lens = paged_inputs(sizes)
    k_contiguous = gather_contiguous(k_cache, block_table, sizes.kv_len)
    v_contiguous = gather_contiguous(v_cache, block_table, sizes.kv_len)
    q4 = q[:, :, None]  # [B, Hq, 1, D]

    def ours():
        return paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, backend="cpu")

    def gather_sdpa():
        keys = gather_contiguous(k_cache, block_table, sizes.kv_len)
        values = gather_contiguous(v_cache, block_table, sizes.kv_len)
        return F.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)

    def sdpa_contiguous():
        return F.scaled_dot_product_attention(q4, k_contiguous, v_contiguous, enable_gqa=True)

    expected = sdpa_contiguous()[:, :, 0]
    max_diff = float((ours() - expected).abs().max())
    seconds = time_interleaved(
        {"ours": ours, "gather+sdpa": gather_sdpa, "sdpa contiguous": sdpa_contiguous},
        warmup,
        repeats,
    )
    kv_bytes = 2 * sizes.batch * sizes.kv_len * sizes.kv_heads * sizes.head_dim * 4
    return {"seconds": seconds, "kv_bytes": kv_bytes, "max_diff": max_diff}


# ----------------------------------------------------------------------------- generation
class _Block(nn.Module):
    def __init__(self, sizes: GenerationSizes):
        super().__init__()
        self.attention_norm = nn.LayerNorm(sizes.dim)
        self.attention = SpanSelfAttention(sizes.dim, sizes.heads, sizes.kv_heads, backend="cpu")
        self.mlp_norm = nn.LayerNorm(sizes.dim)
        # SiLU, not exact GELU: torch 2.13's CPU erf-GELU opens a parallel region
        # even for one row, which stalls whenever another process holds a core.
        self.mlp = nn.Sequential(
            nn.Linear(sizes.dim, 4 * sizes.dim), nn.SiLU(), nn.Linear(4 * sizes.dim, sizes.dim)
        )


class SmallDecoder(nn.Module):
    """Pre-norm decoder of SpanSelfAttention (rotary, GQA) + MLP blocks: the benchmark model."""

    def __init__(self, sizes: GenerationSizes):
        super().__init__()
        self.embed = nn.Embedding(sizes.vocab, sizes.dim)
        self.blocks = nn.ModuleList(_Block(sizes) for _ in range(sizes.layers))
        self.norm = nn.LayerNorm(sizes.dim)
        self.head = nn.Linear(sizes.dim, sizes.vocab)

    def forward(self, ids, mask=None, positions=None, cache=None, step=None):
        x = self.embed(ids)
        for index, block in enumerate(self.blocks):
            x = x + block.attention(
                block.attention_norm(x), mask, positions, cache=cache, layer_idx=index, step=step
            )
            x = x + block.mlp(block.mlp_norm(x))
        return self.head(self.norm(x))


def generate_recompute(model: SmallDecoder, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens):
        cu = torch.tensor([0, len(tokens)])
        logits = model(torch.tensor(tokens), SpanMask.causal(cu), packed_positions(cu))
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt) :]


def generate_cached(
    model: SmallDecoder,
    prompt: list[int],
    new_tokens: int,
    sizes: GenerationSizes,
    block_size: int = 16,
) -> list[int]:
    head_dim = sizes.dim // sizes.heads
    pages = math.ceil((len(prompt) + new_tokens) / block_size)
    cache = PagedKVCache(sizes.layers, pages, block_size, sizes.kv_heads, head_dim)
    seq = cache.allocate()
    step = cache.step([seq], len(prompt))
    logits = model(torch.tensor(prompt), SpanMask.causal(step.cu_seqlens), cache=cache, step=step)
    generated = [int(logits[-1].argmax())]
    for _ in range(new_tokens - 1):
        step = cache.step([seq], 1)
        logits = model(torch.tensor(generated[-1:]), cache=cache, step=step)
        generated.append(int(logits[-1].argmax()))
    return generated


def bench_generation(sizes: GenerationSizes) -> dict:
    torch.manual_seed(0)
    model = SmallDecoder(sizes).eval()
    prompt = torch.randint(
        0, sizes.vocab, (sizes.prompt,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    results = {}
    with torch.no_grad():
        generate_cached(model, prompt[:32], 4, sizes)  # warm-up: first-call costs
        generate_recompute(model, prompt[:32], 2)
        for name, run in (
            ("cached", lambda: generate_cached(model, prompt, sizes.new_tokens, sizes)),
            ("recompute", lambda: generate_recompute(model, prompt, sizes.new_tokens)),
        ):
            begin = time.perf_counter()
            tokens = run()
            results[name] = {"seconds": time.perf_counter() - begin, "tokens": tokens}
    return results


# ----------------------------------------------------------------------------- report
def render(
    decode: dict, generation: dict, dsizes: DecodeSizes, gsizes: GenerationSizes
) -> tuple[str, list[tuple[bool, str]]]:
    seconds = decode["seconds"]
    ours = seconds["ours"]
    lines = [
        "| benchmark | implementation | ms | GB/s (K+V) | tokens/s | ours vs it |",
        "|---|---|---|---|---|---|",
    ]
    for name, value in seconds.items():
        ratio = "-" if name == "ours" else f"{value / ours:.2f}x"
        lines.append(
            f"| decode | {name} | {value * 1e3:.2f} | "
            f"{decode['kv_bytes'] / value / 1e9:.2f} | - | {ratio} |"
        )
    cached = generation["cached"]["seconds"]
    for name, result in generation.items():
        rate = gsizes.new_tokens / result["seconds"]
        ratio = "-" if name == "cached" else f"{result['seconds'] / cached:.2f}x"
        lines.append(
            f"| generation | {name} | {result['seconds'] * 1e3:.0f} | - | {rate:.1f} | {ratio} |"
        )
    same = generation["cached"]["tokens"] == generation["recompute"]["tokens"]
    checks = [
        (
            ours <= seconds["gather+sdpa"],
            f"decode at least as fast as gather+sdpa: {seconds['gather+sdpa'] / ours:.2f}x",
        ),
        (
            ours <= 1.5 * seconds["sdpa contiguous"],
            f"decode within 1.5x of sdpa over a contiguous cache: "
            f"{ours / seconds['sdpa contiguous']:.2f}x its time",
        ),
        (
            generation["recompute"]["seconds"] >= 5 * cached,
            f"cached generation >= 5x the recompute loop in tokens/s: "
            f"{generation['recompute']['seconds'] / cached:.1f}x",
        ),
        (same, f"cached and recompute generation produce the same {gsizes.new_tokens} tokens"),
    ]
    notes = (
        f"decode: B={dsizes.batch}, kv_len={dsizes.kv_len}, Hq={dsizes.heads}, "
        f"Hkv={dsizes.kv_heads}, D={dsizes.head_dim}, fp32, pages of {dsizes.block_size}; "
        f"max |ours - sdpa| = {decode['max_diff']:.2e}\n"
        f"generation: prompt {gsizes.prompt}, {gsizes.new_tokens} new tokens, greedy, "
        f"{gsizes.layers} layers, width {gsizes.dim}, {gsizes.heads}/{gsizes.kv_heads} heads, "
        f"vocab {gsizes.vocab}, fp32"
    )
    return "\n".join(lines) + "\n\n" + notes, checks


def chart(decode: dict, generation: dict, gsizes: GenerationSizes) -> list[Panel]:
    """Decode step time against the SDPA paths; generation tokens/s, cached vs recompute."""
    seconds = decode["seconds"]
    rates = {name: [gsizes.new_tokens / result["seconds"]] for name, result in generation.items()}
    return [
        Panel(
            "paged decode step",
            "time (ms)",
            ["decode step"],
            {name: [value * 1e3] for name, value in seconds.items()},
            ours="ours",
        ),
        Panel(
            "greedy generation",
            "new tokens/s",
            [f"{gsizes.new_tokens} new tokens"],
            rates,
            ours="cached",
            lower_is_better=False,
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--no-write", action="store_true", help="do not write results/ (table and chart)"
    )
    args = parser.parse_args(argv)
    dsizes, gsizes = DecodeSizes(), GenerationSizes()
    if args.quick:
        dsizes = DecodeSizes(batch=4, kv_len=512)
        gsizes = GenerationSizes(prompt=128, new_tokens=16)
        args.repeats = min(args.repeats, 5)
    today = datetime.date.today().isoformat()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    decode = bench_decode(dsizes, args.warmup, args.repeats)
    generation = bench_generation(gsizes)
    table, checks = render(decode, generation, dsizes, gsizes)
    check_lines = "\n".join(f"{'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks)
    title = f"CPU paged decode benchmark ({today})"
    print(title, table, check_lines, sep="\n\n")
    if not args.no_write:
        machine = (
            f"{machine_lines()}\n- load average {load:.1f} at start\n"
            f"- decode: median of {args.repeats} round-robin repeats after {args.warmup} "
            "warm-up rounds; generation: one timed run each after a short warm-up\n"
            "- the machine is shared: compare ratios within this table only"
        )
        write_result(
            f"cpu_decode_{today}{'_quick' if args.quick else ''}",
            title,
            f"{machine}\n\n{table}\n\n## Acceptance criteria\n\n```\n{check_lines}\n```",
            f"python benchmarks/bench_decode.py{' --quick' if args.quick else ''}",
            chart=chart(decode, generation, gsizes),
        )
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
