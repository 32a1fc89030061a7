"""Engine settings: parsed from the environment, set by `specserve serve` flags, overridden in a block."""

from __future__ import annotations

import logging
import os

import pytest

from specserve.cli import build_parser
from specserve.engine import settings
from specserve.engine.settings import EngineSettings


def test_values_are_parsed_and_bad_ones_keep_the_default(caplog: pytest.LogCaptureFixture) -> None:
    assert settings.load({}) == EngineSettings()
    assert settings.load({"SPECSERVE_JUMP_FORWARD_STRINGS": "no", "SPECSERVE_HEADS_DIR": "/h"}) == (
        EngineSettings(jump_forward_strings=False, heads_dir="/h"))
    with caplog.at_level(logging.WARNING):
        assert settings.load({"SPECSERVE_JSON_MODE": "loose"}).json_mode == "schema"
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    assert {"variable": "SPECSERVE_JSON_MODE"}.items() <= fields[-1].items()


def test_serve_flags_set_the_engine_environment() -> None:
    args = build_parser().parse_args(["serve", "--no-jump-forward", "--json-mode", "strict"])
    assert settings.environ_from_flags(args) == {"SPECSERVE_JSON_MODE": "strict",
                                                 "SPECSERVE_JUMP_FORWARD": "0"}
    assert settings.environ_from_flags(build_parser().parse_args(["serve"])) == {}


def test_override_applies_in_the_block_and_to_the_environment() -> None:
    before, env_before = settings.current(), os.environ.get("SPECSERVE_JUMP_FORWARD")
    with settings.override(jump_forward=False) as inside:
        assert settings.current() is inside and not inside.jump_forward
        assert os.environ["SPECSERVE_JUMP_FORWARD"] == "0"
        with settings.override(jump_forward=False):
            pass
        assert settings.current() is inside
    assert settings.current() is before
    assert os.environ.get("SPECSERVE_JUMP_FORWARD") == env_before


def test_registration_reads_the_settings_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import specserve_vllm

    specserve_vllm.register()
    first = settings.current()
    monkeypatch.setenv("SPECSERVE_JSON_MODE", "strict" if first.json_mode == "schema" else "schema")
    specserve_vllm.register()
    assert settings.read() is first and settings.current() is first
