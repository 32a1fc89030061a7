"""``specserve serve`` starts its engine again on another port when the port it picked was taken
before the engine bound it, and only then (stand-in engines: this tests the retry around them)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from specserve.cli import build_parser
from specserve.commands import serve
from specserve.engine import process
from specserve.engine.process import EngineError, EngineSpec


class _Engine:
    """Exits at once (like vLLM) when someone else holds its port; otherwise ready."""

    made: list[_Engine] = []

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


@pytest.fixture()
def held() -> Iterator[int]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _run(monkeypatch: pytest.MonkeyPatch, argv: list[str], ports: list[int]) -> tuple[int, list[Any]]:
    _Engine.made = []
    served: list[Any] = []
    picks = iter(ports)
    monkeypatch.setattr(process, "EngineProcess", _Engine)
    monkeypatch.setattr(process, "free_port", lambda host="127.0.0.1": next(picks))
    monkeypatch.setattr(serve, "serve_gateway", lambda args, config, should_stop: served.append(config) or 0)
    args = build_parser().parse_args(["serve", "--model", "/nonexistent/model", "--device", "cpu", *argv])
    return serve.run(args), served


def test_a_taken_port_is_replaced(monkeypatch: pytest.MonkeyPatch, held: int) -> None:
    spare = process.free_port()  # a real free port, picked before the patch
    code, served = _run(monkeypatch, [], [held, spare])
    assert code == 0
    assert [e.spec.port for e in _Engine.made] == [held, spare]
    assert _Engine.made[0].stopped  # the failed start's process group is cleared
    assert served[0].replicas == [f"http://127.0.0.1:{spare}"]  # the gateway routes to the new one


def test_a_given_port_is_not_replaced(monkeypatch: pytest.MonkeyPatch, held: int) -> None:
    code, served = _run(monkeypatch, ["--engine-port", str(held)], [])
    assert code == 1 and not served
    assert len(_Engine.made) == 1


def test_an_engine_that_fails_on_a_free_port_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(_Engine):
        def start(self) -> None:
            self.code = 3

    spare = process.free_port()
    monkeypatch.setattr(process, "EngineProcess", Broken)
    _Engine.made = []
    monkeypatch.setattr(process, "free_port", lambda host="127.0.0.1": spare)
    monkeypatch.setattr(serve, "serve_gateway", lambda args, config, should_stop: 0)
    args = build_parser().parse_args(["serve", "--model", "/nonexistent/model", "--device", "cpu"])
    assert serve.run(args) == 1
    assert len(_Engine.made) == 1
