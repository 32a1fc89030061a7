"""``specserve serve`` starts its engine again on another port when the port it picked was taken
before the engine bound it, and only then (stand-in engines: this tests the retry around them)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from specserve.cli import build_parser
from specserve.commands import serve
from specserve.engine import process
from support.serve_standin import StandInEngine, run_serve


@pytest.fixture()
def held() -> Iterator[int]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_port_is_replaced(monkeypatch: pytest.MonkeyPatch, held: int) -> None:
    spare = process.free_port()  # a real free port, picked before the patch
    code, served = run_serve(monkeypatch, [], [held, spare])
    assert code == 0
    assert [e.spec.port for e in StandInEngine.made] == [held, spare]
    assert StandInEngine.made[0].stopped  # the failed start's process group is cleared
    assert served[0].replicas == [f"http://127.0.0.1:{spare}"]  # the gateway routes to the new one


def test_a_given_port_is_not_replaced(monkeypatch: pytest.MonkeyPatch, held: int) -> None:
    code, served = run_serve(monkeypatch, ["--engine-port", str(held)], [])
    assert code == 1 and not served
    assert len(StandInEngine.made) == 1


def test_an_engine_that_fails_on_a_free_port_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(StandInEngine):
        def start(self) -> None:
            self.code = 3

    spare, gateway_port = process.free_port(), process.free_port()
    monkeypatch.setattr(process, "EngineProcess", Broken)
    StandInEngine.made = []
    monkeypatch.setattr(process, "free_port", lambda host="127.0.0.1": spare)
    monkeypatch.setattr(serve, "serve_gateway", lambda args, config, should_stop, listener=None: 0)
    args = build_parser().parse_args(["serve", "--model", "/nonexistent/model", "--device", "cpu",
                                      "--port", str(gateway_port)])
    assert serve.run(args) == 1
    assert len(StandInEngine.made) == 1
