"""The docstring examples (``>>>``) of every module of the package run as tests.

Every module of ``metalm_fast`` and of ``metalm_fast.kernels`` (kernels/, installed
under that name by setup.py's package_dir) whose source holds an example is one
test, so ``python -m pytest`` runs the examples a reader copies, under the same
names the installed package gives them (so a kernel module is imported once, as
the ops layer imports it). tests/conftest.py has already set TRITON_INTERPRET
where there is no GPU, before any kernel module is imported here.

Each module's examples run in a fresh temporary directory (an example may write
a file), with METALM_FAST_CACHE there too (a tokenizer an example trains never
lands in the user's cache), with ELLIPSIS and NORMALIZE_WHITESPACE, as ``python -m doctest`` would
with those flags. A failure prints doctest's own report: the example, what it
expected and what it got.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

PACKAGES = ("metalm_fast", "metalm_fast.kernels")
#: modules not imported here, and why
NOT_IMPORTED = {"metalm_fast.__main__": "importing it runs the command line"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    """Every module of PACKAGES whose source contains a ``>>>`` example, sorted."""
    names = set()
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.add(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            names.add(info.name)
    found = []
    for name in sorted(names - set(NOT_IMPORTED)):
        origin = importlib.util.find_spec(name).origin
        if origin and origin.endswith(".py") and ">>>" in Path(origin).read_text():
            found.append(name)
    return found


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    """The discovery above sees both packages (a broken walk would pass vacuously)."""
    assert "metalm_fast.masks" in MODULES
    assert any(name.startswith("metalm_fast.kernels.") for name in MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METALM_FAST_CACHE", str(tmp_path / "cache"))
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    tests = [test for test in tests if test.examples]
    assert tests, f"{module_name} has '>>>' in its source but no docstring example"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    if result.failed:
        pytest.fail(
            f"{result.failed} of {result.attempted} examples failed in "
            f"{module_name}:\n{''.join(report)}",
            pytrace=False,
        )
