"""A stand-in for the engine process of ``specserve serve``: tests of the code around the engine
(port retries, the speculative config it is started with) without starting vLLM."""

from __future__ import annotations

from typing import Any

import pytest

from specserve.cli import build_parser
from specserve.commands import serve
from specserve.engine import process
from specserve.engine.process import EngineError, EngineSpec


class StandInEngine:
    """Exits at once (like vLLM) when someone else holds its port; otherwise ready."""

    made: list[StandInEngine] = []

    def __init__(self, spec: EngineSpec, *, log_path: str | None = None) -> None:
        self.spec, self.stopped, self.code = spec, False, None
        self.made.append(self)

    def start(self) -> None:
        self.code = 1 if process.port_in_use(self.spec.port) else None

    def wait_ready(self, timeout_s: float = 0.0) -> None:
        if self.code is not None:
            raise EngineError(f"engine exited with code {self.code} before it was ready")

    def exit_code(self) -> int | None:
        return self.code

    def stop(self, grace_s: float = 0.0) -> int | None:
        self.stopped = True
        return self.code


def run_serve(monkeypatch: pytest.MonkeyPatch, argv: list[str], ports: list[int]) -> tuple[int, list[Any]]:
    """``specserve serve argv`` with stand-in engines given ``ports`` in turn: its exit code and the
    gateway configs it served (the engines started are in ``StandInEngine.made``)."""
    StandInEngine.made = []
    served: list[Any] = []
    picks = iter(ports)
    if "--port" not in argv:  # the gateway's socket is bound before the engine starts
        argv = ["--port", str(process.free_port()), *argv]
    monkeypatch.setattr(process, "EngineProcess", StandInEngine)
    monkeypatch.setattr(process, "free_port", lambda host="127.0.0.1": next(picks))
    monkeypatch.setattr(serve, "serve_gateway", lambda args, config, should_stop, listener=None: served.append(config) or 0)
    args = build_parser().parse_args(["serve", "--model", "/nonexistent/model", "--device", "cpu", *argv])
    return serve.run(args), served
