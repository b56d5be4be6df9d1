"""The recorded-result writer: every markdown table gets a valid PNG chart beside it."""

from __future__ import annotations

import struct

import pytest

pytest.importorskip("matplotlib")

from benchmarks import bench_decode, bench_embed_scatter, bench_span_attention  # noqa: E402
from benchmarks.charts import Panel  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _assert_chart(path, min_bytes: int = 10_000) -> None:
    assert path.exists(), f"no chart at {path}"
    width, height = _png_size(path)
    assert width >= 400 and height >= 300
    assert path.stat().st_size >= min_bytes  # bars, labels and text, not an empty canvas


def test_write_result_writes_a_png_beside_the_markdown(tmp_path, capsys):
    panels = [
        Panel(
            "forward",
            "time (ms)",
            ["encoder", "decoder"],
            {"ours": [1.0, 2.0], "peer": [2.5, 3.0]},
            ours="ours",
        ),
        Panel(
            "throughput",
            "tokens/s",
            ["8 prompts"],
            {"ours": [900.0], "peer": [300.0]},
            ours="ours",
            lower_is_better=False,
        ),
    ]
    markdown = write_result(
        "bench_x",
        "A title",
        "| a |\n|---|\n| 1 |",
        "python bench.py",
        path=tmp_path / "bench_x.md",
        chart=panels,
    )
    assert markdown.read_text().startswith("# A title\n")
    _assert_chart(tmp_path / "bench_x.png")
    assert "bench_x.png" in capsys.readouterr().out


def test_chart_handles_missing_values_a_log_axis_and_no_baseline(tmp_path):
    panels = [
        Panel(
            "wide range",
            "time (ms)",
            ["a", "b", "c"],
            {"ours": [0.1, 0.2, None], "dense": [50.0, None, 80.0]},
            ours="ours",
        ),
        Panel("losses", "loss", ["1-10", "11-20"], {"x": [3.1, 2.2], "y": [3.0, 2.1]}),
    ]
    write_result("t", "t", "body", "cmd", path=tmp_path / "t.md", chart=panels)
    _assert_chart(tmp_path / "t.png")


def test_ratio_says_how_many_times_better_ours_is():
    time = Panel("t", "ms", ["c"], {"ours": [2.0], "peer": [6.0]}, ours="ours")
    rate = Panel(
        "r", "tokens/s", ["c"], {"ours": [6.0], "peer": [2.0]}, ours="ours", lower_is_better=False
    )
    assert time.ratio("peer", 0) == pytest.approx(3.0)
    assert rate.ratio("peer", 0) == pytest.approx(3.0)


def test_panel_rejects_inconsistent_data(tmp_path):
    with pytest.raises(ValueError, match="2 values for 1 cases"):
        Panel("t", "ms", ["c"], {"ours": [1.0, 2.0]})
    with pytest.raises(ValueError, match="not one of the series"):
        Panel("t", "ms", ["c"], {"peer": [1.0]}, ours="ours")
    with pytest.raises(ValueError, match="needs the chart"):
        write_result("t", "t", "body", "cmd", path=tmp_path / "t.md", chart=[])
    assert not (tmp_path / "t.md").exists()


def test_each_benchmark_builds_its_chart_from_its_measurements(tmp_path):
    """The chart builders of the benchmarks, fed measurements shaped as they record them."""
    rows = [
        bench_span_attention.Row(case=case, impl=impl, fwd_ms=1.0 + i, fb_ms=None if i else 3.0)
        for case in ("encoder", "decoder")
        for i, impl in enumerate(("cpu", "flex"))
    ]
    decode = {"seconds": {"ours": 0.001, "gather+sdpa": 0.002, "sdpa contiguous": 0.0009}}
    generation = {"cached": {"seconds": 0.5}, "recompute": {"seconds": 4.0}}
    times = {
        path: {"fwd_ms": 1.0 + i, "fwd_bwd_ms": 3.0 + i}
        for i, path in enumerate(bench_embed_scatter.PATHS)
    }
    peaks = {path: 100.0 + 50 * i for i, path in enumerate(bench_embed_scatter.PATHS)}
    charts = {
        "span": bench_span_attention.chart(rows),
        "decode": bench_decode.chart(decode, generation, bench_decode.GenerationSizes()),
        "embed": bench_embed_scatter.chart(times, peaks),
    }
    for name, panels in charts.items():
        assert all(panel.ours is not None for panel in panels)
        write_result(name, name, "body", "cmd", path=tmp_path / f"{name}.md", chart=panels)
        _assert_chart(tmp_path / f"{name}.png")


def _gpu_chart_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "gpu_chart.py"
    spec = importlib.util.spec_from_file_location("gpu_chart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_chart_draws_and_steps_aside_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The GPU script's one chart writer: a PNG from panels; None (no file) for no
    panels; and None with a note, never an exception, when matplotlib cannot import,
    so the GPU run keeps its tables."""
    gpu_chart = _gpu_chart_module()
    panels = [Panel("decode", "GB/s", ["B=8"], {"ours": [900.0], "peer": [600.0]}, ours="ours")]
    drawn = gpu_chart.write_chart_or_note(tmp_path / "gpu.png", "GPU", panels)
    assert drawn == tmp_path / "gpu.png"
    _assert_chart(drawn, min_bytes=5_000)
    assert gpu_chart.write_chart_or_note(tmp_path / "none.png", "GPU", []) is None
    assert not (tmp_path / "none.png").exists()
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import fails
    missing = gpu_chart.write_chart_or_note(tmp_path / "missing.png", "GPU", panels)
    assert missing is None and not (tmp_path / "missing.png").exists()
    assert "no chart:" in capsys.readouterr().out
