"""Imports inside functions (kept lazy so the CLI starts fast) name things that exist: a rename
that misses one fails here, not when a user first runs that command."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "server" / "specserve", ROOT / "plugins" / "specserve_vllm")


def _lazy_imports() -> list[tuple[str, int, str, str]]:
    """``(file, line, module, name)`` of every ``from specserve... import name`` inside a function."""
    found = []
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                            and node.module.split(".")[0] in ("specserve", "specserve_vllm")):
                        found += [(str(path.relative_to(ROOT)), node.lineno, node.module, a.name) for a in node.names]
    return found


LAZY = _lazy_imports()


def test_the_walk_finds_lazy_imports() -> None:
    assert any(m == "specserve.bench.drafters" and n == "held_out_prompts" for _, _, m, n in LAZY)
    assert len(LAZY) > 50


@pytest.mark.parametrize("module", sorted({m for _, _, m, _ in LAZY}))
def test_every_lazily_imported_name_exists(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [f"{f}:{line} {name}" for f, line, m, name in LAZY if m == module
               and not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None]
    assert not missing, f"{module} has no {missing}"
