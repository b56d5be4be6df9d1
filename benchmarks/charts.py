"""The PNG chart beside every recorded benchmark table (benchmarks.common.write_result).

A chart is one or more panels; each panel is a grouped bar chart: one group
per case (a mask, a layer, a batch size), one bar per implementation, ours
first and in the same colour everywhere. The bar of ours carries its value, every
peer's bar the ratio that the tables state: how many times better ours is
(time or memory: peer / ours; throughput: ours / peer), so ">1x" always means
ours wins. A panel whose values span more than ``LOG_SPAN`` uses a log axis.

matplotlib is imported only when a chart is drawn, through its object API and
the Agg canvas (no pyplot, no display, no global backend switch), so a
headless machine writes the same file and importing the benchmarks stays cheap.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: values spanning more than this factor in one panel are drawn on a log axis
LOG_SPAN = 30.0
OURS_COLOUR = "#1f77b4"
PEER_COLOURS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f", "#e377c2")


@dataclass
class Panel:
    """One grouped bar chart.

    Attributes
    ----------
    title : str                 what the panel measures, e.g. "forward"
    unit : str                  the y-axis label with its unit, e.g. "time (ms)"
    cases : list[str]           one group of bars per case
    series : dict[str, list]    implementation -> one value per case (None: not measured)
    ours : str | None           the series the ratios compare against (None: no ratios,
                                the bars carry their values instead, e.g. losses)
    lower_is_better : bool      True for times and memory, False for throughput
    """

    title: str
    unit: str
    cases: list[str]
    series: dict[str, list[float | None]]
    ours: str | None = None
    lower_is_better: bool = True

    def __post_init__(self) -> None:
        for name, values in self.series.items():
            if len(values) != len(self.cases):
                raise ValueError(
                    f"series {name!r} has {len(values)} values for {len(self.cases)} cases"
                )
        if self.ours is not None and self.ours not in self.series:
            raise ValueError(f"ours={self.ours!r} is not one of the series {list(self.series)}")

    def ratio(self, name: str, case: int) -> float | None:
        """How many times better ours is than ``name`` on case ``case`` (>1: ours wins)."""
        ours, peer = self.series[self.ours][case], self.series[name][case]
        if ours is None or peer is None or ours <= 0 or peer <= 0:
            return None
        return peer / ours if self.lower_is_better else ours / peer


def _ordered(panel: Panel) -> list[str]:
    names = list(panel.series)
    if panel.ours is not None:
        names.remove(panel.ours)
        names.insert(0, panel.ours)
    return names


def _colours(names: Sequence[str], ours: str | None) -> dict[str, str]:
    peers = [name for name in names if name != ours]
    colours = {name: PEER_COLOURS[i % len(PEER_COLOURS)] for i, name in enumerate(peers)}
    if ours is not None:
        colours[ours] = OURS_COLOUR
    return colours


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e3 else f"{value:,.0f}"


def _draw_panel(axes, panel: Panel) -> None:
    names = _ordered(panel)
    colours = _colours(names, panel.ours)
    width = 0.8 / len(names)
    values = [v for name in names for v in panel.series[name] if v is not None and v > 0]
    log = bool(values) and max(values) / min(values) > LOG_SPAN
    if log:
        axes.set_yscale("log")
    for index, name in enumerate(names):
        offset = (index - (len(names) - 1) / 2) * width
        for case, value in enumerate(panel.series[name]):
            x = case + offset
            if value is None:
                axes.text(
                    x,
                    0.01,
                    "n/a",
                    transform=axes.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                    color="#555555",
                )
                continue
            shown = f"{name} (ours)" if name == panel.ours and "ours" not in name else name
            axes.bar(x, value, width * 0.92, color=colours[name], label=shown)
            if panel.ours is None or name == panel.ours:
                text = _label(value)  # ours carries its value, its peers the ratio
            else:
                ratio = panel.ratio(name, case)
                text = "" if ratio is None else f"{ratio:.2f}x"
            axes.annotate(
                text,
                (x, value),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if log else 0,
            )
    axes.set_xticks(range(len(panel.cases)))
    axes.set_xticklabels(
        panel.cases,
        fontsize=8,
        rotation=30 if len(panel.cases) > 6 else 0,
        ha="right" if len(panel.cases) > 6 else "center",
    )
    axes.set_ylabel(panel.unit + (", log scale" if log else ""))
    better = "lower is better" if panel.lower_is_better else "higher is better"
    axes.set_title(f"{panel.title} ({better})", fontsize=10)
    low, high = axes.get_ylim()
    axes.set_ylim(low, high * (3.0 if log else 1.15))  # room for the ratio labels
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")


def draw_chart(path: Path, title: str, panels: Sequence[Panel]) -> Path:
    """Write ``panels`` as one PNG at ``path``: the panels side by side (three per row)."""
    if not panels:
        raise ValueError("a chart needs at least one panel")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    widest = max(len(panel.cases) * max(len(panel.series), 1) for panel in panels)
    panel_width = min(max(4.5, 0.28 * widest + 2.0), 14.0 / columns if columns > 1 else 14.0)
    figure = Figure(figsize=(panel_width * columns, 4.2 * rows + 0.9), dpi=110)
    FigureCanvasAgg(figure)
    for index, panel in enumerate(panels):
        _draw_panel(figure.add_subplot(rows, columns, index + 1), panel)
    figure.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=11)
    if any(panel.ours is not None for panel in panels):
        figure.text(
            0.5,
            0.005,
            "Numbers over a peer's bar: how many times better ours is "
            "(time, memory: peer / ours; throughput: ours / peer); above 1x, ours wins.",
            ha="center",
            va="bottom",
            fontsize=8,
            color="#333333",
        )
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    figure.savefig(path, format="png")
    return path
