"""docs/configuration.md lists every flag and variable in the code, with the code's defaults."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from specserve.cli import build_parser
from specserve.engine import settings

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "configuration.md").read_text()


def _options(command: str) -> list[argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]


def _row(flag: str) -> str:
    rows = [line for line in PAGE.splitlines() if line.startswith(f"| `{flag}")]
    assert rows, f"{flag} is not in docs/configuration.md"
    return rows[0]


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_every_flag_is_listed_with_its_default(command: str) -> None:
    for action in _options(command):
        row = _row(action.option_strings[0])
        for other in action.option_strings[1:]:
            assert f"`{other}" in row, f"{other} is not in the row of {action.option_strings[0]}"
        if isinstance(action.default, (int, float, str)) and not isinstance(action.default, bool):
            assert f"`{action.default}`" in row, (
                f"{action.option_strings[0]}: the code's default is {action.default!r}")


def test_every_engine_setting_is_listed_with_its_default() -> None:
    defaults = settings.to_environ(settings.EngineSettings())
    for setting in settings.SETTINGS:
        row = _row(setting.env)
        if setting.env in defaults:
            assert f"`{defaults[setting.env]}`" in row, setting.env
        flag = next((a for a in _options("serve") if a.option_strings[0] == setting.flag), None)
        assert flag is not None, f"{setting.env} has no specserve serve flag"


def test_every_variable_in_the_code_is_listed() -> None:
    names = set()
    for package in ("server", "plugins"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"SPECSERVE_[A-Z_]+[A-Z]", path.read_text()))
    assert names
    missing = sorted(n for n in names if f"`{n}`" not in PAGE)
    assert not missing, missing


def test_gateway_flag_defaults_are_the_config_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset flags give GatewayConfig's own defaults: the gateway's defaults are written once."""
    from specserve.commands.gateway import gateway_config
    from specserve.gateway.config import GatewayConfig

    for name in ("SPECSERVE_API_KEYS", "SPECSERVE_ENGINE_API_KEY", "SPECSERVE_SPEC_POLICY",
                 "SPECSERVE_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["gateway", "--replica", "http://127.0.0.1:1"])
    built = gateway_config(args, args.replica).model_dump()
    plain = GatewayConfig(replicas=args.replica).model_dump()
    assert {k: built[k] for k in plain if built[k] != plain[k]} == {}
