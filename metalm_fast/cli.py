"""Command line: ``python -m metalm_fast <command>`` or ``metalm-fast <command>``.

Commands
--------
info            versions and which backends can run here, with the reason when not
gpu-readiness   ahead-of-time compile report of every shipped Triton kernel (no GPU needed)
"""

from __future__ import annotations

import argparse
import sys

import torch

from metalm_fast.ops._backend import unavailable_reason


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-readiness"]:
        # The tool parses its own options (argparse.REMAINDER drops leading "--" options).
        from metalm_fast.tools import gpu_readiness

        return gpu_readiness.main(argv[1:])
    parser = argparse.ArgumentParser(prog="metalm-fast", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and available backends")
    commands.add_parser(
        "gpu-readiness", help="AOT compile report (sm_80, sm_90); options as the tool's --help"
    )
    parser.parse_args(argv)
    return _info()


if __name__ == "__main__":
    sys.exit(main())
