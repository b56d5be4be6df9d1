"""Stopping a run cleanly on SIGINT or SIGTERM: finish the step, save, exit 130 or 143.

While :class:`StopRequest` is entered (the training loop), SIGINT (Ctrl-C)
and SIGTERM (``kill``, a scheduler's pre-emption, torchrun passing on its own
signal) only set a flag. The loop reads it at the end of every step; under
torchrun the ranks agree on it (an all-reduce of the flag, so a signal to any
rank stops every rank after the same step), save a checkpoint at that step
and raise :class:`TrainingInterrupted`. The command turns that into the
shell's usual status for the signal: 128 + its number, 130 for SIGINT (as an
uncaught KeyboardInterrupt) and 143 for SIGTERM.

A second signal while the step finishes raises KeyboardInterrupt at once: the
way out of a step that does not end.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

__all__ = ["STOP_SIGNALS", "StopRequest", "TrainingInterrupted"]

#: the signals that stop a run after its current step, with a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after step ``step``, its checkpoint saved.

    A KeyboardInterrupt, so ``except Exception`` does not swallow it.
    ``checkpoint`` is the saved directory (None without ``out_dir``);
    ``exit_status`` is 128 + the signal number (130 SIGINT, 143 SIGTERM).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        saved = (
            f"checkpoint {checkpoint}" if checkpoint is not None else "no out_dir, nothing saved"
        )
        super().__init__(
            f"stopped by {signal.Signals(self.signum).name} after step {step}: {saved}"
        )

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Inside ``with StopRequest() as stop``, SIGINT and SIGTERM set ``stop.signum``.

    Outside the main thread Python cannot install signal handlers: there the
    signals keep their usual effect and ``signum`` stays 0.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting the step")
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
            f"(send it again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
