"""Engine-side settings of the specserve plugin, declared once and read once.

Each setting is an environment variable of the engine process, declared here with its type,
default and doc (as vLLM declares its own in ``vllm/envs.py``), and a ``specserve serve`` flag
that sets it for the engine it starts. The plugin reads them when vLLM registers it
(:func:`specserve_vllm.register`), so every request of a process sees the same values; benchmarks
and tests that run several in-process engines change them with :func:`override`. Pure: imports
neither torch nor vLLM.

    >>> load({"SPECSERVE_JUMP_FORWARD": "off", "SPECSERVE_JSON_MODE": "strict"})
    ... # doctest: +NORMALIZE_WHITESPACE
    EngineSettings(json_mode='strict', json_objects='closed', jump_forward=False,
                   jump_forward_strings=True, heads_dir=None, tree='chain')
    >>> to_environ(EngineSettings(jump_forward=False, heads_dir="/h"))["SPECSERVE_JUMP_FORWARD"]
    '0'
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

JsonMode = Literal["schema", "strict"]
JsonObjects = Literal["closed", "open"]
TreeMode = Literal["chain", "static", "dynamic"]
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class EngineSettings:
    """The values one engine process serves with."""

    json_mode: JsonMode = "schema"
    """How a ``json_schema`` without its own reading is read: ``schema`` (JSON Schema's meaning) or
    ``strict`` (OpenAI's strict contract: declared keys only, in the declared order)."""
    json_objects: JsonObjects = "closed"
    """Objects of a ``json_schema`` without ``additionalProperties``: ``closed`` (only the declared
    keys, as vLLM, SGLang and OpenAI read them) or ``open`` (JSON Schema's letter: any key)."""
    jump_forward: bool = True
    """Draft the tokens a grammar forces (structured outputs with a drafter)."""
    jump_forward_strings: bool = True
    """With jump-forward on, also draft forced strings (tokenized), not just single forced tokens."""
    heads_dir: str | None = None
    """Head checkpoint of the ``medusa``/``hydra`` drafters."""
    tree: TreeMode = "chain"
    """Draft shape of specserve's drafters (recycling, medusa, hydra): ``chain`` (one path), or a
    tree verified in one step, ``static`` (a breadth-first template) or ``dynamic`` (DySpec), with
    ``k`` nodes at most."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: the field it fills, its parser and its ``specserve serve`` flag."""

    field: str
    env: str
    flag: str
    parse: Callable[[str], Any]
    help: str


def _json_mode(text: str) -> JsonMode:
    mode = text.strip().lower()
    if mode not in ("schema", "strict"):
        raise ValueError(f"{mode!r} is not one of schema, strict")
    return "strict" if mode == "strict" else "schema"


def _json_objects(text: str) -> JsonObjects:
    value = text.strip().lower()
    if value not in ("closed", "open"):
        raise ValueError(f"{value!r} is not one of closed, open")
    return "open" if value == "open" else "closed"


def _tree(text: str) -> TreeMode:
    value = text.strip().lower()
    if value not in get_args(TreeMode):
        raise ValueError(f"{value!r} is not one of chain, static, dynamic")
    return "static" if value == "static" else "dynamic" if value == "dynamic" else "chain"


def _switch(text: str) -> bool:
    return text.strip().lower() not in _FALSE


def _path(text: str) -> str | None:
    return text or None


HEADS_ENV = "SPECSERVE_HEADS_DIR"
"""The variable through which an engine finds its head checkpoint (``specserve serve --heads``)."""

SETTINGS: tuple[Setting, ...] = (
    Setting("json_mode", "SPECSERVE_JSON_MODE", "--json-mode", _json_mode,
            "reading of json_schema constraints without their own: schema (JSON Schema's meaning) "
            "or strict (declared keys only, in the declared order)"),
    Setting("json_objects", "SPECSERVE_JSON_OBJECTS", "--json-objects", _json_objects,
            "objects of json_schema constraints without additionalProperties: closed (declared "
            "keys only) or open (any key, JSON Schema's letter)"),
    Setting("jump_forward", "SPECSERVE_JUMP_FORWARD", "--jump-forward", _switch,
            "draft the tokens a grammar forces (0/false/off/no turns it off)"),
    Setting("jump_forward_strings", "SPECSERVE_JUMP_FORWARD_STRINGS", "--jump-forward-strings", _switch,
            "with jump-forward, also draft forced strings, not just single forced tokens"),
    Setting("heads_dir", HEADS_ENV, "--heads", _path,
            "head checkpoint directory of the medusa/hydra drafters"),
    Setting("tree", "SPECSERVE_TREE", "--tree", _tree,
            "draft shape of the recycling/medusa/hydra drafters: chain, or a tree of at most k nodes verified "
            "in one step, static (breadth-first template) or dynamic (DySpec)"),
)
"""Every engine-side setting, in the order ``docs/configuration.md`` lists them."""

def load(environ: Mapping[str, str]) -> EngineSettings:
    """The settings in ``environ``; an unreadable value is logged and its default kept."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = environ.get(setting.env)
        if text is None:
            continue
        try:
            values[setting.field] = setting.parse(text)
        except ValueError as err:
            logger.warning("unreadable engine setting; using its default",
                           extra={"fields": {"variable": setting.env, "error": str(err)}})
    return EngineSettings(**values)


def to_environ(settings: EngineSettings) -> dict[str, str]:
    """The environment that gives an engine process ``settings`` (``None`` values left out)."""
    out: dict[str, str] = {}
    for setting in SETTINGS:
        value = getattr(settings, setting.field)
        if value is None:
            continue
        out[setting.env] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


_CHOICES: dict[str, Any] = {"json_mode": JsonMode, "json_objects": JsonObjects, "tree": TreeMode}


def add_flags(group: Any, skip: tuple[str, ...] = ()) -> None:
    """One ``specserve serve`` flag per setting (except the fields in ``skip``); unset flags leave
    the engine's environment as it is."""
    for setting in SETTINGS:
        if setting.field in skip:
            continue
        default = getattr(EngineSettings(), setting.field)
        dest = f"engine_{setting.field}"
        if isinstance(default, bool):
            group.add_argument(setting.flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=f"{setting.help} (default: on; {setting.env})")
        elif setting.field in _CHOICES:
            choices = get_args(_CHOICES[setting.field])
            group.add_argument(setting.flag, dest=dest, choices=choices, default=None,
                               help=f"{setting.help} (default: {default}; {setting.env})")
        else:
            group.add_argument(setting.flag, dest=dest, default=None,
                               help=f"{setting.help} ({setting.env})")


def environ_from_flags(args: argparse.Namespace) -> dict[str, str]:
    """The engine environment for the setting flags given on the command line."""
    given = {s.field: getattr(args, f"engine_{s.field}") for s in SETTINGS
             if getattr(args, f"engine_{s.field}", None) is not None}
    full = to_environ(dataclasses.replace(EngineSettings(), **given))
    return {s.env: full[s.env] for s in SETTINGS if s.field in given}


_LOCK = threading.Lock()
_CURRENT: list[EngineSettings] = []


def read() -> EngineSettings:
    """Read the settings from this process's environment, once (the plugin calls it at
    registration); later calls return the same value."""
    with _LOCK:
        if not _CURRENT:
            _CURRENT.append(load(os.environ))
        return _CURRENT[-1]


def current() -> EngineSettings:
    """The settings this process serves with (:func:`read` on first use)."""
    return _CURRENT[-1] if _CURRENT else read()


@contextmanager
def override(**changes: Any) -> Iterator[EngineSettings]:
    """Serve with ``changes`` applied inside the block (benchmarks and tests that run several
    engines with different settings in one process). The environment carries them too, for
    engine processes started inside the block."""
    changed = dataclasses.replace(current(), **changes)
    saved = {s.env: os.environ.get(s.env) for s in SETTINGS}
    with _LOCK:
        _CURRENT.append(changed)
    for setting in SETTINGS:
        os.environ.pop(setting.env, None)
    os.environ.update(to_environ(changed))
    try:
        yield changed
    finally:
        with _LOCK:
            del _CURRENT[next(i for i, v in enumerate(_CURRENT) if v is changed)]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
