"""The one chart writer of the GPU benchmark suites.

The GPU script installs nothing, and a missing plotting library must never
cost it its tables: without matplotlib (or with nothing to draw) the chart is
skipped with a note and the markdown and JSON are written as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The suites run as scripts from benchmarks/gpu: benchmarks.charts (Panel, draw_chart)
# is importable once the repository root is on the path.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))


def write_chart_or_note(path: Path, title: str, panels: Sequence) -> Path | None:
    """The PNG at ``path`` drawn by benchmarks/charts.py from ``panels``, or None with
    a printed note when there are no panels or matplotlib is missing."""
    if not panels:
        return None
    try:
        from benchmarks.charts import draw_chart

        return draw_chart(path, title, panels)
    except ImportError as error:  # draw_chart imports matplotlib when it draws
        print(f"no chart: {error}")
        return None
