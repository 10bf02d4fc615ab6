"""Every ``Examples`` section in the package's docstrings runs, and prints what it shows; no
source holds a control character."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import freshrec

ROOMS = ("models", "store", "streams", "serving", "evaluation", "bench", "devenv")


def _modules() -> list[str]:
    """The top package's own modules and every room's (rooms live in folders of their own)."""
    names = [info.name for info in pkgutil.iter_modules(freshrec.__path__, prefix="freshrec.")]
    for room in ROOMS:
        package = importlib.import_module(f"freshrec.{room}")
        names += [
            info.name for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}.")
        ]
    return sorted(name for name in names if not name.endswith("__main__"))


def _with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    out = []
    for name in _modules():
        if any(test.examples for test in finder.find(importlib.import_module(name))):
            out.append(name)
    return out


@pytest.mark.parametrize("module", _with_examples())
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"


def test_no_source_holds_a_control_character() -> None:
    """A backslash escape in a docstring that is not raw (``\\tau``, ``\\frac``) turns into a
    tab or a form feed, which renders as neither the formula nor an error."""
    found = []
    for name in _modules():
        source = inspect.getsource(importlib.import_module(name))
        for number, line in enumerate(source.split("\n"), 1):  # splitlines() splits at \f
            if any(ord(char) < 32 for char in line):
                found.append(f"{name}:{number}: {line.strip()[:60]!r}")
    assert not found, found
