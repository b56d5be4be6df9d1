"""Command line: ``python -m metalm_fast <command>`` or ``metalm-fast <command>``.

Commands
--------
demo            the main job: train the tiny MetaLM on the embedded data, show it learn,
                answer questions about held-out digits, accuracy, end-to-end throughput
train           train a MetaLM (one process, or torchrun with --parallel ddp|fsdp)
generate        prompt text and optional images to text, through the paged KV cache
eval            digit VQA accuracy against chance: zero-shot, k-shot, finetuned
bench           every CPU benchmark table (ops and end to end) from one command
info            versions and which backends can run here, with the reason when not
gpu-readiness   ahead-of-time compile report of every shipped Triton kernel (no GPU needed)

``train`` and ``gpu-readiness`` parse their own options (see ``<command> --help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from metalm_fast.ops._backend import unavailable_reason

#: commands that own their argument parser: name -> module with main(argv) -> int
PASS_THROUGH = {
    "train": "metalm_fast.training.command",
    "gpu-readiness": "metalm_fast.tools.gpu_readiness",
}
#: commands parsed here: name -> (module with add_arguments(parser) and main(args), help)
COMMANDS = {
    "demo": ("metalm_fast.commands.demo", "the main job (train tiny, answer, evaluate, measure)"),
    "generate": ("metalm_fast.commands.generate", "prompts (+ images) to text, paged KV cache"),
    "eval": ("metalm_fast.commands.evaluate", "digit VQA accuracy: zero-shot, k-shot, finetuned"),
    "bench": ("metalm_fast.commands.bench", "every CPU benchmark table from one command"),
    "export": ("metalm_fast.commands.export", "a run out to transformers (and vLLM), or whole"),
}


def _info() -> int:
    import metalm_fast

    print(f"metalm-fast {metalm_fast.__version__}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in ("triton", "cuda", "cpu", "reference"):
            reason = unavailable_reason(backend, device)
            print(f"  {device.type:5s} {backend:10s} {'available' if reason is None else reason}")
    return 0


def build_parser(load: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the commands named in ``load`` get their full options.

    Commands load lazily (only the one being run), so that ``info`` works even
    where another command's dependency is missing; ``load=list(COMMANDS)``
    builds every option (the tests walk it to check each has help text).
    """
    load = load or []
    parser = argparse.ArgumentParser(prog="metalm-fast", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="command",
        help="one of the commands below; `<command> --help`",
    )
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module_name)
        if name in load:
            importlib.import_module(module_name).add_arguments(sub)
    commands.add_parser("info", help="versions and available backends")
    for name in PASS_THROUGH:
        commands.add_parser(name, help=f"see `metalm-fast {name} --help`")
    return parser


#: what a command raises when the user's input is wrong (a value, a path, a file):
#: ValueError (CheckpointError among them) and OSError (missing, unreadable, not a
#: directory). Anything else is a bug, and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line: its lines joined by "; ".

    >>> one_line(ValueError("no checkpoint at x\\n  expected a pointer"))
    'no checkpoint at x; expected a pointer'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input prints ``metalm-fast <command>: error: ...`` (one
    line, naming the argument) and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in PASS_THROUGH:
        # argparse.REMAINDER would drop leading "--" options, so these bypass the parser.
        return importlib.import_module(PASS_THROUGH[argv[0]]).main(argv[1:])
    args = build_parser(load=argv[:1]).parse_args(argv)
    if args.command == "info":
        return _info()
    try:
        return importlib.import_module(args.module).main(args)
    except USER_ERRORS as error:
        print(f"metalm-fast {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
