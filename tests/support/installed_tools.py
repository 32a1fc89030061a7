"""Command lines of the tools ``scripts/install-tools.sh`` installs (helm, prometheus, compose...).

The script is idempotent and prints ``name=command`` lines; it runs once per test process.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@cache
def installed_tools() -> dict[str, str]:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install-tools.sh")], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def tool(name: str) -> str:
    """Command of one installed tool (installs the tools when missing)."""
    return installed_tools()[name]
