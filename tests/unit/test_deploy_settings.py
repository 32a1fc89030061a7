"""Every engine-side setting of `specserve serve` has a Helm value and a compose value with the
code's default, and the images' entry point turns the tool-calling values into the vLLM flags that
`specserve serve` would give. The list of settings comes from the code (``engine.settings.SETTINGS``
and the serve parser's groups), so a new setting without deploy values fails here.

helm and docker compose come from scripts/install-tools.sh.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from specserve.cli import build_parser
from specserve.commands.serve import tool_options
from specserve.engine import settings
from specserve.engine.process import EngineSpec, engine_command
from specserve_vllm.spec_control.planner import CALIBRATION_ENV, POLICY_ENV, SERVED_POLICY
from support.helm_render import ENGINE, container, env_of, render, sets
from support.installed_tools import tool

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "helm" / "specserve" / "values.yaml").read_text())
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"

HELM_VALUE = {
    "json_mode": "engine.settings.jsonMode",
    "json_objects": "engine.settings.jsonObjects",
    "jump_forward": "engine.settings.jumpForward",
    "jump_forward_strings": "engine.settings.jumpForwardStrings",
    "heads_dir": "speculation.heads",
    "tree": "speculation.tree",
}
"""The Helm value of each field of ``EngineSettings``."""

FLAG_DEPLOY = {
    "--engine-spec-policy": ("speculation.enginePolicy", POLICY_ENV, SERVED_POLICY),
    "--calibration": ("speculation.calibration", CALIBRATION_ENV, ""),
    "--tool-call-parser": ("engine.tools.callParser", "SPECSERVE_TOOL_CALL_PARSER", ""),
    "--enable-auto-tool-choice": ("engine.tools.enableAutoToolChoice", "SPECSERVE_ENABLE_AUTO_TOOL_CHOICE", ""),
    "--tool-parser-plugin": ("engine.tools.parserPlugin", "SPECSERVE_TOOL_PARSER_PLUGIN", ""),
    "--chat-template": ("engine.tools.chatTemplate", "SPECSERVE_CHAT_TEMPLATE", ""),
}
"""Other `specserve serve` engine flags: Helm value, variable, default ("" = the code's own choice)."""


def value_at(path: str) -> Any:
    node: Any = VALUES
    for key in path.split("."):
        assert isinstance(node, dict) and key in node, f"values.yaml has no {path}"
        node = node[key]
    return node


def as_env(value: Any) -> str:
    """A values.yaml value as the chart writes it into the environment."""
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def expected() -> dict[str, str]:
    """Every deploy variable with the code's default ("" where the code's default is None)."""
    defaults = settings.to_environ(settings.EngineSettings())
    out = {s.env: defaults.get(s.env, "") for s in settings.SETTINGS}
    out.update({env: default for _, env, default in FLAG_DEPLOY.values()})
    return out


@pytest.fixture(scope="module")
def compose_engine_env() -> dict[str, str]:
    cmd = [*shlex.split(tool("compose")), "-f", str(ROOT / "deploy" / "docker-compose.yml"), "config"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT / "deploy",
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr
    env = yaml.safe_load(proc.stdout)["services"]["engine"].get("environment") or {}
    return {k: "" if v is None else str(v) for k, v in env.items()}


@pytest.fixture(scope="module")
def helm_engine_env() -> dict[str, str]:
    return {k: e.get("value", "") for k, e in env_of(container(render(), ENGINE)).items()}


def test_every_engine_setting_has_a_helm_value_with_the_codes_default() -> None:
    defaults = settings.to_environ(settings.EngineSettings())
    for setting in settings.SETTINGS:
        assert setting.field in HELM_VALUE, f"{setting.env} has no Helm value"
        value = value_at(HELM_VALUE[setting.field])
        assert as_env(value) == defaults.get(setting.env, ""), (setting.env, value)


def test_every_serve_engine_flag_has_a_deploy_value() -> None:
    """The speculation-control and tool-calling flags of `specserve serve` (the tool group whole)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    tools = next(g for g in serve._action_groups if g.title and g.title.startswith("tool calling"))
    flags = {a.option_strings[0] for a in tools._group_actions} | {"--engine-spec-policy", "--calibration"}
    assert flags == set(FLAG_DEPLOY)
    for action in serve._actions:
        if action.option_strings and action.option_strings[0] in FLAG_DEPLOY:
            assert action.default is None, action.option_strings  # "" in the deploy files = the code's
    for path, _, default in FLAG_DEPLOY.values():
        assert as_env(value_at(path)) == default, path


def test_compose_and_helm_give_the_engine_every_setting_with_the_codes_default(
    compose_engine_env: dict[str, str], helm_engine_env: dict[str, str]
) -> None:
    for name, default in expected().items():
        assert compose_engine_env.get(name) == default, ("compose", name, compose_engine_env.get(name))
        assert helm_engine_env.get(name) == default, ("helm", name, helm_engine_env.get(name))


def test_helm_values_reach_the_engine_environment() -> None:
    env = env_of(container(render(*sets(engine__settings__jsonObjects="open", engine__settings__jumpForward=False,
                                        speculation__enginePolicy="off", engine__tools__callParser="hermes",
                                        engine__tools__enableAutoToolChoice=False)), ENGINE))
    got = {k: env[k]["value"] for k in ("SPECSERVE_JSON_OBJECTS", "SPECSERVE_JUMP_FORWARD", POLICY_ENV,
                                         "SPECSERVE_TOOL_CALL_PARSER", "SPECSERVE_ENABLE_AUTO_TOOL_CHOICE")}
    assert got == {"SPECSERVE_JSON_OBJECTS": "open", "SPECSERVE_JUMP_FORWARD": "0", POLICY_ENV: "off",
                   "SPECSERVE_TOOL_CALL_PARSER": "hermes", "SPECSERVE_ENABLE_AUTO_TOOL_CHOICE": "0"}
    assert settings.load({k: v["value"] for k, v in env.items() if "value" in v}) == settings.EngineSettings(
        json_objects="open", jump_forward=False)


STUB = """#!/bin/sh
if [ "$1 $2" = "demo-model --print-path" ]; then echo /opt/demo; exit 0; fi
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$(basename "$0")" "$@"
"""
TOOL_FLAGS = ("--tool-call-parser", "--enable-auto-tool-choice", "--tool-parser-plugin", "--chat-template")


def tool_flags(argv: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for i, arg in enumerate(argv):
        if arg == "--enable-auto-tool-choice":
            out[arg] = True
        elif arg in TOOL_FLAGS:
            out[arg] = argv[i + 1]
    return out


CASES = [
    {},
    {"SPECSERVE_MODEL": "/models/m"},
    {"SPECSERVE_MODEL": "/models/m", "SPECSERVE_TOOL_CALL_PARSER": "hermes"},
    {"SPECSERVE_TOOL_CALL_PARSER": "none"},
    {"SPECSERVE_TOOL_CALL_PARSER": "none", "SPECSERVE_TOOL_PARSER_PLUGIN": "/p.py"},
    {"SPECSERVE_ENABLE_AUTO_TOOL_CHOICE": "0"},
    {"SPECSERVE_MODEL": "/models/m", "SPECSERVE_TOOL_CALL_PARSER": "mine", "SPECSERVE_TOOL_PARSER_PLUGIN": "/p.py",
     "SPECSERVE_ENABLE_AUTO_TOOL_CHOICE": "1", "SPECSERVE_CHAT_TEMPLATE": "/t.jinja"},
]


def entry_point(tmp_path: Path, mode: str, env: dict[str, str]) -> list[str]:
    """The command the images' entry point execs in ``mode``, with recording stubs for its programs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("specserve", "python", "vllm"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    proc = subprocess.run(["sh", str(ENTRYPOINT), mode], check=False, capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def with_unset(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the tool variables it does not set present and empty, as compose and Helm set them."""
    return {f: "" for f in ("SPECSERVE_TOOL_CALL_PARSER", "SPECSERVE_ENABLE_AUTO_TOOL_CHOICE",
                            "SPECSERVE_TOOL_PARSER_PLUGIN", "SPECSERVE_CHAT_TEMPLATE")} | env


@pytest.mark.parametrize("env", CASES, ids=[json.dumps(c, sort_keys=True) for c in CASES])
def test_entry_point_serve_mode_passes_the_tool_variables_as_serve_flags(tmp_path: Path, env: dict[str, str]) -> None:
    argv = entry_point(tmp_path, "serve", with_unset(env))
    assert argv[:2] == ["specserve", "serve"]
    args = build_parser().parse_args(argv[1:])
    full = with_unset(env)
    assert args.tool_call_parser == (full["SPECSERVE_TOOL_CALL_PARSER"] or None)
    assert args.enable_auto_tool_choice == {"": None, "0": False}.get(full["SPECSERVE_ENABLE_AUTO_TOOL_CHOICE"], True)
    assert args.tool_parser_plugin == (full["SPECSERVE_TOOL_PARSER_PLUGIN"] or None)
    assert args.chat_template == (full["SPECSERVE_CHAT_TEMPLATE"] or None)


@pytest.mark.parametrize("env", CASES, ids=[json.dumps(c, sort_keys=True) for c in CASES])
def test_entry_point_gives_the_engine_the_tool_flags_specserve_serve_gives(tmp_path: Path, env: dict[str, str]) -> None:
    full = with_unset(env)
    got = tool_flags(entry_point(tmp_path, "engine", full))
    auto = {"": None, "0": False}.get(full["SPECSERVE_ENABLE_AUTO_TOOL_CHOICE"], True)
    opts = tool_options(full["SPECSERVE_TOOL_CALL_PARSER"] or None, auto, full["SPECSERVE_TOOL_PARSER_PLUGIN"] or None,
                        is_demo="SPECSERVE_MODEL" not in env)
    spec = EngineSpec(model="m", port=1, served_model_name="m", tool_call_parser=opts.parser,
                      enable_auto_tool_choice=opts.auto, tool_parser_plugin=opts.plugin,
                      chat_template=full["SPECSERVE_CHAT_TEMPLATE"] or None)
    assert got == tool_flags(engine_command(spec)), env


def test_configuration_page_lists_every_deploy_value() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    pairs = [(s.env, HELM_VALUE[s.field]) for s in settings.SETTINGS if s.field in HELM_VALUE]
    pairs += [(env, path) for path, env, _ in FLAG_DEPLOY.values()]
    for env, path in pairs:
        rows = [line for line in page.splitlines() if f"`{env}`" in line and f"`{path}`" in line]
        assert rows, f"docs/configuration.md has no row naming both {env} and {path}"
