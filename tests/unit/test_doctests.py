"""Every module's doctests, collected once by walking both packages."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import specserve
import specserve_vllm


def _modules() -> list[str]:
    names = []
    for package in (specserve, specserve_vllm):
        names.append(package.__name__)
        prefix = package.__name__ + "."
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix)]
    return sorted(names)


MODULES = _modules()


def test_the_walk_finds_both_packages() -> None:
    assert "specserve.gateway.goodput" in MODULES
    assert "specserve_vllm.compat.jump_forward" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    if ">>>" in Path(str(module.__file__)).read_text():
        assert result.attempted > 0, f"{name} has examples that doctest does not find"
