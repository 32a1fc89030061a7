"""Start one vLLM engine (with the specserve plugin) and the gateway in front of it.

Example:
    specserve serve                                  # the demo model on http://127.0.0.1:8000/v1
    specserve serve --model /models/llama --speculative-config '{"method":"ngram","num_speculative_tokens":4}'
    specserve serve --drafter recycling --num-speculative-tokens 4
    specserve serve --drafter hydra                  # heads trained for the demo model
    specserve serve --model /models/m --drafter medusa --heads /models/m-medusa
    specserve serve -- --max-num-seqs 8              # arguments after -- go to vLLM verbatim
    specserve serve --model /models/qwen --tool-call-parser hermes   # tool calling (docs/tools.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from specserve.commands.gateway import (
    add_gateway_arguments,
    bind_listener,
    check_listener,
    engine_key,
    gateway_config,
    serve_gateway,
)
from specserve.engine.process import DEMO_TOOL_PARSER, TOOL_PARSER_PLUGIN
from specserve.engine.settings import HEADS_ENV, add_flags, environ_from_flags
from specserve.engine.settings import load as settings_from_environ
from specserve.speculative_config import DRAFTERS, HEAD_DRAFTERS, draft_budget, speculative_config

ENGINE_PORT_TRIES = 3
"""Engine starts when its port is picked here: another process can take a picked port before the
engine binds it, and the engine then exits at once."""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    e = parser.add_argument_group("engine")
    e.add_argument("--model", default=None, help="HF model directory (default: the demo model)")
    e.add_argument("--served-model-name", default=None,
                   help='name clients use (default: "specserve-demo" for the demo model, else the dir name)')
    e.add_argument("--engine-port", type=int, default=0, help="port of the engine (default: a free one)")
    e.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="vLLM speculative config, e.g. '{\"method\":\"ngram\",\"num_speculative_tokens\":4}'")
    e.add_argument("--drafter", choices=DRAFTERS, default=None,
                   help="speculative drafter (instead of --speculative-config): recycling = Token "
                        "Recycling, medusa / hydra = draft heads, ngram = prompt lookup, vllm-medusa = "
                        "vLLM's Medusa proposer on converted heads, none")
    e.add_argument("--heads", default=None, metavar="DIR",
                   help="head checkpoint for --drafter medusa|hydra|vllm-medusa "
                        "(default on the demo model: heads trained for it, cached)")
    e.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="with --drafter: tokens drafted per step (requests may lower it with spec_k)")
    e.add_argument("--tree-budget", type=int, default=None, metavar="N",
                   help="with --tree static|dynamic: draft-tree nodes per request and step (the engine's "
                        "num_speculative_tokens; default: --num-speculative-tokens). Medusa/Hydra trees "
                        "may hold more nodes than there are heads; requests lower it with spec_k")
    e.add_argument("--engine-spec-policy", choices=("goodput", "fixed", "off"), default=None,
                   help="with a drafter: the engine's per-step draft lengths: goodput = chosen each step "
                        "for the batch from measured step time and acceptance (SmartSpec), fixed = each "
                        "request's spec_k or the engine's k, off = never speculate (default: "
                        "$SPECSERVE_ENGINE_SPEC_POLICY or goodput). "
                        "The gateway's --spec-policy is the per-request level")
    e.add_argument("--calibration", default=None, metavar="FILE",
                   help="step-time calibration for --engine-spec-policy goodput (`specserve calibrate`; "
                        "default: the demo model's, shipped)")
    t = parser.add_argument_group("tool calling (docs/tools.md)")
    t.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="vLLM tool-call parser for the model's format (hermes, llama3_json, mistral, ...; "
                        f"default on the demo model: {DEMO_TOOL_PARSER!r}, else none). 'none' turns tool "
                        "calls off. tool_choice named / required need it; auto needs it too")
    t.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=None,
                   help="allow tool_choice 'auto' (the model decides; default: on when a parser is set)")
    t.add_argument("--tool-parser-plugin", default=None, metavar="MODULE|FILE",
                   help="a module or file registering more parsers (default: specserve's, which "
                        "registers 'specserve')")
    t.add_argument("--chat-template", default=None, metavar="FILE",
                   help="chat template for models whose own template does not render tools")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    e.add_argument("--engine-start-timeout", type=float, default=900.0,
                   help="seconds to wait for the engine to become ready")
    e.add_argument("--engine-stop-grace", type=float, default=20.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the engine")
    e.add_argument("--engine-log", default=None, help="write the engine's output to this file")
    add_flags(e, skip=("heads_dir",))  # engine settings; --heads above (resolved with --drafter)
    add_gateway_arguments(parser)
    parser.add_argument("engine_args", nargs=argparse.REMAINDER,
                        help="after --: extra arguments passed to vLLM verbatim")


def _is_demo(model: str | None) -> bool:
    """Whether ``model`` is the demo model (not given, or its directory)."""
    if model is None:
        return True
    from pathlib import Path

    from specserve.demo import find_demo_model

    found = find_demo_model()
    return found is not None and found.resolve() == Path(model).resolve()


@dataclass(frozen=True)
class ToolOptions:
    """The engine's tool-calling flags, as chosen from the command line and the model."""

    parser: str | None
    auto: bool
    plugin: str | None


def tool_options(parser: str | None, auto: bool | None, plugin: str | None, is_demo: bool) -> ToolOptions:
    """Tool-calling flags for the engine: the demo model gets specserve's parser by default.

    specserve's parser module is the engine's ``--tool-parser-plugin`` unless another plugin is
    given (vLLM loads one).

    Example:
        >>> tool_options(None, None, None, is_demo=True)
        ToolOptions(parser='specserve', auto=True, plugin='specserve_vllm.compat.tool_parser')
        >>> tool_options(None, None, None, is_demo=False)
        ToolOptions(parser=None, auto=False, plugin=None)
        >>> tool_options("hermes", False, None, is_demo=False).auto
        False
        >>> tool_options("none", True, None, is_demo=True).parser is None
        True
    """
    if parser is None and is_demo:
        parser = DEMO_TOOL_PARSER
    if parser in (None, "", "none"):
        return ToolOptions(None, False, plugin)
    return ToolOptions(parser, True if auto is None else auto, plugin or TOOL_PARSER_PLUGIN)


def engine_spec_policy(flag: str | None, env: Mapping[str, str]) -> str:
    """The engine's per-step policy under ``specserve serve``: the flag, else the environment's,
    else :data:`~specserve_vllm.spec_control.planner.SERVED_POLICY`.

    Example:
        >>> engine_spec_policy(None, {})
        'goodput'
        >>> engine_spec_policy(None, {"SPECSERVE_ENGINE_SPEC_POLICY": "fixed"})
        'fixed'
        >>> engine_spec_policy("off", {"SPECSERVE_ENGINE_SPEC_POLICY": "fixed"})
        'off'
    """
    from specserve_vllm.spec_control.planner import POLICY_ENV, SERVED_POLICY

    return flag or env.get(POLICY_ENV) or SERVED_POLICY


class _Stop(Exception):
    """SIGTERM arrived while the engine was starting."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    """A repeated SIGTERM while the engine is being stopped: the stop (bounded) goes on."""
    log.info("already stopping", extra={"fields": {"signal": signal.Signals(signum).name}})


def run(args: argparse.Namespace) -> int:
    try:
        if not check_listener(args):
            return 2
        # The engine listens on 127.0.0.1 and answers only the gateway: a key of its own, made
        # per run unless one is given.
        key = engine_key(args) or secrets.token_urlsafe(32)
    except (OSError, ValueError) as exc:
        log.error("bad gateway options", extra={"fields": {"error": str(exc)}})
        return 2
    env: dict[str, str] = environ_from_flags(args)
    if args.tree_budget is not None and args.drafter is None:
        log.error("--tree-budget needs --drafter (with --speculative-config, set num_speculative_tokens)")
        return 2
    if args.drafter is not None:
        if args.speculative_config:
            log.error("give either --drafter or --speculative-config, not both")
            return 2
        try:
            from specserve.head_training import resolve_heads

            heads = resolve_heads(args.drafter, args.heads, is_demo=_is_demo(args.model))
            tree = args.engine_tree or settings_from_environ(os.environ).tree
            k = draft_budget(args.num_speculative_tokens, tree, args.tree_budget)
            config = speculative_config(args.drafter, k, heads=heads)
            if heads and args.drafter in HEAD_DRAFTERS:
                env[HEADS_ENV] = heads
        except ValueError as exc:
            log.error("bad drafter options", extra={"fields": {"error": str(exc)}})
            return 2
        args.speculative_config = json.dumps(config) if config else None
    if args.speculative_config:
        try:
            json.loads(args.speculative_config)
        except ValueError as exc:
            log.error("--speculative-config is not valid JSON", extra={"fields": {"error": str(exc)}})
            return 2
    try:
        listener = bind_listener(args.host, args.port)
    except OSError as exc:
        log.error("the gateway's port is taken", extra={"fields": {"host": args.host, "port": args.port,
                                                                   "error": str(exc)}})
        return 2
    with listener:
        return _serve(args, env, key, listener)


def _serve(args: argparse.Namespace, env: dict[str, str], key: str, listener: socket.socket) -> int:
    """Start the engine, then the gateway on ``listener`` in front of it; stop both at the end."""
    from specserve.engine.process import EngineError, EngineProcess, EngineSpec, detect_device, free_port
    from specserve.engine.process import port_in_use, served_name_for

    model = args.model
    if model is None:
        from specserve.demo import demo_model_dir

        model = str(demo_model_dir())
    extra = list(args.engine_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    tools = tool_options(args.tool_call_parser, args.enable_auto_tool_choice, args.tool_parser_plugin,
                         is_demo=_is_demo(args.model))
    if args.enable_auto_tool_choice and tools.parser is None:
        log.error("--enable-auto-tool-choice needs --tool-call-parser")
        return 2
    spec = EngineSpec(
        model=model,
        port=args.engine_port or free_port(),
        served_model_name=args.served_model_name or served_name_for(model, is_demo=args.model is None),
        device=detect_device() if args.device == "auto" else args.device,
        speculative_config=args.speculative_config,
        spec_policy=engine_spec_policy(args.engine_spec_policy, os.environ),
        calibration=args.calibration,
        max_model_len=args.max_model_len,
        extra_args=tuple(extra),
        env=tuple(env.items()),
        api_key=key,
        tool_call_parser=tools.parser,
        enable_auto_tool_choice=tools.auto,
        tool_parser_plugin=tools.plugin,
        chat_template=args.chat_template,
    )
    engine = EngineProcess(spec, log_path=args.engine_log)
    signal.signal(signal.SIGTERM, _raise_stop)
    serving = False
    try:
        for attempt in range(1, ENGINE_PORT_TRIES + 1):
            engine.start()
            try:
                engine.wait_ready(timeout_s=args.engine_start_timeout)
                break
            except EngineError:
                # A port picked here can be taken by another process before the engine binds it:
                # the engine then exits at once; start it again on another port.
                if (args.engine_port or engine.exit_code() is None or attempt == ENGINE_PORT_TRIES
                        or not port_in_use(spec.port)):
                    raise
                log.warning("engine port taken before the engine bound it; trying another",
                            extra={"fields": {"port": spec.port, "attempt": attempt}})
                engine.stop(grace_s=args.engine_stop_grace)  # its process group, leftovers too
                spec = dataclasses.replace(spec, port=free_port())
                engine = EngineProcess(spec, log_path=args.engine_log)
        serving = True

        def engine_gone() -> str | None:
            code = engine.exit_code()
            return None if code is None else f"engine exited with code {code}"

        config = gateway_config(args, [spec.url], device=spec.device, engine_api_key=key)
        return serve_gateway(args, config, should_stop=engine_gone, listener=listener)
    except EngineError as exc:
        log.error("engine failed", extra={"fields": {"error": str(exc)}})
        return 1
    except (KeyboardInterrupt, _Stop):
        # The gateway re-raises the signal it handled after its graceful shutdown: not an error then.
        if serving:
            return 0
        log.info("interrupted while the engine was starting")
        return 130
    finally:
        # From here on the process only stops: a repeated SIGTERM (an orchestrator, a supervisor)
        # must neither abort the engine's stop nor turn a clean exit into an error. The handler
        # stays installed until the process exits.
        signal.signal(signal.SIGTERM, _already_stopping)
        engine.stop(grace_s=args.engine_stop_grace)
        log.info("stopped")
