"""A run's metrics in its directory: JSON lines per step and a loss-curve PNG.

Layout (beside the checkpoints of :mod:`metalm_fast.training.checkpoint`)::

    <out_dir>/metrics.jsonl   one object per step: step, loss, lr, tokens_per_second, tokens
    <out_dir>/loss.png        the loss against the step (matplotlib, Agg backend)

A fresh run starts ``metrics.jsonl`` anew; a resumed run keeps the records up
to the step it resumes from (a run interrupted after its last checkpoint left
records past it, which the resumed run recomputes) and appends, so the file
and the curve cover the whole run. ``tokens`` and ``tokens_per_second`` count
from the start of the call that logged them.

matplotlib is imported only when a curve is drawn; without it
:func:`plot_loss_curve` raises ImportError saying how to install it.

Example
-------
>>> import tempfile
>>> run = tempfile.mkdtemp()
>>> log = MetricsLog(run)
>>> log({"step": 1, "loss": 6.9, "lr": 1e-3, "tokens_per_second": 1e4, "tokens": 512})
>>> log.close()
>>> [record["loss"] for record in read_metrics(log.path)]
[6.9]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["LOSS_PLOT_FILE", "METRICS_FILE", "MetricsLog", "plot_loss_curve", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
#: the keys of every record, in the order they are written
FIELDS = ("step", "loss", "lr", "tokens_per_second", "tokens")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class MetricsLog:
    """Appends one JSON line per step to ``<out_dir>/metrics.jsonl`` (flushed every line).

    ``resume_step=None`` starts the file anew; an int keeps the existing
    records with ``step <= resume_step`` and appends after them.
    """

    def __init__(self, out_dir: str | os.PathLike, *, resume_step: int | None = None):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        self._file = self.path.open("w")
        for record in kept:
            self._write(record)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps({key: record[key] for key in FIELDS}) + "\n")
        self._file.flush()

    def __call__(self, record: dict) -> None:
        missing = [key for key in FIELDS if key not in record]
        if missing:
            raise ValueError(f"record is missing {missing}; a record holds {FIELDS}")
        self._write(record)

    def close(self) -> None:
        self._file.close()


def plot_loss_curve(
    metrics_path: str | os.PathLike, png_path: str | os.PathLike, *, title: str = "training loss"
) -> Path:
    """Draw the loss of every record of ``metrics_path`` against its step into ``png_path``."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            f"drawing {png_path} needs matplotlib, which is not installed: pip install matplotlib"
        ) from error
    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        axes.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1)
        axes.set_xlabel("step")
        axes.set_ylabel("loss (nats per scored token)")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(png_path)
    finally:
        plt.close(figure)
    return Path(png_path)
