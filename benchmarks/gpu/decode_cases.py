"""GPU benchmark of paged decode attention and KV-cache append: GB/s against HBM.

Decode and append move memory and do little arithmetic, so their figure of
merit is bandwidth: bytes that must move / time, and its share of the GPU's
HBM peak (H200: 4.8 TB/s).

Entry point for benchmarks/gpu/run_gpu_benchmarks.py (shares its deadline)::

    from benchmarks.gpu import decode_cases
    rows = decode_cases.run(deadline, device="cuda", dtype=torch.bfloat16)
    text = decode_cases.to_markdown(rows)          # one table, ready for the .md
    payload = [dataclasses.asdict(row) for row in rows]

``deadline`` is anything with ``has_room() -> bool`` (run_gpu_benchmarks.Deadline);
no measurement starts once it says no, and the skipped ones are listed. Or
standalone: ``python benchmarks/gpu/decode_cases.py --out DIR [--budget-s S]
[--dry-run]`` writes ``gpu_decode_<gpu>_<date>.md/.json/.png``.

Cases (bf16, pages of 16 tokens drawn at random from a pool twice the size needed):

- ``decode_uniform``: B=64 sequences of 4096 tokens, Hq=32, Hkv=8, D=128;
- ``decode_long_short``: one sequence of 32768 tokens and 63 of 512 (the mix
  where flash-decoding's splits matter);
- ``decode_cpu_case``: B=16, 2048 tokens, Hq=16, Hkv=4, D=64 (the CPU benchmark's shape);
- ``append_decode_step``: one new token for each of 64 sequences, Hkv=8, D=128;
- ``append_prefill``: 16384 new tokens.

Decode implementations: ``ours`` (triton backend), ``flashinfer``
(BatchDecodeWithPagedKVCacheWrapper, if importable), ``flash_attn``
(flash_attn_with_kvcache with a block table; flash-attn 2 needs pages of a
multiple of 256 tokens, so it gets its own copy of the cache with 256-token
pages), ``sdpa`` (over contiguous [B, Hkv, L, D] keys and values, uniform
lengths only: no paging at all). Append: ``ours_triton``, ``ours_cuda`` (when
metalm_fast._cuda has the op) and ``index_put`` (the torch reference).

Bytes: decode reads K and V (2 * sum(seq_lens) * Hkv * D elements) plus q and
writes out; append reads and writes 2 * T * Hkv * D elements. The dry run
(``--dry-run`` or device="cpu") uses tiny sizes and the cpu backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Sibling modules of benchmarks/gpu, however this file is started (script, module, by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_chart import write_chart_or_note  # noqa: E402
from gpu_timing import median_ms  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
try:
    import metalm_fast  # noqa: F401 - installed: its kernels resolve
except ImportError:
    sys.path.insert(0, str(REPO_ROOT))

#: H200 SXM HBM3e bandwidth (NVIDIA datasheet), for the "% of HBM" column.
HBM_TBPS = 4.8
PAGE = 16
FLASH_ATTN_PAGE = 256


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass
class DecodeRow:
    case: str
    implementation: str
    ms: float | None = None
    gb_per_s: float | None = None
    hbm_percent: float | None = None
    max_abs_diff: float | None = None  # against ours (decode) or exact equality (append)
    note: str = ""


@dataclass(frozen=True)
class DecodeCase:
    name: str
    lengths: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class AppendCase:
    name: str
    tokens: int
    kv_heads: int
    head_dim: int


def cases(dry_run: bool) -> list:
    if dry_run:
        return [
            DecodeCase("decode_uniform", (256,) * 4, 8, 2, 64),
            DecodeCase("decode_long_short", (1024,) + (64,) * 3, 8, 2, 64),
            AppendCase("append_decode_step", 4, 2, 64),
        ]
    return [
        DecodeCase("decode_uniform", (4096,) * 64, 32, 8, 128),
        DecodeCase("decode_long_short", (32768,) + (512,) * 63, 32, 8, 128),
        DecodeCase("decode_cpu_case", (2048,) * 16, 16, 4, 64),
        AppendCase("append_decode_step", 64, 8, 128),
        AppendCase("append_prefill", 16384, 8, 128),
    ]


# ----------------------------------------------------------------------------- inputs
def paged_kv(lengths, kv_heads, head_dim, page, dtype, device, generator):
    """Caches over twice the pages needed and a block table of randomly drawn pages.

    The caches (up to ~1 GB) are drawn on the device; ``generator`` (CPU) draws the pages.
    """
    needed = [math.ceil(n / page) for n in lengths]
    num_blocks = 2 * sum(needed)
    shape = (num_blocks, page, kv_heads, head_dim)
    on_device = torch.Generator(device=device).manual_seed(int(generator.initial_seed()))
    k_cache = torch.randn(shape, generator=on_device, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=on_device, device=device, dtype=dtype)
    order = torch.randperm(num_blocks, generator=generator)
    table = torch.zeros(len(lengths), max(needed), dtype=torch.int32)
    used = 0
    for b, count in enumerate(needed):
        table[b, :count] = order[used : used + count]
        used += count
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    return k_cache, v_cache, table.to(device), seq_lens.to(device)


def repage(cache, table, lengths, page):
    """The same keys in a new cache with ``page``-token pages, pages in order."""
    rows = [cache[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lengths)]
    per_seq = [math.ceil(n / page) for n in lengths]
    out = cache.new_zeros((sum(per_seq), page, *cache.shape[2:]))
    new_table = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32, device=cache.device)
    first = 0
    for b, (row, count) in enumerate(zip(rows, per_seq, strict=True)):
        out.view(-1, *cache.shape[2:])[first * page : first * page + row.shape[0]] = row
        new_table[b, :count] = torch.arange(first, first + count, dtype=torch.int32)
        first += count
    return out, new_table


# ----------------------------------------------------------------------------- decode peers
def _ours(inputs, backend):
    from metalm_fast import paged_decode_attention

    q, k_cache, v_cache, table, seq_lens, _ = inputs
    return lambda: paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend=backend)


def _flashinfer(inputs, backend):
    try:
        import flashinfer
    except ImportError as error:
        raise Unavailable(f"flashinfer not importable ({error})") from None
    q, k_cache, v_cache, table, seq_lens, lengths = inputs
    pages = [math.ceil(n / PAGE) for n in lengths]
    indptr = torch.tensor([0] + pages, device=q.device).cumsum(0).to(torch.int32)
    indices = torch.cat([table[b, :p] for b, p in enumerate(pages)]).to(torch.int32)
    last = torch.tensor(
        [n - (p - 1) * PAGE for n, p in zip(lengths, pages, strict=True)],
        dtype=torch.int32,
        device=q.device,
    )
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    layout = (indptr, indices, last, q.shape[1], k_cache.shape[2], q.shape[2], PAGE)
    if hasattr(wrapper, "plan"):  # flashinfer >= 0.2
        wrapper.plan(*layout, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        return lambda: wrapper.run(q, (k_cache, v_cache))
    wrapper.begin_forward(*layout, data_type=k_cache.dtype)
    return lambda: wrapper.forward(q, (k_cache, v_cache))


def _flash_attn(inputs, backend):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as error:
        raise Unavailable(f"flash-attn not importable ({error})") from None
    q, k_cache, v_cache, table, seq_lens, lengths = inputs
    k_big, big_table = repage(k_cache, table, lengths, FLASH_ATTN_PAGE)
    v_big, _ = repage(v_cache, table, lengths, FLASH_ATTN_PAGE)
    q4 = q[:, None]
    return lambda: flash_attn_with_kvcache(
        q4, k_big, v_big, cache_seqlens=seq_lens, block_table=big_table
    )[:, 0]


def _sdpa(inputs, backend):
    q, k_cache, v_cache, table, seq_lens, lengths = inputs
    if len(set(lengths)) != 1:
        raise Unavailable("SDPA needs one length per batch (uniform cases only)")
    keys = k_cache[table.long()].flatten(1, 2)[:, : lengths[0]].transpose(1, 2).contiguous()
    values = v_cache[table.long()].flatten(1, 2)[:, : lengths[0]].transpose(1, 2).contiguous()
    q4 = q[:, :, None]
    return lambda: F.scaled_dot_product_attention(q4, keys, values, enable_gqa=True)[:, :, 0]


DECODE_IMPLEMENTATIONS = {
    "ours": _ours,
    "flashinfer": _flashinfer,
    "flash_attn": _flash_attn,
    "sdpa": _sdpa,
}


# ----------------------------------------------------------------------------- append peers
def _append_ours(backend):
    def factory(k_cache, v_cache, k_new, v_new, slots):
        from metalm_fast import kv_cache_append

        return lambda: kv_cache_append(k_cache, v_cache, k_new, v_new, slots, backend=backend)

    return factory


def _append_index_put(k_cache, v_cache, k_new, v_new, slots):
    from metalm_fast import reference

    return lambda: reference.kv_cache_append(k_cache, v_cache, k_new, v_new, slots)


# ----------------------------------------------------------------------------- running
def _measure(rows, case_name, name, factory, device, moved_bytes, check) -> None:
    try:
        fn = factory()
        ms = median_ms(fn, device)
    except Unavailable as reason:
        rows.append(DecodeRow(case_name, name, note=f"unavailable: {reason}"))
        return
    except Exception as error:  # noqa: BLE001 - one failing peer must not end the run
        note = f"error: {type(error).__name__}: {error}"[:300]
        rows.append(DecodeRow(case_name, name, note=note))
        return
    gb_per_s = moved_bytes / (ms * 1e-3) / 1e9
    rows.append(
        DecodeRow(case_name, name, ms, gb_per_s, 100 * gb_per_s / (HBM_TBPS * 1e3), check(fn))
    )


def run_decode_case(case: DecodeCase, device, dtype, rows, deadline, log) -> None:
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache, table, seq_lens = paged_kv(
        case.lengths, case.kv_heads, case.head_dim, PAGE, dtype, device, generator
    )
    q = torch.randn(len(case.lengths), case.heads, case.head_dim, generator=generator)
    inputs = (q.to(device, dtype), k_cache, v_cache, table, seq_lens, list(case.lengths))
    element = torch.tensor([], dtype=dtype).element_size()
    moved = (
        (2 * sum(case.lengths) * case.kv_heads + 2 * len(case.lengths) * case.heads)
        * case.head_dim
        * element
    )
    backend = "triton" if device == "cuda" else "cpu"
    expected = _ours(inputs, backend)().float()

    def check(fn):
        return float((fn().float() - expected).abs().max())

    for name, make in DECODE_IMPLEMENTATIONS.items():
        if deadline is not None and not deadline.has_room():
            rows.append(DecodeRow(case.name, name, note="skipped (deadline)"))
            continue
        _measure(
            rows, case.name, name, lambda make=make: make(inputs, backend), device, moved, check
        )
        log(f"  {case.name} {name}: {rows[-1].ms} ms {rows[-1].note}")


def run_append_case(case: AppendCase, device, dtype, rows, deadline, log) -> None:
    generator = torch.Generator().manual_seed(1)
    pages = 2 * math.ceil(case.tokens / PAGE) + 1
    shape = (pages, PAGE, case.kv_heads, case.head_dim)
    k_cache = torch.zeros(shape, dtype=dtype, device=device)
    v_cache = torch.zeros(shape, dtype=dtype, device=device)
    new_shape = (case.tokens, case.kv_heads, case.head_dim)
    k_new = torch.randn(new_shape, generator=generator).to(device, dtype)
    v_new = torch.randn(new_shape, generator=generator).to(device, dtype)
    slots = torch.randperm(pages * PAGE, generator=generator)[: case.tokens].to(device)
    element = torch.tensor([], dtype=dtype).element_size()
    moved = 2 * 2 * case.tokens * case.kv_heads * case.head_dim * element
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    _append_index_put(expected_k, expected_v, k_new, v_new, slots)()
    backends = ["triton", "cuda"] if device == "cuda" else ["cpu"]
    factories = {f"ours_{b}": _append_ours(b) for b in backends}
    factories["index_put"] = _append_index_put

    def check(fn):
        fn()
        exact = torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
        return 0.0 if exact else float("inf")

    for name, factory in factories.items():
        if deadline is not None and not deadline.has_room():
            rows.append(DecodeRow(case.name, name, note="skipped (deadline)"))
            continue
        _measure(
            rows,
            case.name,
            name,
            lambda factory=factory: factory(k_cache, v_cache, k_new, v_new, slots),
            device,
            moved,
            check,
        )
        log(f"  {case.name} {name}: {rows[-1].ms} ms {rows[-1].note}")


def run(
    deadline=None,
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    log: Callable[[str], None] = print,
) -> list[DecodeRow]:
    """Every case and implementation that fits the deadline; one row per measurement."""
    dry_run = device != "cuda"
    if dry_run:
        dtype = torch.float32
    rows: list[DecodeRow] = []
    for case in cases(dry_run):
        runner = run_decode_case if isinstance(case, DecodeCase) else run_append_case
        runner(case, device, dtype, rows, deadline, log)
    return rows


def to_markdown(rows: list[DecodeRow], title: str = "Paged decode and KV append") -> str:
    lines = [
        f"## {title}",
        "",
        f"GB/s = bytes that must move / median time; % of the {HBM_TBPS} TB/s HBM peak. "
        "max |diff|: decode against ours, append 0 = bit-exact.",
        "",
        "| case | impl | ms | GB/s | % HBM | max abs diff | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.ms is None:
            lines.append(f"| {row.case} | {row.implementation} | | | | | {row.note} |")
            continue
        lines.append(
            f"| {row.case} | {row.implementation} | {row.ms:.4f} | "
            f"{row.gb_per_s:.1f} | {row.hbm_percent:.1f} | {row.max_abs_diff:.2e} | "
            f"{row.note} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[DecodeRow]):
    """One panel of achieved GB/s per case, ours against each peer (benchmarks/charts.py)."""
    from benchmarks.charts import Panel

    cases = list(dict.fromkeys(row.case for row in rows))
    series: dict[str, list] = {}
    for row in rows:
        values = series.setdefault(row.implementation, [None] * len(cases))
        values[cases.index(row.case)] = row.gb_per_s
    if "ours" not in series:
        return []
    return [
        Panel(
            "paged decode and KV append",
            "achieved GB/s",
            cases,
            series,
            ours="ours",
            lower_is_better=False,
        )
    ]


def write_chart(path: Path, title: str, rows: list[DecodeRow]) -> Path | None:
    """The PNG beside the .md; None, with a note, without matplotlib or data to draw."""
    return write_chart_or_note(path, title, chart(rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results/; a temp dir for --dry-run)",
    )
    parser.add_argument("--budget-s", type=float, default=240.0, help="time budget in seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU sizes, cpu backend")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (use --dry-run to check the plumbing)")
        return 0
    start = time.monotonic()

    class _Deadline:
        def has_room(self) -> bool:
            return time.monotonic() - start < args.budget_s - 20

    # A dry run checks the plumbing on the CPU: its files never land among the results.
    if args.out is None and args.dry_run:
        args.out = Path(tempfile.mkdtemp(prefix="gpu_decode_dry_"))
    elif args.out is None:
        args.out = REPO_ROOT / "benchmarks" / "results"
    device = "cpu" if args.dry_run else "cuda"
    rows = run(_Deadline(), device=device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu-dry-run"
    slug = "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()
    stem = args.out / f"gpu_decode_{slug}_{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(f"# GPU decode benchmark ({gpu})\n\n{to_markdown(rows)}")
    stem.with_suffix(".json").write_text(
        json.dumps([dataclasses.asdict(row) for row in rows], indent=2)
    )
    picture = write_chart(stem.with_suffix(".png"), f"GPU decode benchmark ({gpu})", rows)
    print(to_markdown(rows))
    print(f"wrote {stem}.md, .json" + (" and .png" if picture else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
