"""CPU benchmark of span attention: the cpu backend against its peers, side by side.

Run ``python benchmarks/bench_span_attention.py`` (``--quick`` for small sizes). It
prints one table, writes a markdown copy with the machine's description to
benchmarks/results/cpu_span_attention_<date>.md, and ends with one PASS/FAIL line
per acceptance criterion. Only ratios measured in this one run mean anything:
every implementation of a case is timed round-robin in the same loop, so load
from other processes hits all of them alike.

Implementations (fp32, packed [T, H, D] inputs; peers get [B, H, T, D] copies):

- ``cpu``: metalm_fast.span_attention(..., backend="cpu") (the C++ kernels);
- ``sdpa_dense``: SDPA over the whole packed sequence with a dense bool mask [T, T];
- ``sdpa_practical``: SDPA per sequence, the practical CPU limit: documents batched
  with is_causal (decoder), spans grouped by length with no mask (encoder),
  documents batched with their dense per-document mask (semi-causal);
- ``flex``: torch.compile(flex_attention) with create_block_mask over a mask_mod
  reading kv_start / kv_end; timed without compile, and compile and
  create_block_mask times are reported apart;
- ``reference``: metalm_fast.reference.span_attention (dense, fewer repeats).

Columns: ms (median), GFLOP/s over allowed pairs (4 * pairs * D * H forward,
2.5x that backward), tiles computed / tiles meeting the mask and / dense tiles
(on the implementation's own tile grid; the cpu backend's query blocks follow
the mask, so it can compute fewer tiles than a fixed grid meets), and computed
pairs / allowed pairs.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    Case,
    Panel,
    PracticalLimit,
    cpu_tile_stats,
    flex_mask_mod,
    flex_tile_stats,
    forward_flops,
    fwd_bwd,
    machine_lines,
    make_cases,
    make_qkv,
    time_interleaved,
    time_once_each,
    to_bhtd,
    write_result,
)
from metalm_fast import reference, span_attention  # noqa: E402


def single_threaded(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


class Row(dict):
    """One table row: case, impl, pass (fwd / fwd+bwd) and metrics."""


def bench_case(case: Case, heads: int, head_dim: int, args) -> tuple[list[Row], dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = case.mask
    total = mask.num_queries
    q, k, v = make_qkv(total, heads, head_dim)
    flops = forward_flops(mask, heads, head_dim)
    pairs = mask.num_pairs()
    extra: dict = {"pairs": pairs}

    # --- FlexAttention setup: block mask and compile, timed apart
    begin = time.perf_counter()
    block_mask = create_block_mask(flex_mask_mod(mask), None, None, total, total, device="cpu")
    extra["create_block_mask_s"] = time.perf_counter() - begin
    # A fresh compile per case: reusing the previous case's graph would recompile
    # with dynamic shapes (a much slower kernel) when the mask_mod closure changes.
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    qf, kf, vf = (to_bhtd(x) for x in (q, k, v))
    begin = time.perf_counter()
    flex(qf, kf, vf, block_mask=block_mask)
    first_call = time.perf_counter() - begin
    steady = time_once_each(lambda: flex(qf, kf, vf, block_mask=block_mask), 1, 3)
    extra["flex_compile_s"] = max(first_call - steady, 0.0)

    dense = mask.to_dense()[None, None]
    practical = PracticalLimit(case, q, k, v)

    forward_fns = {
        "cpu": lambda: span_attention(q, k, v, mask, backend="cpu"),
        # The SpanMask is the only per-batch metadata the cpu backend needs (it
        # plans its tiles inside the op, and that is part of the cpu time).
        "mask_build": case.build_mask,
        # The same, single-threaded: on a busy machine every intra-op parallel
        # region of the O(T) index ops waits for a core, which this isolates.
        "mask_build_1t": lambda: single_threaded(case.build_mask),
        "sdpa_dense": lambda: torch.nn.functional.scaled_dot_product_attention(
            qf, kf, vf, attn_mask=dense
        ),
        "sdpa_practical": practical.forward,
        "flex": lambda: flex(qf, kf, vf, block_mask=block_mask),
    }
    with torch.no_grad():
        fwd_times = time_interleaved(forward_fns, args.warmup, args.repeats)
        extra["mask_build_s"] = fwd_times.pop("mask_build")
        extra["mask_build_1t_s"] = fwd_times.pop("mask_build_1t")
        fwd_times["reference"] = time_once_each(
            lambda: reference.span_attention(q, k, v, mask), 0, args.reference_repeats
        )

    # --- forward + backward
    leaves_cpu = [x.clone().requires_grad_(True) for x in (q, k, v)]
    leaves_dense = [x.clone().requires_grad_(True) for x in (qf, kf, vf)]
    practical_grad = PracticalLimit(case, q, k, v, requires_grad=True)
    backward_fns = {
        "cpu": fwd_bwd(lambda: span_attention(*leaves_cpu, mask, backend="cpu"), leaves_cpu),
        "sdpa_dense": fwd_bwd(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                *leaves_dense, attn_mask=dense
            ),
            leaves_dense,
        ),
        "sdpa_practical": fwd_bwd(practical_grad.forward, practical_grad.leaves()),
    }
    bwd_times = time_interleaved(backward_fns, args.warmup, args.repeats)
    leaves_ref = [x.clone().requires_grad_(True) for x in (q, k, v)]
    bwd_times["reference"] = time_once_each(
        fwd_bwd(lambda: reference.span_attention(*leaves_ref, mask)[0], leaves_ref),
        0,
        args.reference_repeats,
    )
    flex_leaves = [x.clone().requires_grad_(True) for x in (qf, kf, vf)]
    try:
        fwd_bwd(lambda: flex(*flex_leaves, block_mask=block_mask), flex_leaves)()
        bwd_times["flex"] = time_once_each(
            fwd_bwd(lambda: flex(*flex_leaves, block_mask=block_mask), flex_leaves),
            1,
            args.repeats,
        )
    except Exception as error:  # noqa: BLE001 - reported verbatim in the table
        extra["flex_backward_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"

    cpu_tiles = cpu_tile_stats(mask)
    flex_tiles = flex_tile_stats(block_mask, mask)
    computed_pairs = {
        "cpu": cpu_tiles.computed_pairs,
        "sdpa_dense": total * total,
        "sdpa_practical": practical.pairs(),
        "flex": flex_tiles.computed_pairs,
        "reference": total * total,
    }
    tiles = {"cpu": cpu_tiles, "flex": flex_tiles}
    rows: list[Row] = []
    for impl in ("cpu", "sdpa_practical", "flex", "sdpa_dense", "reference"):
        stats = tiles.get(impl)
        fwd = fwd_times[impl]
        fb = bwd_times.get(impl)
        rows.append(
            Row(
                case=case.name,
                impl=impl,
                fwd_ms=fwd * 1e3,
                fwd_gflops=flops / fwd / 1e9,
                fb_ms=None if fb is None else fb * 1e3,
                fb_gflops=None if fb is None else 3.5 * flops / fb / 1e9,
                tiles_meet=None if stats is None else stats.computed / max(stats.meeting, 1),
                tiles_dense=None if stats is None else stats.computed / max(stats.dense, 1),
                work=computed_pairs[impl] / max(pairs, 1),
            )
        )
    extra["fwd"] = fwd_times
    extra["fb"] = bwd_times
    return rows, extra


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def render_table(rows: list[Row]) -> str:
    header = (
        "| case | impl | fwd ms | fwd GFLOP/s | fwd+bwd ms | fwd+bwd GFLOP/s "
        "| tiles/meeting | tiles/dense | pairs computed/allowed |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['impl']} | {row['fwd_ms']:.2f} | {row['fwd_gflops']:.1f} "
            f"| {fmt(row['fb_ms'], '.2f')} | {fmt(row['fb_gflops'], '.1f')} "
            f"| {fmt(row['tiles_meet'], '.3f', '-')} | {fmt(row['tiles_dense'], '.3f', '-')} "
            f"| {row['work']:.2f} |"
        )
    return "\n".join(lines)


def chart(rows: list[Row]) -> list[Panel]:
    """Forward and forward+backward time per case, the cpu backend against each peer."""
    cases = list(dict.fromkeys(row["case"] for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    by_key = {(row["case"], row["impl"]): row for row in rows}
    return [
        Panel(
            title,
            "time (ms)",
            cases,
            {impl: [by_key[case, impl][key] for case in cases] for impl in impls},
            ours="cpu",
        )
        for title, key in (("forward", "fwd_ms"), ("forward + backward", "fb_ms"))
    ]


def criteria(extras: dict[str, dict]) -> list[tuple[bool, str]]:
    results = []
    for name, extra in extras.items():
        fwd = extra["fwd"]
        ratio = fwd["cpu"] / fwd["flex"]
        results.append(
            (
                ratio <= 1.0,
                f"{name}: cpu forward at least as fast as FlexAttention compiled "
                f"(cpu/flex = {ratio:.2f}, need <= 1.00)",
            )
        )
        limit = 1.5 if name == "semi_causal" else 1.3
        ratio = fwd["cpu"] / fwd["sdpa_practical"]
        results.append(
            (
                ratio <= limit,
                f"{name}: cpu forward within {limit}x of the practical limit "
                f"(cpu/sdpa_practical = {ratio:.2f}, need <= {limit})",
            )
        )
    if "semi_causal" in extras:
        fb = extras["semi_causal"]["fb"]
        speedup = fb["sdpa_dense"] / fb["cpu"]
        results.append(
            (
                speedup >= 4.0,
                f"semi_causal: cpu forward+backward >= 4x faster than SDPA with a "
                f"dense mask (speedup = {speedup:.2f}x)",
            )
        )
    for name, extra in extras.items():
        share = extra["mask_build_s"] / extra["fwd"]["cpu"]
        share_1t = extra["mask_build_1t_s"] / extra["fwd"]["cpu"]
        results.append(
            (
                share < 0.05,
                f"{name}: building the SpanMask < 5% of the cpu forward ({100 * share:.2f}%; "
                f"single-threaded build {100 * share_1t:.2f}%)",
            )
        )
    return results


def notes(extras: dict[str, dict]) -> str:
    lines = []
    for name, extra in extras.items():
        lines.append(
            f"- {name}: {extra['pairs']} allowed pairs; SpanMask build "
            f"{extra['mask_build_s'] * 1e3:.3f} ms ({extra['mask_build_1t_s'] * 1e3:.3f} ms "
            "single-threaded); create_block_mask "
            f"{extra['create_block_mask_s'] * 1e3:.1f} ms; flex compile "
            f"{extra['flex_compile_s']:.1f} s"
            + (
                f"; flex fwd+bwd n/a ({extra['flex_backward_error']})"
                if "flex_backward_error" in extra
                else ""
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (T=1024, docs of 256)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--no-write", action="store_true", help="do not write the markdown copy and chart"
    )
    args = parser.parse_args(argv)
    total, doc_len = (1024, 256) if args.quick else (4096, 1024)
    args.repeats = args.repeats or (5 if args.quick else 9)
    args.reference_repeats = 3 if args.quick else 1
    # Report honest compile times: no inductor cache from earlier runs.
    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)

    rows: list[Row] = []
    extras: dict[str, dict] = {}
    for case in make_cases(total, doc_len):
        case_rows, extra = bench_case(case, args.heads, args.head_dim, args)
        rows += case_rows
        extras[case.name] = extra

    today = datetime.date.today().isoformat()
    title = (
        f"CPU span attention, fp32, T={total}, H={args.heads}, D={args.head_dim}, "
        f"documents of {doc_len}"
    )
    table = render_table(rows)
    checks = criteria(extras)
    check_lines = "\n".join(f"{'PASS' if ok else 'FAIL'} {text}" for ok, text in checks)
    print(title)
    print(table)
    print(notes(extras))
    print(check_lines)

    if not args.no_write:
        suffix = "_quick" if args.quick else ""
        machine = (
            f"{machine_lines()}\n"
            f"- date: {today}; median of {args.repeats} round-robin repeats after "
            f"{args.warmup} warm-up rounds (reference: {args.reference_repeats})\n"
            "- the machine is shared: compare ratios within this table only"
        )
        write_result(
            f"cpu_span_attention_{today}{suffix}",
            title,
            f"{machine}\n\n{table}\n\n{notes(extras)}\n\n"
            f"## Acceptance criteria\n\n```\n{check_lines}\n```",
            f"python benchmarks/bench_span_attention.py{suffix.replace('_', ' --')}",
            chart=chart(rows),
        )
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
