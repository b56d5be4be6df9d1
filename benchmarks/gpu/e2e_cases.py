"""GPU end-to-end throughput: one MetaLM, its fast path against an HF-style path.

The GPU counterpart of benchmarks/bench_end_to_end.py: the same model object
and weights run two ways in one process, ``fast`` (MetaLM.forward with the
triton backend, metalm_fast.models.generation.generate with the paged KV
cache) and ``hf_style`` (benchmarks/hf_style.py: F.embedding + masked_scatter,
dense [1, 1, T, T] boolean masks and SDPA, spans padded into an [S, Lmax]
encoder batch; generation over a left-padded batch with a torch.cat KV cache).

Entry point for benchmarks/gpu/run_gpu_benchmarks.py (shares its deadline)::

    rows = e2e_cases.run(deadline, device="cuda", dtype=torch.bfloat16)
    text = e2e_cases.to_markdown(rows)

Sizes (bf16 weights and activations, AdamW in the weights' dtype, fp32 rotary
frequencies): the
paper_language widths (vocab 64000, decoder 2048 wide with 32 heads, text
encoder 1024 wide with 16 heads) with 8 + 8 layers instead of 24 + 24 to fit a
few-minute run. Training: packed semi-causal micro-batches of at most 16384
tokens (documents of 200..2000 tokens, log-uniform; spans 64..128, ~25%),
forward + backward + AdamW, one warm-up step per path (Triton compiles land
there), then 3 alternating timed steps; tokens/s from the median step time
(perf_counter around a synchronised step). Peak memory: torch.cuda
max_memory_allocated over one step, minus what is allocated before it
(weights, AdamW state, the batch). Generation: 32 prompts of 200..1000 tokens,
128 new tokens each, greedy, after a warm-up run; new tokens/s including
prefill, and whether both paths produce the same tokens.

The dry run (device="cpu") runs the tiny preset at tiny sizes in fp32 to prove
the plumbing; its rows are marked as CPU dry-run figures, never GPU ones, and
memory is not measured there.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # benchmarks.* from the source tree, however this is loaded
    sys.path.insert(0, str(REPO_ROOT))

PATHS = ("fast", "hf_style")


@dataclasses.dataclass
class E2ERow:
    device: str
    quantity: str
    unit: str
    fast: float | None = None
    hf_style: float | None = None
    ratio: float | None = None  # the fast path's advantage (> 1: fast is better)
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str
    layers: int | None  # decoder and encoder layers (None: the preset's)
    token_budget: int
    micro_batches: int
    repeats: int
    prompts: int
    prompt_min: int
    prompt_max: int
    new_tokens: int
    gen_repeats: int


GPU_SIZES = Sizes("paper_language", 8, 16384, 3, 3, 32, 200, 1000, 128, 2)
DRY_RUN_SIZES = Sizes("tiny", None, 1024, 1, 1, 4, 20, 60, 4, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _to_device(batch, device: torch.device):
    moved = {field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)}
    return dataclasses.replace(
        batch,
        **{
            name: value.to(device)
            for name, value in moved.items()
            if isinstance(value, torch.Tensor)
        },
    )


def _model(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from metalm_fast.models import PRESETS, MetaLM

    config = PRESETS[sizes.preset]
    if sizes.layers is not None:
        config = dataclasses.replace(
            config, decoder_layers=sizes.layers, encoder_layers=sizes.layers
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = MetaLM(config)
    # Parameters in ``dtype``; buffers (rotary inv_freq) stay fp32, as both paths expect.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to(dtype)
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    return model, config


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    begin = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - begin


def _training(model, sizes: Sizes, device, rows, deadline, log) -> None:
    from benchmarks.bench_end_to_end import Settings, loss_fn, train_step, training_batches

    settings = Settings(token_budget=sizes.token_budget, micro_batches=sizes.micro_batches)
    batches = [
        _to_device(batch, device) for batch in training_batches(settings, model.config.vocab_size)
    ]
    tokens = [batch.input_ids.numel() for batch in batches]
    with torch.no_grad():
        losses = {path: float(loss_fn(path)(model, batches[0])) for path in PATHS}
    log(f"  e2e training: micro-batches of {tokens} tokens, losses {losses}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for path in PATHS:  # warm-up: Triton compiles, AdamW state
        train_step(model, optimizer, path, batches[0])
    rates: dict[str, list[float]] = {path: [] for path in PATHS}
    for index in range(sizes.repeats):
        if deadline is not None and not deadline.has_room():
            log("  e2e training: deadline, stopping early")
            break
        batch = batches[index % len(batches)]
        for path in PATHS if index % 2 == 0 else PATHS[::-1]:
            elapsed = _timed(lambda p=path, b=batch: train_step(model, optimizer, p, b), device)
            rates[path].append(batch.input_ids.numel() / elapsed)
    if all(rates.values()):
        fast, hf = (statistics.median(rates[path]) for path in PATHS)
        relative = abs(losses["fast"] - losses["hf_style"]) / abs(losses["fast"])
        rows.append(
            E2ERow(
                device.type,
                "training (fwd+bwd+AdamW)",
                "tokens/s",
                fast,
                hf,
                fast / hf,
                f"{len(rates['fast'])} steps per path, micro-batches of "
                f"{min(tokens)}..{max(tokens)} tokens; loss abs(fast - hf) / fast = "
                f"{relative:.1e}",
            )
        )
        log(f"  e2e training: fast {fast:,.0f} tok/s, hf_style {hf:,.0f} tok/s")
    if device.type != "cuda":
        rows.append(
            E2ERow(
                device.type,
                "training peak memory (one step)",
                "MiB",
                note="not measured on the CPU dry run",
            )
        )
        return
    peaks = {}
    for path in PATHS:
        if deadline is not None and not deadline.has_room():
            return
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        train_step(model, optimizer, path, batches[0])
        torch.cuda.synchronize()
        peaks[path] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    rows.append(
        E2ERow(
            device.type,
            "training peak memory (one step)",
            "MiB over baseline",
            peaks["fast"],
            peaks["hf_style"],
            peaks["hf_style"] / peaks["fast"],
            "max_memory_allocated - memory_allocated before the step",
        )
    )


def _generation(model, sizes: Sizes, device, rows, deadline, log) -> None:
    from benchmarks.bench_end_to_end import Settings, prompt_batch
    from benchmarks.hf_style import hf_style_generate
    from metalm_fast.data.collator import build_batch
    from metalm_fast.models.generation import generate

    settings = Settings(
        prompts=sizes.prompts, prompt_min=sizes.prompt_min, prompt_max=sizes.prompt_max
    )
    prompts = prompt_batch(settings, model.config.vocab_size)
    packed = _to_device(build_batch(prompts, [], []), device)
    runners = {
        "fast": lambda: generate(model, packed, max_new_tokens=sizes.new_tokens),
        "hf_style": lambda: hf_style_generate(model, prompts, max_new_tokens=sizes.new_tokens),
    }
    model.eval()
    outputs = {path: runner() for path, runner in runners.items()}  # warm-up, tokens to compare
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    for index in range(sizes.gen_repeats):
        if deadline is not None and not deadline.has_room():
            log("  e2e generation: deadline, stopping early")
            break
        for path in PATHS if index % 2 == 0 else PATHS[::-1]:
            seconds[path].append(_timed(runners[path], device))
    model.train()
    same = outputs["fast"] == outputs["hf_style"]
    if all(seconds.values()):
        new = sizes.prompts * sizes.new_tokens
        fast, hf = (new / statistics.median(seconds[path]) for path in PATHS)
        rows.append(
            E2ERow(
                device.type,
                "generation (incl. prefill)",
                "new tokens/s",
                fast,
                hf,
                fast / hf,
                f"{sizes.prompts} prompts of {sizes.prompt_min}.."
                f"{sizes.prompt_max} tokens, {sizes.new_tokens} new, greedy; "
                f"{'same tokens' if same else 'TOKENS DIFFER'}",
            )
        )
        log(f"  e2e generation: fast {fast:,.0f} tok/s, hf_style {hf:,.0f} tok/s, same: {same}")


def run(
    deadline=None, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, log=print
) -> list[E2ERow]:
    """Training and generation rows; a CPU device is the dry run (tiny preset, fp32)."""
    device = torch.device(device)
    sizes = GPU_SIZES if device.type == "cuda" else DRY_RUN_SIZES
    if device.type != "cuda":
        dtype = torch.float32
    model, config = _model(sizes, device, dtype)
    log(
        f"  e2e: preset {sizes.preset} (decoder {config.decoder_layers}x{config.decoder_dim}, "
        f"encoder {config.encoder_layers}x{config.encoder_dim}, vocab {config.vocab_size}), "
        f"{str(dtype).replace('torch.', '')} on {device}"
    )
    rows: list[E2ERow] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for phase in (_training, _generation):
            if deadline is not None and not deadline.has_room():
                log(f"  e2e {phase.__name__[1:]}: skipped (deadline)")
                rows.append(E2ERow(device.type, phase.__name__[1:], "", note="skipped (deadline)"))
                continue
            phase(model, sizes, device, rows, deadline, log)
    return rows


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def to_markdown(rows: list[E2ERow], title: str = "End-to-end MetaLM: fast path vs HF-style") -> str:
    lines = [f"## {title}", ""]
    if any(row.device != "cuda" for row in rows):
        lines += ["CPU dry run (tiny preset, fp32): plumbing only; these are not GPU figures.", ""]
    lines += [
        "| quantity | unit | fast | hf_style | fast vs hf_style | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(
            f"| {row.quantity} | {row.unit} | {_number(row.fast)} | "
            f"{_number(row.hf_style)} | {ratio} | {row.note} |"
        )
    return "\n".join(lines)
