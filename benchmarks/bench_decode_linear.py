"""CPU benchmark of the decode-step linear layers: ``decode_linear`` against ``F.linear``.

Run ``python benchmarks/bench_decode_linear.py`` (``--quick`` for fewer repeats).
It prints one table and writes a copy to benchmarks/results/cpu_decode_linear_<date>.md
(``--no-write``: print only). Single thread, fp32, no autograd.

Shapes (N, K) of the small preset's decoder (width 256): qkv (768, 256), out
(256, 256), MLP up (1024, 256), MLP down (256, 1024), LM head (8192, 256); rows
M in {1, 8, 32} (the decode batch).

- ``hot``: the same weight, x and bias every call (the weight is in cache, from
  L2 for the small layers to L3 for the LM head);
- ``cold``: before every call a 64 MiB buffer is summed, which evicts the
  weight from every cache level, as the KV cache streaming does between two uses
  of a layer's weight in a decode step; then the same implementation runs once
  on a 16-row weight, untimed, to bring its code path (Python, dispatcher,
  kernel) back into cache, as the other layers of a step keep it. Without that
  call the misses of the code path itself dominated the small layers' times.
  Only the linear is timed.

Each figure is the median over repeats, with the two implementations
alternating, so load from other processes hits them alike. GB/s counts the
weight bytes (N * K * 4), GFLOP/s the 2 * M * N * K multiply-adds, and
``speedup`` is F.linear's time over decode_linear's.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Panel, machine_lines, write_result  # noqa: E402
from metalm_fast.ops.decode_linear import decode_linear, kernel_available  # noqa: E402

SHAPES = [
    ("qkv", 768, 256),
    ("out", 256, 256),
    ("mlp up", 1024, 256),
    ("mlp down", 256, 1024),
    ("lm head", 8192, 256),
]
ROWS = [1, 8, 32]
EVICT_BYTES = 64 << 20


def time_pair(functions, repeats: int, before=None) -> list[float]:
    """Median seconds per call of each function, calls alternating; ``before(index)``
    runs untimed ahead of every call of ``functions[index]``."""
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for index, function in enumerate(functions):
            if before is not None:
                before(index)
            start = time.perf_counter()
            function()
            samples[index].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def time_layer(x, weight, bias, evict, repeats: dict[str, int]) -> dict[str, list[float]]:
    """{"hot": [F.linear s, decode_linear s], "cold": [...]} for one layer."""
    torch.testing.assert_close(
        decode_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4
    )
    implementations = (F.linear, decode_linear)
    functions = [functools.partial(f, x, weight, bias) for f in implementations]
    small_weight = weight[:16].clone()
    warm_code = [functools.partial(f, x, small_weight) for f in implementations]

    def evict_weight(index: int) -> None:
        evict.sum()
        warm_code[index]()

    time_pair(functions, 20)  # warm-up
    return {
        "hot": time_pair(functions, repeats["hot"]),
        "cold": time_pair(functions, repeats["cold"], before=evict_weight),
    }


def chart(times: dict[str, dict[str, list[float]]]) -> list[Panel]:
    """Per-layer time, F.linear against decode_linear, hot and cold (``times``: mode ->
    {"cases": labels, "F.linear": seconds, "decode_linear": seconds})."""
    return [
        Panel(
            f"{mode} weight",
            "time per call (us)",
            measured["cases"],
            {name: [t * 1e6 for t in measured[name]] for name in ("decode_linear", "F.linear")},
            ours="decode_linear",
        )
        for mode, measured in times.items()
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--no-write", action="store_true", help="do not write results/ (table and chart)"
    )
    parser.add_argument(
        "--out",
        help="markdown file (default benchmarks/results/"
        "cpu_decode_linear_<date>.md; --quick writes only here)",
    )
    args = parser.parse_args(argv)
    if not kernel_available():
        sys.exit("metalm_fast._C has no _decode_linear_cpu: rebuild it (pip install -e .)")
    torch.set_num_threads(1)
    repeats = {"hot": 50, "cold": 10} if args.quick else {"hot": 400, "cold": 40}
    evict = torch.ones(EVICT_BYTES // 4)
    generator = torch.Generator().manual_seed(0)

    header = (
        f"{'layer':<9} {'N':>5} {'K':>5} {'M':>3} {'mode':<5} | {'F.linear us':>11} "
        f"{'GB/s':>6} {'GFLOP/s':>7} | {'ours us':>8} {'GB/s':>6} {'GFLOP/s':>7} | "
        f"{'speedup':>7}"
    )
    lines = [header, "-" * len(header)]
    totals: dict[tuple[int, str], list[float]] = {}
    per_layer: dict[str, dict[str, list]] = {}
    with torch.inference_mode():
        for rows in ROWS:
            for name, n, k in SHAPES:
                weight = torch.randn(n, k, generator=generator)
                bias = torch.randn(n, generator=generator)
                x = torch.randn(rows, k, generator=generator)
                for mode, times in time_layer(x, weight, bias, evict, repeats).items():
                    total = totals.setdefault((rows, mode), [0.0, 0.0])
                    total[0] += times[0]
                    total[1] += times[1]
                    measured = per_layer.setdefault(
                        mode, {"cases": [], "F.linear": [], "decode_linear": []}
                    )
                    measured["cases"].append(f"{name} M={rows}")
                    measured["F.linear"].append(times[0])
                    measured["decode_linear"].append(times[1])
                    weight_bytes, flops = n * k * 4, 2 * rows * n * k
                    cells = " | ".join(
                        f"{t * 1e6:>{w}.1f} {weight_bytes / t / 1e9:>6.1f} {flops / t / 1e9:>7.1f}"
                        for t, w in zip(times, (11, 8))
                    )
                    lines.append(
                        f"{name:<9} {n:>5} {k:>5} {rows:>3} {mode:<5} | {cells} | "
                        f"{times[0] / times[1]:>6.2f}x"
                    )
                    print(lines[-1], flush=True)
    lines.append("\nall five layers (sum of medians):")
    for (rows, mode), (theirs, ours) in sorted(totals.items()):
        lines.append(
            f"  M={rows:<3} {mode:<5} F.linear {theirs * 1e6:8.1f} us   decode_linear "
            f"{ours * 1e6:8.1f} us   speedup {theirs / ours:5.2f}x"
        )
    print("\n".join(lines[lines.index("\nall five layers (sum of medians):") :]))
    if not args.no_write and (args.out or not args.quick):
        today = datetime.date.today().isoformat()
        write_result(
            f"cpu_decode_linear_{today}",
            f"CPU decode_linear vs F.linear ({today})",
            f"{machine_lines()}\n"
            f"- hot: the same weight every call; cold: a 64 MiB buffer summed before every call "
            f"(see the script's docstring); medians of {repeats['hot']} (hot) and "
            f"{repeats['cold']} (cold) alternating calls\n\n```\n" + "\n".join(lines) + "\n```",
            "python benchmarks/bench_decode_linear.py",
            path=args.out,
            chart=chart(per_layer),
        )


if __name__ == "__main__":
    main()
