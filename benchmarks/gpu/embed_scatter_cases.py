"""GPU benchmark of embed_scatter: GB/s against HBM, and the ratio to the eager paths.

embed_scatter is pure data movement, so its figure of merit is bandwidth:
bytes that must move / time, as a share of the GPU's HBM peak (H200: 4.8 TB/s,
datasheet). Forward must read one source row and write one output row per
token; forward+backward additionally reads grad_out and writes the weight and
feature gradients.

Entry point for benchmarks/gpu/run_gpu_benchmarks.py (shares its deadline)::

    rows = embed_scatter_cases.run(deadline, device="cuda", dtype=torch.bfloat16)
    text = embed_scatter_cases.to_markdown(rows)

Case: T=16384, Dm=4096, V=32000, 25% feature positions (and Dm=1024, the CPU
benchmark's width). Implementations: ``triton`` and ``cuda`` backends (cuda when
metalm_fast._cuda is built), ``hf`` (F.embedding, scale, masked_scatter) and
``kosmos`` (F.embedding, scale, boolean-index assignment). The dry run
(device="cpu") uses tiny sizes and the cpu backend.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# Sibling modules of benchmarks/gpu, however this file is started (script, module, by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import median_ms  # noqa: E402

HBM_PEAK_GBPS = 4800.0  # H200 SXM datasheet: 4.8 TB/s


@dataclasses.dataclass
class ScatterRow:
    case: str
    impl: str
    pass_name: str  # "fwd" or "fwd+bwd"
    ms: float
    gbps: float
    hbm_share: float
    speedup_vs_eager: float | None = None
    note: str = ""


def _inputs(tokens, width, vocab, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (tokens,), generator=generator)
    is_feature = torch.rand(tokens, generator=generator) < 0.25
    feature_index = torch.full((tokens,), -1, dtype=torch.int64)
    feature_index[is_feature] = torch.arange(int(is_feature.sum()))
    weight = torch.randn(vocab, width, generator=generator).to(dtype)
    features = torch.randn(int(is_feature.sum()), width, generator=generator).to(dtype)
    grad = torch.randn(tokens, width, generator=generator).to(dtype)
    return [t.to(device) for t in (ids, weight, features, feature_index, grad)]


def _eager(kind, ids, weight, features, feature_index, scale):
    embedded = F.embedding(ids, weight) * scale
    is_feature = feature_index >= 0
    if kind == "hf":
        return embedded.masked_scatter(is_feature[:, None].expand_as(embedded), features)
    embedded[is_feature] = features[feature_index[is_feature]]
    return embedded


def _implementations(device):
    import metalm_fast
    from metalm_fast.ops._backend import unavailable_reason

    impls = {}
    backends = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for backend in backends:
        reason = unavailable_reason(backend, device)
        if reason is None:
            impls[backend] = lambda *a, b=backend, s=1.0: metalm_fast.embed_scatter(
                *a, scale=s, backend=b
            )
        else:
            print(f"  embed_scatter {backend}: skipped ({reason})")
    impls["hf"] = lambda *a, s=1.0: _eager("hf", *a, s)
    impls["kosmos"] = lambda *a, s=1.0: _eager("kosmos", *a, s)
    return impls


def _bytes(tokens, width, vocab, num_features, element, with_backward):
    forward = 2 * tokens * width * element  # read a source row, write the output row
    if not with_backward:
        return forward
    # read grad_out once, write the dense weight gradient and the feature gradient
    return forward + (tokens + vocab + num_features) * width * element


def _run_case(name, tokens, width, vocab, device, dtype, rows, deadline):
    ids, weight, features, feature_index, grad = _inputs(tokens, width, vocab, device, dtype)
    scale = width**0.5
    element = weight.element_size()
    impls = _implementations(device)
    for pass_name, with_backward in (("fwd", False), ("fwd+bwd", True)):
        timings = {}
        for impl, fn in impls.items():
            if deadline is not None and not deadline.has_room():
                print(f"  {name} {impl} {pass_name}: skipped (deadline)")
                continue
            w = weight.clone().requires_grad_(with_backward)
            f = features.clone().requires_grad_(with_backward)

            def step(fn=fn, w=w, f=f, with_backward=with_backward):
                if not with_backward:
                    with torch.no_grad():
                        return fn(ids, w, f, feature_index, s=scale)
                w.grad = f.grad = None
                fn(ids, w, f, feature_index, s=scale).backward(grad)

            timings[impl] = median_ms(step, device.type, warmup=3)
        eager = min((timings[k] for k in ("hf", "kosmos") if k in timings), default=None)
        moved = _bytes(tokens, width, vocab, features.shape[0], element, with_backward)
        for impl, ms in timings.items():
            gbps = moved / ms / 1e6
            rows.append(
                ScatterRow(
                    case=name,
                    impl=impl,
                    pass_name=pass_name,
                    ms=ms,
                    gbps=gbps,
                    hbm_share=gbps / HBM_PEAK_GBPS,
                    speedup_vs_eager=(eager / ms) if eager else None,
                )
            )
            print(f"  {name} {pass_name:7s} {impl:7s} {ms:8.3f} ms {gbps:8.1f} GB/s")


def run(deadline=None, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """Run every case; returns a list of ScatterRow."""
    device = torch.device(device)
    rows: list[ScatterRow] = []
    if device.type == "cuda":
        cases = [("T16384_D4096", 16384, 4096, 32000), ("T16384_D1024", 16384, 1024, 32000)]
    else:
        cases = [("dry_run", 512, 64, 1000)]
    for name, tokens, width, vocab in cases:
        _run_case(name, tokens, width, vocab, device, dtype, rows, deadline)
    return rows


def to_markdown(rows: list[ScatterRow], title: str = "embed_scatter") -> str:
    lines = [
        f"## {title}",
        "",
        "| case | pass | impl | ms | GB/s | share of HBM peak | speedup vs faster eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else "-"
        lines.append(
            f"| {r.case} | {r.pass_name} | {r.impl} | {r.ms:.3f} | {r.gbps:.0f} | "
            f"{100 * r.hbm_share:.0f}% | {speedup} |"
        )
    return "\n".join(lines)
