"""``metalm-fast bench``: every CPU benchmark table from one command.

Runs, one after the other, each as its own process (so one benchmark's
memory and threads never colour the next): span attention, embed_scatter,
paged decode, and the end-to-end MetaLM throughput (fast path vs the
HF-style path). Each prints its table and PASS/FAIL lines and writes its
markdown copy and a PNG chart to benchmarks/results/ (``--no-write`` skips both).

The benchmarks live in the source checkout (benchmarks/ beside metalm_fast/),
not in the installed package; an install without them is told so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

__all__ = ["BENCHMARKS", "add_arguments", "main", "source_root"]

#: name -> script, in the order they run
BENCHMARKS = {
    "span_attention": "benchmarks/bench_span_attention.py",
    "embed_scatter": "benchmarks/bench_embed_scatter.py",
    "decode": "benchmarks/bench_decode.py",
    "decode_linear": "benchmarks/bench_decode_linear.py",
    "fused_ce": "benchmarks/bench_fused_ce.py",
    "end_to_end": "benchmarks/bench_end_to_end.py",
    "hf": "benchmarks/bench_hf.py",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        default=None,
        help="run only these benchmarks",
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="do not write the markdown tables and PNG charts to benchmarks/results/",
    )


def source_root() -> Path:
    """The source checkout holding benchmarks/; FileNotFoundError for an install without it."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks").is_dir():
        raise FileNotFoundError(
            f"metalm-fast bench needs the source checkout (benchmarks/ beside metalm_fast/); "
            f"none at {root}. Install with `pip install -e .` from a clone."
        )
    return root


def main(args: argparse.Namespace) -> int:
    root = source_root()
    names = args.only or list(BENCHMARKS)
    failed = []
    for name in names:
        print(f"\n=== {name} ({BENCHMARKS[name]}) ===", flush=True)
        command = [sys.executable, BENCHMARKS[name]] + (["--no-write"] if args.no_write else [])
        if subprocess.run(command, cwd=root).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nbench: {', '.join(failed)} failed (non-zero exit)")
    return 1 if failed else 0
