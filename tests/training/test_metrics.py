"""metrics.jsonl and loss.png in the run directory: fresh runs, resumed runs, no matplotlib."""

import sys

import pytest

from metalm_fast.training.metrics import MetricsLog, plot_loss_curve, read_metrics


def _record(step):
    return {
        "step": step,
        "loss": 7.0 - step,
        "lr": 1e-3,
        "tokens_per_second": 1e3,
        "tokens": 256 * step,
    }


def test_a_fresh_log_replaces_an_old_file(tmp_path):
    for steps in (range(1, 4), range(1, 3)):
        log = MetricsLog(tmp_path)
        for step in steps:
            log(_record(step))
        log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_resumed_log_keeps_records_up_to_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):  # interrupted after step 5, last checkpoint at step 3
        log(_record(step))
    log.close()
    log = MetricsLog(tmp_path, resume_step=3)
    log(_record(4))
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_record_without_a_field_is_refused(tmp_path):
    log = MetricsLog(tmp_path)
    with pytest.raises(ValueError, match="missing \\['lr'"):
        log({"step": 1, "loss": 1.0})
    log.close()


def test_the_loss_curve_is_a_png(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 4):
        log(_record(step))
    log.close()
    png = plot_loss_curve(log.path, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_message_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
