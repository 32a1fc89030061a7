"""Every ``from specserve... import name`` in both packages names something that exists.

Many imports sit inside functions (commands and benchmarks import vLLM only when they run), so a
renamed or moved name breaks them only when that command runs. This reads every module's syntax
tree, finds each import of a project module (at any depth), and checks the name is there.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"specserve": ROOT / "server" / "specserve", "specserve_vllm": ROOT / "plugins" / "specserve_vllm"}


def _project_imports() -> list[tuple[str, int, str, str]]:
    """``(file, line, module, name)`` of every ``from <project module> import name``."""
    found = []
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                        node.module.split(".")[0] in PACKAGES):
                    for alias in node.names:
                        if alias.name != "*":
                            found.append((str(path.relative_to(ROOT)), node.lineno, node.module, alias.name))
    return found


IMPORTS = _project_imports()


def test_the_walk_finds_the_lazy_imports() -> None:
    """Guards the walk itself: imports inside functions are found too."""
    calibrate = [(m, n) for f, _, m, n in IMPORTS if f.endswith("commands/calibrate.py")]
    assert ("specserve.engine.local", "local_llm") in calibrate


@pytest.mark.parametrize("module", sorted({m for _, _, m, _ in IMPORTS}))
def test_every_imported_name_exists(module: str) -> None:
    loaded = importlib.import_module(module)
    missing = []
    for file, line, mod, name in IMPORTS:
        if mod != module or hasattr(loaded, name):
            continue
        try:  # a submodule: ``from specserve.gateway import app``
            importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError:
            missing.append(f"{file}:{line}: from {module} import {name}")
    assert not missing, "names that do not exist:\n" + "\n".join(missing)
