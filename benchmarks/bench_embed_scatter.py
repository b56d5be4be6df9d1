"""CPU benchmark of embed_scatter against the eager paths models use today.

Case (fp32): T=16384 tokens, Dm=1024, V=32000, 25% of positions are features.

Peers, side by side in one run:
- ``hf``: F.embedding, scale, then masked_scatter through a [T, Dm] boolean
  mask (what HF vision-language models do);
- ``kosmos``: F.embedding, scale, then index assignment through a boolean row
  index (what Kosmos-2 does);
- ``ours``: metalm_fast.embed_scatter(backend="cpu").

Reported: median ms of forward and forward+backward, the ratio of the faster
eager path to ours, and peak resident memory of each path measured in a fresh
subprocess (VmHWM growth over the baseline after building the inputs; Linux).
Prints PASS/FAIL for the acceptance criteria: forward and forward+backward at
least 1.5x the faster eager path, peak memory no higher.

Usage: python benchmarks/bench_embed_scatter.py [--quick] [--no-write] [--out FILE.md]
(writes benchmarks/results/cpu_embed_scatter_<date>.md and its .png chart unless --no-write
or --quick; with --quick only to --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metalm_fast  # noqa: E402
from benchmarks.common import Panel, cpu_model, write_result  # noqa: E402

PATHS = ("hf", "kosmos", "ours")


def make_inputs(tokens: int, width: int, vocab: int, fraction: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, vocab, (tokens,), generator=generator)
    is_feature = torch.rand(tokens, generator=generator) < fraction
    feature_index = torch.full((tokens,), -1, dtype=torch.int64)
    feature_index[is_feature] = torch.arange(int(is_feature.sum()))
    weight = torch.randn(vocab, width, generator=generator, requires_grad=True)
    features = torch.randn(int(is_feature.sum()), width, generator=generator, requires_grad=True)
    grad_out = torch.randn(tokens, width, generator=generator)
    return token_ids, weight, features, feature_index, grad_out


def run_path(path: str, token_ids, weight, features, feature_index, scale: float):
    if path == "ours":
        return metalm_fast.embed_scatter(
            token_ids, weight, features, feature_index, scale=scale, backend="cpu"
        )
    embedded = F.embedding(token_ids, weight) * scale
    is_feature = feature_index >= 0
    if path == "hf":
        mask = is_feature[:, None].expand_as(embedded)
        return embedded.masked_scatter(mask, features)
    embedded[is_feature] = features[feature_index[is_feature]]
    return embedded


def time_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure_times(args) -> dict[str, dict[str, float]]:
    token_ids, weight, features, feature_index, grad_out = make_inputs(
        args.tokens, args.width, args.vocab, args.fraction
    )
    results = {}
    for path in PATHS:

        def forward(path=path):
            with torch.no_grad():
                run_path(path, token_ids, weight, features, feature_index, args.scale)

        def forward_backward(path=path):
            weight.grad = features.grad = None
            out = run_path(path, token_ids, weight, features, feature_index, args.scale)
            out.backward(grad_out)

        results[path] = {
            "fwd_ms": time_ms(forward, args.repeats),
            "fwd_bwd_ms": time_ms(forward_backward, args.repeats),
        }
    return results


def peak_memory_child(args) -> None:
    """In a fresh process: peak RSS growth (MiB) of one forward+backward of args.path."""
    token_ids, weight, features, feature_index, grad_out = make_inputs(
        args.tokens, args.width, args.vocab, args.fraction
    )
    baseline = _high_water_kib()  # inputs built: every path holds them
    out = run_path(args.path, token_ids, weight, features, feature_index, args.scale)
    out.backward(grad_out)
    print(json.dumps({"peak_mib": (_high_water_kib() - baseline) / 1024}))


def _high_water_kib() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: that survives
    fork + exec, so a child started by a large parent would report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status")


def measure_peaks(args) -> dict[str, float]:
    peaks = {}
    for path in PATHS:
        command = [
            sys.executable,
            __file__,
            "--child-peak",
            path,
            "--tokens",
            str(args.tokens),
            "--width",
            str(args.width),
            "--vocab",
            str(args.vocab),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        peaks[path] = json.loads(output.strip().splitlines()[-1])["peak_mib"]
    return peaks


def chart(times, peaks) -> list[Panel]:
    """Forward and forward+backward time, and peak memory, ours against both eager paths."""
    order = ("ours", "kosmos", "hf")
    return [
        Panel(
            "time",
            "time (ms)",
            ["forward", "forward + backward"],
            {path: [times[path]["fwd_ms"], times[path]["fwd_bwd_ms"]] for path in order},
            ours="ours",
        ),
        Panel(
            "peak memory",
            "MiB over the inputs",
            ["forward + backward"],
            {path: [peaks[path]] for path in order},
            ours="ours",
        ),
    ]


def render(args, times, peaks) -> tuple[str, bool]:
    eager_fwd = min(times["hf"]["fwd_ms"], times["kosmos"]["fwd_ms"])
    eager_fb = min(times["hf"]["fwd_bwd_ms"], times["kosmos"]["fwd_bwd_ms"])
    eager_peak = min(peaks["hf"], peaks["kosmos"])
    lines = [
        f"T={args.tokens}, Dm={args.width}, V={args.vocab}, features {args.fraction:.0%}, fp32, "
        f"scale {args.scale}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{cpu_model()}",
        "",
        "| path | fwd ms | fwd+bwd ms | fwd GB/s | peak MiB (fwd+bwd) |",
        "|---|---|---|---|---|",
    ]
    # Bytes a one-pass forward must move: read one source row and write one output row per token.
    moved = 2 * args.tokens * args.width * 4
    for path in PATHS:
        t = times[path]
        lines.append(
            f"| {path} | {t['fwd_ms']:.2f} | {t['fwd_bwd_ms']:.2f} | "
            f"{moved / t['fwd_ms'] / 1e6:.1f} | {peaks[path]:.0f} |"
        )
    ours = times["ours"]
    checks = [
        ("forward >= 1.5x faster eager path", eager_fwd / ours["fwd_ms"], 1.5),
        ("forward+backward >= 1.5x faster eager path", eager_fb / ours["fwd_bwd_ms"], 1.5),
    ]
    lines.append("")
    ok = True
    for name, ratio, target in checks:
        passed = ratio >= target
        ok &= passed
        lines.append(f"{'PASS' if passed else 'FAIL'}: {name}: {ratio:.2f}x")
    memory_ok = peaks["ours"] <= eager_peak
    ok &= memory_ok
    lines.append(
        f"{'PASS' if memory_ok else 'FAIL'}: peak memory no higher than the leaner eager path: "
        f"{peaks['ours']:.0f} MiB vs {eager_peak:.0f} MiB"
    )
    return "\n".join(lines), ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--scale", type=float, default=32.0)  # sqrt(1024), as Kosmos scales
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument(
        "--out",
        help="markdown file for the table (default benchmarks/results/cpu_embed_scatter_<date>.md;"
        " --quick writes only here)",
    )
    parser.add_argument("--no-write", action="store_true", help="only print the table (no chart)")
    parser.add_argument("--child-peak", dest="path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.path:
        peak_memory_child(args)
        return 0
    if args.quick:
        args.tokens, args.width, args.vocab, args.repeats = 2048, 256, 4000, 3
    times = measure_times(args)
    peaks = measure_peaks(args)
    table, ok = render(args, times, peaks)
    title = f"embed_scatter CPU benchmark ({datetime.date.today()})"
    print(title, table, sep="\n\n")
    if not args.no_write and (args.out or not args.quick):
        write_result(
            f"cpu_embed_scatter_{datetime.date.today()}",
            title,
            table,
            "python benchmarks/bench_embed_scatter.py",
            path=args.out,
            chart=chart(times, peaks),
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
