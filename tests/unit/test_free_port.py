"""Ports for engines and gateways: picked outside the kernel's ephemeral range, so that no process
binding port 0 meanwhile can be given one; and ``specserve serve`` holds its gateway's port from
before the engine starts."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from specserve.cli import build_parser
from specserve.commands import serve
from specserve.engine import process
from support.serve_standin import StandInEngine


def test_ports_are_outside_the_ephemeral_range_bindable_and_never_repeated() -> None:
    low, high = process.ephemeral_range()
    ports = [process.free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= p <= high and p >= process.LOWEST_SPARE_PORT for p in ports), ports
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises when someone holds it


def test_a_held_port_is_never_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", process.free_port()))
        held.listen()
        port = held.getsockname()[1]
        # A range of one port, held: the pick falls back to a kernel-chosen port.
        monkeypatch.setattr(process, "spare_range", lambda ephemeral: (port, port))
        picked = process.free_port()
    assert picked != port and picked > 0


def test_no_room_outside_the_ephemeral_range_falls_back_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "ephemeral_range", lambda: (1024, 65535))
    port = process.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_the_range_is_read_from_the_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    path = tmp_path / "range"
    path.write_text("40000\t50000\n")
    monkeypatch.setattr(process, "EPHEMERAL_RANGE_FILE", path)
    assert process.ephemeral_range() == (40000, 50000)
    path.write_text("garbage")
    assert process.ephemeral_range() == process.LINUX_EPHEMERAL_RANGE


def _plain_bind_fails(port: int) -> bool:
    """Whether a socket without SO_REUSEADDR (as a port-0 pick is made) cannot bind ``port``."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _serve_args(port: int) -> Any:
    return build_parser().parse_args(["serve", "--model", "/nonexistent/model", "--device", "cpu",
                                      "--port", str(port)])


def test_a_taken_gateway_port_fails_before_any_engine_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    StandInEngine.made = []
    monkeypatch.setattr(process, "EngineProcess", StandInEngine)
    with socket.socket() as held:
        held.bind(("127.0.0.1", process.free_port()))
        held.listen()
        assert serve.run(_serve_args(held.getsockname()[1])) == 2
    assert StandInEngine.made == []


def test_the_gateway_serves_on_the_socket_bound_before_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    gateway_port, engine_port = process.free_port(), process.free_port()
    seen: dict[str, Any] = {}

    class Recording(StandInEngine):
        def start(self) -> None:
            # While the engine starts, the gateway's port is already held.
            seen["held_at_engine_start"] = _plain_bind_fails(gateway_port)
            super().start()

    def fake_gateway(args: Any, config: Any, should_stop: Any, listener: socket.socket | None = None) -> int:
        assert listener is not None
        seen["bound"] = listener.getsockname()[1]
        return 0

    StandInEngine.made = []
    monkeypatch.setattr(process, "EngineProcess", Recording)
    monkeypatch.setattr(process, "free_port", lambda host="127.0.0.1": engine_port)
    monkeypatch.setattr(serve, "serve_gateway", fake_gateway)
    assert serve.run(_serve_args(gateway_port)) == 0
    assert seen == {"held_at_engine_start": True, "bound": gateway_port}
    assert not _plain_bind_fails(gateway_port)  # released at the end
