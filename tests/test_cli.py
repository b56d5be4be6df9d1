"""The command line: `python -m metalm_fast info` and the gpu-readiness pass-through."""

import pytest

from metalm_fast.cli import main


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for backend in ("triton", "cuda", "cpu", "reference"):
        assert backend in out


def test_gpu_readiness_options_reach_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu-readiness", "--help"])
    assert exit_info.value.code == 0
    assert "--ops" in capsys.readouterr().out
