"""GPU: transformers' own models against the same weights converted to a native MetaLM.

The GPU counterpart of benchmarks/bench_hf.py, built from its pieces: a
Llama-style and a GPT-NeoX-style config (parallel residual, rotary over 25% of
each head) with random weights, saved with ``save_pretrained`` and loaded as
transformers with ``attn_implementation="sdpa"``, transformers with
``"metalm_span"`` (metalm_fast.hf.register()) and ``hf.load_decoder`` (native),
all with those weights.

Entry point for benchmarks/gpu/run_gpu_benchmarks.py (shares its deadline)::

    rows = hf_cases.run(deadline, device="cuda", dtype=torch.bfloat16)
    text = hf_cases.to_markdown(rows)

Sizes on the GPU (bf16 weights, activations and AdamW state): width 1024,
8 layers, 16 heads, vocab 32000, MLP 2816 (Llama) / 4096 (NeoX); the CPU
benchmark's width-256 models would only measure kernel launches there.
Training: documents of 200..2000 tokens (log-uniform) packed into micro-batches
of at most 16384 tokens, every path on the same documents (transformers padded
[B, Lmax] and packed [1, T] with restarting position_ids, metalm_span packed also
with cu_seq_lens; native packed), forward + backward + AdamW, a warm-up step
per path at learning rate 0 (Triton compiles land there; the weights stay as
saved, so the first timed losses compare), then alternating timed rounds;
tokens/s from the median synchronised step. Peak memory: torch.cuda
max_memory_allocated over one step minus what is allocated before it.
Generation: 32 prompts of 200..1000 tokens, 128 new tokens each, greedy;
transformers' ``generate()`` (left padding) against ``MetaLM.generate``; new
tokens/s including prefill, and how many tokens equal native's (bf16 kernels
may legitimately part ways after a near tie).

The dry run (device="cpu") runs bench_hf's tiny ``--quick`` sizes in fp32 to prove
the plumbing; its rows are marked as CPU dry-run figures, never GPU ones, and
memory is not measured there.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # benchmarks.* from the source tree, however this is loaded
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_hf  # noqa: E402

TRAINING = "training (fwd+bwd+AdamW)"
MEMORY = "training peak memory (one step)"
GENERATION = "generation (incl. prefill)"

GPU_SETTINGS = bench_hf.Settings(
    width=1024,
    layers=8,
    heads=16,
    vocab=32000,
    llama_mlp=2816,
    neox_mlp=4096,
    token_budget=16384,
    micro_batches=3,
    repeats=3,
    prompts=32,
    new_tokens=128,
    gen_repeats=2,
)
DRY_RUN_SETTINGS = bench_hf.QUICK


@dataclasses.dataclass
class HFRow:
    device: str
    family: str
    quantity: str
    unit: str
    values: dict[str, float | None]  # path -> value (None: not measured)
    ratio: float | None = None  # native's advantage over sdpa (packed, for training)
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    begin = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - begin


def _out_of_time(deadline, what: str, log) -> bool:
    if deadline is not None and not deadline.has_room():
        log(f"  hf {what}: deadline, stopping early")
        return True
    return False


def _training(settings, family, directory, device, dtype, deadline, log) -> list[HFRow]:
    paths = bench_hf.TRAIN_PATHS
    groups = bench_hf.training_documents(settings)
    models = {p: bench_hf.load_model(p, directory, device, dtype).train() for p in paths}
    optimizers = {p: torch.optim.AdamW(m.parameters(), lr=0.0) for p, m in models.items()}
    warm = bench_hf.warm_up_documents(groups[0])
    for path in paths:  # lr 0: compiles and AdamW state, the weights stay as saved
        warm_inputs = bench_hf.path_inputs(path, warm, device)
        bench_hf.train_step(models[path], optimizers[path], path, warm_inputs)
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = settings.lr
    inputs = [{p: bench_hf.path_inputs(p, group, device) for p in paths} for group in groups]
    tokens = [sum(map(len, group)) for group in groups]
    rates: dict[str, list[float]] = {path: [] for path in paths}
    losses: dict[str, float] = {}
    for index in range(settings.repeats):
        if _out_of_time(deadline, f"{family} training", log):
            break
        batch = index % len(groups)
        for path in paths if index % 2 == 0 else paths[::-1]:

            def step(p=path, batch_inputs=inputs[batch][path]):
                loss = bench_hf.train_step(models[p], optimizers[p], p, batch_inputs)
                losses.setdefault(p, loss)  # the first step: every path on the saved weights

            rates[path].append(tokens[batch] / _timed(step, device))
    rows = []
    if all(rates.values()):
        speed = {path: statistics.median(values) for path, values in rates.items()}
        diffs = {p: abs(losses[p] - losses["native"]) / abs(losses["native"]) for p in paths}
        rows.append(
            HFRow(
                device.type,
                family,
                TRAINING,
                "tokens/s",
                speed,
                speed["native"] / speed[bench_hf.BASELINE],
                f"{len(rates['native'])} rounds, micro-batches of {min(tokens)}..{max(tokens)} "
                f"tokens; loss rel. diff vs native: "
                + ", ".join(f"{p} {d:.1e}" for p, d in diffs.items() if p != "native"),
            )
        )
        log(f"  hf {family} training: " + ", ".join(f"{p} {v:,.0f}" for p, v in speed.items()))
    if device.type != "cuda":
        rows.append(
            HFRow(device.type, family, MEMORY, "MiB", {}, note="not measured on the CPU dry run")
        )
        return rows
    peaks = {}
    for path in paths:
        if _out_of_time(deadline, f"{family} memory", log):
            return rows
        optimizers[path].zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        bench_hf.train_step(models[path], optimizers[path], path, inputs[0][path])
        torch.cuda.synchronize()
        peaks[path] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    rows.append(
        HFRow(
            device.type,
            family,
            MEMORY,
            "MiB over baseline",
            peaks,
            peaks[bench_hf.BASELINE] / peaks["native"],
            "max_memory_allocated - memory_allocated before the step",
        )
    )
    return rows


def _generation(settings, family, directory, device, dtype, deadline, log) -> list[HFRow]:
    prompts = bench_hf.prompt_lists(settings)
    runners, outputs, failed = {}, {}, {}
    with torch.no_grad():
        for path in bench_hf.GEN_PATHS:  # warm-up, and the tokens to compare
            model = bench_hf.load_model(path, directory, device, dtype).eval()
            runner = bench_hf.generation_runner(path, model, prompts, settings.new_tokens, device)
            try:
                outputs[path] = runner()
            except Exception as error:  # noqa: BLE001 -- recorded in the row, not fatal
                if path == "native":
                    raise
                failed[path] = f"{type(error).__name__}: {error}"[:160]
                continue
            runners[path] = runner
        seconds: dict[str, list[float]] = {path: [] for path in runners}
        for index in range(settings.gen_repeats):
            if _out_of_time(deadline, f"{family} generation", log):
                break
            for path in list(runners) if index % 2 == 0 else list(runners)[::-1]:
                seconds[path].append(_timed(runners[path], device))
    if not all(seconds.values()):
        return []
    new = settings.prompts * settings.new_tokens
    speed = {path: new / statistics.median(seconds[path]) for path in runners}
    speed.update({path: None for path in failed})
    native = outputs["native"]
    generated = sum(map(len, native))
    same = [
        f"{path} {bench_hf.same_tokens(native, outputs[path])}/{generated} tokens equal native's"
        for path in runners
        if path != "native"
    ]
    note = (
        f"{settings.prompts} prompts of {settings.prompt_min}..{settings.prompt_max} tokens, "
        f"{settings.new_tokens} new, greedy; " + "; ".join(same)
    )
    note += "".join(f"; {path}: generate() failed: {why}" for path, why in failed.items())
    shown = ", ".join(f"{p} {v:,.0f}" for p, v in speed.items() if v is not None)
    log(f"  hf {family} generation: {shown} new tokens/s")
    ratio = speed["native"] / speed["sdpa"] if speed.get("sdpa") else None
    return [HFRow(device.type, family, GENERATION, "new tokens/s", speed, ratio, note)]


def run(
    deadline=None, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, log=print
) -> list[HFRow]:
    """Training, memory and generation rows per config; a CPU device is the dry run."""
    device = torch.device(device)
    settings = GPU_SETTINGS if device.type == "cuda" else DRY_RUN_SETTINGS
    if device.type != "cuda":
        dtype = torch.float32
    bench_hf.quiet_transformers()
    log(
        f"  hf: width {settings.width}, {settings.layers} layers, vocab {settings.vocab}, "
        f"{str(dtype).replace('torch.', '')} on {device}"
    )
    rows: list[HFRow] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in bench_hf.FAMILIES:
            with tempfile.TemporaryDirectory(prefix="hf_cases_") as directory:
                bench_hf.save_random_model(family, settings, directory)
                for phase in (_training, _generation):
                    if _out_of_time(deadline, f"{family} {phase.__name__[1:]}", log):
                        rows.append(
                            HFRow(
                                device.type,
                                family,
                                phase.__name__[1:],
                                "",
                                {},
                                note="skipped (deadline)",
                            )
                        )
                        continue
                    rows += phase(settings, family, directory, device, dtype, deadline, log)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the phase's models are gone
    return rows


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


def to_markdown(
    rows: list[HFRow], title: str = "transformers (sdpa, metalm_span) vs native MetaLM"
) -> str:
    lines = [f"## {title}", ""]
    if any(row.device != "cuda" for row in rows):
        lines += ["CPU dry run (tiny sizes, fp32): plumbing only; these are not GPU figures.", ""]
    paths = list(dict.fromkeys(path for row in rows for path in row.values))
    lines += [
        "| config | quantity | unit | " + " | ".join(paths) + " | native vs sdpa | notes |",
        "|---|---|---|" + "---|" * len(paths) + "---|---|",
    ]
    for row in rows:
        values = " | ".join(_number(row.values.get(path)) for path in paths)
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(
            f"| {row.family} | {row.quantity} | {row.unit} | {values} | {ratio} | {row.note} |"
        )
    return "\n".join(lines)


def chart(rows: list[HFRow]):
    """One panel per quantity, the configs as cases, native as ours (benchmarks/charts.py)."""
    from benchmarks.charts import Panel

    panels = []
    for quantity in (TRAINING, MEMORY, GENERATION):
        measured = [row for row in rows if row.quantity == quantity and row.values]
        if not measured:
            continue
        paths = list(dict.fromkeys(path for row in measured for path in row.values))
        panels.append(
            Panel(
                f"hf: {quantity}",
                measured[0].unit,
                [row.family for row in measured],
                {path: [row.values.get(path) for row in measured] for path in paths},
                ours="native",
                lower_is_better=quantity == MEMORY,
            )
        )
    return panels
