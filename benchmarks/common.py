"""Shared pieces of the CPU span-attention benchmarks: cases, peers, timing, tile counts.

The three cases of the acceptance criteria (packed tokens, fp32):

- ``encoder``: spans of random length 64..128 covering T, bidirectional in each span;
- ``decoder``: documents of ``doc_len`` tokens, causal;
- ``semi_causal``: the same documents, ~25% of tokens in non-overlapping spans of
  64..128 tokens inside documents, bidirectional within a span, causal elsewhere.

Peers receive their inputs in their preferred layout ([B, H, T, D], built once,
not timed): SDPA with a dense boolean mask, SDPA per sequence (the practical CPU
limit, same useful FLOPs), FlexAttention compiled and the dense reference.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.charts import Panel, draw_chart
from metalm_fast import SpanMask

# Mirrors the planner of csrc/cpu/span_attention_plan.h (kQueryRows, kKeyTile), for tile counts.
CPU_QUERY_ROWS = 128
CPU_KEY_TILE = 256
FLEX_BLOCK = 128


@dataclass
class Case:
    """One benchmark case: its mask, the sequences the practical-limit peer batches over."""

    name: str
    mask: SpanMask
    build_mask: Callable[[], SpanMask]  # rebuilds the mask from its raw inputs (timed)
    sequences: list[tuple[int, int]]  # [start, end) batched by the practical-limit peer
    practical: str  # how the practical-limit peer runs: "causal", "none" or "dense"


def random_lengths(total: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """Lengths in [low, high] summing to ``total`` (the last one is cut to fit, then
    topped up to ``low`` from its neighbour when that keeps both in range)."""
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < low and len(lengths) > 1:
        if lengths[-2] + lengths[-1] <= high:
            last = lengths.pop()
            lengths[-1] += last
        elif lengths[-2] - (low - lengths[-1]) >= low:
            lengths[-2] -= low - lengths[-1]
            lengths[-1] = low
    return lengths


def semi_causal_spans(
    doc_starts: list[int], doc_len: int, generator: torch.Generator, fraction: float = 0.25
) -> tuple[list[int], list[int]]:
    """Non-overlapping spans of 64..128 tokens inside each document, ~``fraction`` of its tokens."""
    low, high = min(64, doc_len), min(128, doc_len)
    starts, ends = [], []
    for doc_start in doc_starts:
        taken: list[tuple[int, int]] = []
        covered, attempts = 0, 0
        while covered < fraction * doc_len and attempts < 1000:
            attempts += 1
            length = int(torch.randint(low, high + 1, (1,), generator=generator))
            begin = int(torch.randint(0, doc_len - length + 1, (1,), generator=generator))
            end = begin + length
            if all(end <= a or begin >= b for a, b in taken):
                taken.append((begin, end))
                covered += length
        for begin, end in sorted(taken):
            starts.append(doc_start + begin)
            ends.append(doc_start + end)
    return starts, ends


def make_cases(total: int, doc_len: int, seed: int = 0) -> list[Case]:
    generator = torch.Generator().manual_seed(seed)
    span_lengths = random_lengths(total, 64, 128, generator)
    cu_spans = torch.tensor([0] + span_lengths).cumsum(0)
    cu_docs = torch.arange(0, total + 1, doc_len)
    doc_bounds = list(zip(cu_docs[:-1].tolist(), cu_docs[1:].tolist()))
    span_starts, span_ends = semi_causal_spans(cu_docs[:-1].tolist(), doc_len, generator)
    return [
        Case(
            "encoder",
            SpanMask.bidirectional(cu_spans),
            lambda: SpanMask.bidirectional(cu_spans),
            list(zip(cu_spans[:-1].tolist(), cu_spans[1:].tolist())),
            "none",
        ),
        Case(
            "decoder",
            SpanMask.causal(cu_docs),
            lambda: SpanMask.causal(cu_docs),
            doc_bounds,
            "causal",
        ),
        Case(
            "semi_causal",
            SpanMask.semi_causal(cu_docs, span_starts, span_ends),
            lambda: SpanMask.semi_causal(cu_docs, span_starts, span_ends),
            doc_bounds,
            "dense",
        ),
    ]


def make_qkv(total: int, heads: int, head_dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(total, heads, head_dim, generator=generator) for _ in range(3))


def forward_flops(mask: SpanMask, heads: int, head_dim: int) -> float:
    """docs/ARCHITECTURE.md: 4 * allowed pairs * D * Hq forward (backward is 2.5x that)."""
    return 4.0 * mask.num_pairs() * head_dim * heads


# ------------------------------------------------------------------------------ tiles
def _tiles_meeting(mask: SpanMask, rows: int, cols: int) -> int:
    """Tiles of a rows x cols grid over (Tq, Tk) that hold at least one allowed pair."""
    start, end = mask.kv_start.long(), mask.kv_end.long()
    keep = end > start
    row_tile = torch.arange(mask.num_queries)[keep] // rows
    first, last = start[keep] // cols, (end[keep] - 1) // cols
    num_row_tiles = math.ceil(mask.num_queries / rows)
    num_col_tiles = math.ceil(mask.num_keys / cols)
    marks = torch.zeros(num_row_tiles, num_col_tiles + 1, dtype=torch.int64)
    marks.index_put_((row_tile, first), torch.ones_like(first), accumulate=True)
    marks.index_put_((row_tile, last + 1), -torch.ones_like(last), accumulate=True)
    return int((marks.cumsum(1)[:, :-1] > 0).sum())


def cpu_query_blocks(mask: SpanMask, max_rows: int = CPU_QUERY_ROWS) -> list[tuple[int, int, int]]:
    """(rows, key_begin, key_end) per query block: the C++ planner's rule, in Python."""
    blocks = []
    start, end = mask.kv_start.tolist(), mask.kv_end.tolist()
    t = 0
    while t < len(start):
        begin, lo, hi = t, 0, 0
        any_keys = False
        while t < len(start) and t - begin < max_rows:
            s, e = start[t], end[t]
            if s < e:
                if any_keys and (s >= hi or e <= lo):
                    break
                lo, hi = (min(lo, s), max(hi, e)) if any_keys else (s, e)
                any_keys = True
            t += 1
        blocks.append((t - begin, lo, hi))
    return blocks


@dataclass
class TileStats:
    computed: int  # tiles the implementation computes
    meeting: int  # tiles of its grid that meet the mask
    dense: int  # tiles of its grid over the whole (Tq, Tk)
    computed_pairs: int  # (query, key) pairs it computes, per head


def cpu_tile_stats(mask: SpanMask) -> TileStats:
    blocks = cpu_query_blocks(mask)
    computed = sum(math.ceil((hi - lo) / CPU_KEY_TILE) for _, lo, hi in blocks)
    pairs = sum(rows * (hi - lo) for rows, lo, hi in blocks)
    dense = math.ceil(mask.num_queries / CPU_QUERY_ROWS) * math.ceil(mask.num_keys / CPU_KEY_TILE)
    return TileStats(computed, _tiles_meeting(mask, CPU_QUERY_ROWS, CPU_KEY_TILE), dense, pairs)


def flex_tile_stats(block_mask, mask: SpanMask) -> TileStats:
    computed = int(block_mask.kv_num_blocks.sum())
    if block_mask.full_kv_num_blocks is not None:
        computed += int(block_mask.full_kv_num_blocks.sum())
    rows, cols = block_mask.BLOCK_SIZE
    dense = math.ceil(mask.num_queries / rows) * math.ceil(mask.num_keys / cols)
    return TileStats(computed, _tiles_meeting(mask, rows, cols), dense, computed * rows * cols)


def sdpa_causal_pairs(length: int) -> int:
    """Pairs ATen's CPU flash attention computes for one causal sequence (its q/kv splits)."""
    q_split = 256 if length >= 768 else (64 if length >= 192 else 32)
    return sum(
        min(q_split, length - m) * min(m + q_split, length) for m in range(0, length, q_split)
    )


# ------------------------------------------------------------------------------ peers
def to_bhtd(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> contiguous [1, H, T, D]."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


class PracticalLimit:
    """SDPA per sequence with no mask arithmetic beyond what the mask needs.

    ``causal``: sequences of equal length batched [B, H, L, D] with is_causal=True.
    ``none``: sequences grouped by length into batches, no mask (bidirectional spans).
    ``dense``: sequences batched with the dense mask of each sequence [B, 1, L, L]
    (semi-causal: the practical limit a user of SDPA can reach).
    Gathering q/k/v into batches is done once, outside the timing.
    """

    def __init__(self, case: Case, q, k, v, requires_grad: bool = False):
        self.kind = case.practical
        groups: dict[int, list[int]] = defaultdict(list)
        for begin, end in case.sequences:
            groups[end - begin].append(begin)
        self.batches = []
        dense = case.mask.to_dense()
        for length, starts in sorted(groups.items()):
            index = torch.tensor(starts)[:, None] + torch.arange(length)[None]  # [B, L]
            tensors = [
                x[index].permute(0, 2, 1, 3).contiguous().requires_grad_(requires_grad)
                for x in (q, k, v)
            ]
            attn_mask = None
            if self.kind == "dense":
                attn_mask = dense[index[:, :, None], index[:, None, :]][:, None]  # [B, 1, L, L]
            self.batches.append((tensors, attn_mask))

    def pairs(self) -> int:
        total = 0
        for (q, _, _), _mask in self.batches:
            batch, _, length, _ = q.shape
            per = sdpa_causal_pairs(length) if self.kind == "causal" else length * length
            total += batch * per
        return total

    def forward(self):
        return [
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=self.kind == "causal"
            )
            for (q, k, v), attn_mask in self.batches
        ]

    def leaves(self):
        return [x for tensors, _ in self.batches for x in tensors]


def flex_mask_mod(mask: SpanMask):
    kv_start, kv_end = mask.kv_start, mask.kv_end

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx >= kv_start[q_idx]) & (kv_idx < kv_end[q_idx])

    return mask_mod


# ------------------------------------------------------------------------------ timing
def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per function, calling them round-robin so load drifts hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_once_each(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    return time_interleaved({"fn": fn}, warmup, repeats)["fn"]


def fwd_bwd(forward: Callable[[], object], leaves: list[torch.Tensor], seed: int = 0):
    """A callable running forward, then backward of sum(out * g) into ``leaves``."""
    grads: dict[int, torch.Tensor] = {}

    def step():
        outs = forward()
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, out in enumerate(outs):
            if i not in grads:
                generator = torch.Generator().manual_seed(seed + i)
                grads[i] = torch.randn(out.shape, generator=generator)
        torch.autograd.backward(outs, [grads[i] for i in range(len(outs))])
        for leaf in leaves:
            leaf.grad = None

    return step


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> str:
    """Markdown bullet lines naming the machine, for every recorded CPU benchmark."""
    return (
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores visible)\n"
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
        f"- Python {platform.python_version()}, {platform.platform()}"
    )


RESULTS = Path(__file__).resolve().parent / "results"


def write_result(
    stem: str,
    title: str,
    body: str,
    command: str,
    path: Path | None = None,
    *,
    chart: Sequence[Panel],
) -> Path:
    """Record a run: ``# title``, ``body``, then the command that reproduces it, in
    benchmarks/results/<stem>.md (or ``path``), and beside it <stem>.png, the chart
    of ``chart``'s panels (benchmarks/charts.py); prints where they went."""
    if not chart:
        raise ValueError("write_result needs the chart's panels (benchmarks/charts.py Panel)")
    path = RESULTS / f"{stem}.md" if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{body}\n\nCommand: `{command}`\n")
    picture = draw_chart(path.with_suffix(".png"), title, chart)
    try:
        shown = path.resolve().relative_to(RESULTS.parent.parent)
    except ValueError:  # a path outside the checkout
        shown = path
    print(f"wrote {shown} and {picture.name}")
    return path


# ------------------------------------------------------------------------------ command line
def add_run_arguments(parser, *, stem: str, quick_help: str, paths: str = "every path") -> None:
    """The options every end-to-end CPU benchmark takes: --quick, --repeats, --threads,
    --no-write and --out (default benchmarks/results/<stem>_<date>.md)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"intra-op threads for {paths} (default 1; 0: torch's default)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="only print the table (no markdown, no chart)"
    )
    parser.add_argument(
        "--out",
        help=f"markdown file (default benchmarks/results/{stem}_<date>.md; --quick writes "
        "only here)",
    )


def run_settings(args, quick, default):
    """``quick`` or ``default`` (Settings dataclasses with ``repeats`` and ``threads``) with
    --repeats / --threads applied; the thread count is set for the whole run, so the
    machine description states it."""
    settings = quick if args.quick else default
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    if args.threads is not None:
        settings = dataclasses.replace(settings, threads=args.threads)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return settings
