"""Running one vLLM OpenAI server as a child process: command line, environment, readiness, stop.

The engine runs in its own process group so that stopping it reaches every process vLLM spawns
(engine core, workers) and nothing is left behind.

Example:
    >>> spec = EngineSpec(model="/models/m", port=8001, served_model_name="m", device="cpu")
    >>> cmd = engine_command(spec, python="python")
    >>> cmd[:3], "--enforce-eager" in cmd
    (['python', '-m', 'vllm.entrypoints.openai.api_server'], True)
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

log = logging.getLogger(__name__)

# Environment that makes vLLM usable on a CPU-only machine; values the user set win.
CPU_ENV: dict[str, str] = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "NUMBA_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


DEFAULT_STRUCTURED_OUTPUTS = '{"backend":"xgrammar","disable_any_whitespace":true}'
ENGINE_KEY_ENV = "SPECSERVE_ENGINE_API_KEY"
"""The engine's key (read by the middleware below in the engine, sent by the gateway)."""
ENGINE_KEY_MIDDLEWARE = "specserve_vllm.engine_auth.EngineKeyMiddleware"
"""vLLM ``--middleware`` that refuses every route but ``/health`` and ``/metrics`` without the key."""

TOOL_PARSER_PLUGIN = "specserve_vllm.compat.tool_parser"
"""Module that registers specserve's ``specserve`` tool-call parser with vLLM when imported."""
DEMO_TOOL_PARSER = "specserve"
"""The tool-call parser for the demo model's chat template (Hermes-style ``<tool_call>`` tags)."""


@dataclass(frozen=True)
class EngineSpec:
    """What to start: a model directory served under a name on a local port."""

    model: str
    port: int
    served_model_name: str
    host: str = "127.0.0.1"
    device: Literal["cpu", "gpu"] = "cpu"
    speculative_config: str | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    """``None``: on for CPU (torch.compile costs ~80 s at start there), vLLM's default on GPU."""
    structured_outputs_config: str | None = DEFAULT_STRUCTURED_OUTPUTS
    """vLLM's ``--structured-outputs-config``; compact JSON is what the strict-JSON patch expects."""
    spec_policy: str | None = None
    """The engine's per-step draft-length policy (``goodput``, ``fixed``, ``off``; None: the
    plugin's, from the engine's environment); passed in vLLM's ``--additional-config``."""
    calibration: str | None = None
    """Step-time calibration JSON for the ``goodput`` policy (None: the shipped demo one)."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """Extra environment variables for the engine (e.g. the head checkpoint of a head drafter)."""
    api_key: str | None = field(default=None, repr=False)
    """Key every engine route but ``/health`` and ``/metrics`` requires (environment, not argv)."""
    tool_call_parser: str | None = None
    """vLLM's ``--tool-call-parser`` (tool_choice named / required / auto); ``None``: no tool calls."""
    enable_auto_tool_choice: bool = False
    """vLLM's ``--enable-auto-tool-choice`` (``tool_choice: auto``; needs a parser)."""
    tool_parser_plugin: str | None = None
    """vLLM's ``--tool-parser-plugin``: a module or file that registers more parsers."""
    chat_template: str | None = None
    """vLLM's ``--chat-template`` (a file or a template), for models whose own one lacks tools."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_EPHEMERAL_RANGE = (32768, 60999)
LOWEST_SPARE_PORT = 10000
_random = random.SystemRandom()  # not the seeded global generator: processes must not pick alike
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to sockets bound to port 0 (Linux's default when unreadable)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return LINUX_EPHEMERAL_RANGE
    return low, high


def spare_range(ephemeral: tuple[int, int], lowest: int = LOWEST_SPARE_PORT) -> tuple[int, int] | None:
    """The widest block of unprivileged ports outside ``ephemeral``; None when there is none.

    A port picked there cannot be handed by the kernel to another process binding port 0 (vLLM's
    own sockets, say) between the pick and its user's bind.

    >>> spare_range((32768, 60999))
    (10000, 32767)
    >>> spare_range((1024, 60999))
    (61000, 65535)
    >>> spare_range((1024, 65535)) is None
    True
    """
    low, high = ephemeral
    below = (lowest, low - 1) if low - 1 >= lowest else None
    above = (max(high + 1, lowest), 65535) if high < 65535 else None
    blocks = [b for b in (below, above) if b is not None and b[1] - b[0] >= 100]
    return max(blocks, key=lambda b: b[1] - b[0], default=None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody holds now, picked at random outside the kernel's ephemeral range (so that
    no process binding port 0 can be given it before its user binds it), never the same twice in a
    process. Falls back to an ephemeral port when the range leaves no room."""
    block = spare_range(ephemeral_range())
    for _ in range(200 if block else 0):
        port = _random.randint(*block)  # type: ignore[misc]
        if port not in _handed_out and not port_in_use(port, host):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether someone holds ``port`` now (a port picked by :func:`free_port` can be taken by
    another process before its user binds it). Closed connections lingering in TIME_WAIT do not
    count: servers bind with ``SO_REUSEADDR``, as here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def detect_device() -> Literal["cpu", "gpu"]:
    """``cpu`` when the CPU build of vLLM is installed or the environment asks for it."""
    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu":
        return "cpu"
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "gpu"
    return "cpu"


def engine_command(spec: EngineSpec, python: str = sys.executable) -> list[str]:
    """The argv that starts vLLM's OpenAI server for ``spec`` (extra args go last, verbatim)."""
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.model,
        "--served-model-name", spec.served_model_name,
        "--host", spec.host,
        "--port", str(spec.port),
    ]
    if spec.max_model_len is not None:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.speculative_config:
        # per-request acceptance in each response (`metrics.speculative_decoding`) for the gateway
        cmd += ["--speculative-config", spec.speculative_config,
                "--per-request-spec-decode-metrics", "detailed"]
        ours = {k: v for k, v in (("spec_policy", spec.spec_policy), ("calibration", spec.calibration)) if v}
        if ours:
            cmd += ["--additional-config", json.dumps({"specserve": {**ours, "log_every": 2000}})]
    if spec.structured_outputs_config:
        cmd += ["--structured-outputs-config", spec.structured_outputs_config]
    if spec.tool_parser_plugin:
        cmd += ["--tool-parser-plugin", spec.tool_parser_plugin]
    if spec.tool_call_parser:
        cmd += ["--tool-call-parser", spec.tool_call_parser]
        if spec.enable_auto_tool_choice:
            cmd.append("--enable-auto-tool-choice")
    if spec.chat_template:
        cmd += ["--chat-template", spec.chat_template]
    eager = spec.enforce_eager if spec.enforce_eager is not None else spec.device == "cpu"
    if eager:
        cmd.append("--enforce-eager")
    if spec.api_key:
        cmd += ["--middleware", ENGINE_KEY_MIDDLEWARE]
    return cmd + list(spec.extra_args)


def engine_env(device: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` plus the CPU settings (without overriding the user's).

    Example:
        >>> engine_env("cpu", {"VLLM_CPU_KVCACHE_SPACE": "4"})["VLLM_CPU_KVCACHE_SPACE"]
        '4'
        >>> engine_env("cpu", {})["HF_HUB_OFFLINE"]
        '1'
    """
    env = dict(os.environ if base is None else base)
    if device == "cpu":
        for key, value in CPU_ENV.items():
            env.setdefault(key, value)
    return env


class EngineError(RuntimeError):
    """The engine exited or did not become ready."""


class EngineProcess:
    """One vLLM server child process in its own process group."""

    def __init__(self, spec: EngineSpec, *, log_path: str | None = None) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = engine_command(self.spec)
        log.info("starting engine", extra={"fields": {"cmd": cmd, "url": self.spec.url}})
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - owned by the child
        try:
            env = {**engine_env(self.spec.device), **dict(self.spec.env)}
            if self.spec.api_key:
                env[ENGINE_KEY_ENV] = self.spec.api_key
            self.proc = subprocess.Popen(
                cmd, env=env, start_new_session=True,
                stdout=out, stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out is not None:
                out.close()

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout_s: float = 600.0, interval_s: float = 0.5, progress_s: float = 10.0) -> None:
        """Poll ``/health`` until it answers 200; raise :class:`EngineError` on exit or timeout."""
        started = time.monotonic()
        next_progress = started + progress_s
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                code = self.exit_code()
                if code is not None:
                    raise EngineError(f"engine exited with code {code} before it was ready")
                try:
                    if client.get(f"{self.spec.url}/health").status_code == 200:
                        log.info("engine ready", extra={"fields": {
                            "url": self.spec.url, "seconds": round(time.monotonic() - started, 1)}})
                        return
                except httpx.HTTPError:
                    pass
                now = time.monotonic()
                if now - started > timeout_s:
                    raise EngineError(f"engine not ready after {timeout_s:.0f} s")
                if now >= next_progress:
                    log.info("waiting for engine", extra={"fields": {
                        "url": self.spec.url, "seconds": round(now - started)}})
                    next_progress = now + progress_s
                time.sleep(interval_s)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the engine's process group, SIGKILL it after ``grace_s``; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the group id is the child's pid
        if proc.poll() is None:
            log.info("stopping engine", extra={"fields": {"pid": proc.pid}})
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("engine did not stop in time; killing", extra={"fields": {"pid": proc.pid}})
        # Workers may outlive the server process: clear the whole group either way.
        _signal_group(pgid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=10)
        return proc.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def served_name_for(model_dir: str, is_demo: bool) -> str:
    """The default served model name.

    Example:
        >>> served_name_for("/x/models/tiny-llama/", False), served_name_for("/cache/abc", True)
        ('tiny-llama', 'specserve-demo')
    """
    return "specserve-demo" if is_demo else os.path.basename(os.path.normpath(model_dir))


__all__: Sequence[str] = [
    "CPU_ENV", "DEMO_TOOL_PARSER", "TOOL_PARSER_PLUGIN", "EngineError", "EngineProcess", "EngineSpec",
    "detect_device", "engine_command", "engine_env", "free_port", "port_in_use", "served_name_for",
]
