"""The engine skips its own compile check only for a keyed caller that compiled the constraints
under the engine's reading (the gateway); anyone else's request is compiled and refused here."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS
from typing import Any

import pytest

from specserve.engine import settings
from specserve.structured.engine_grammar import CHECKED_HEADER, served_reading
from specserve_vllm import engine_auth
from specserve_vllm.compat import grammar_validation
from specserve_vllm.engine_auth import EngineKeyMiddleware

UNSERVABLE = {"$ref": "#"}  # admits no output: the engine's check refuses it
REFUSED = type(grammar_validation._validation_error("x"))  # vLLM's validation error (a 400)


def _params(schema: Any) -> Any:
    return NS(structured_outputs=NS(json=schema, regex=None, grammar=None))


def _through(middleware_key: str | None, headers: list[tuple[bytes, bytes]]) -> list[str | None]:
    """What :func:`engine_auth.checked_reading` says inside a request sent with ``headers``."""
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(engine_auth.checked_reading())

    async def send(message: Any) -> None:
        pass

    guard = EngineKeyMiddleware(app, key=middleware_key)
    asyncio.run(guard({"type": "http", "path": "/v1/chat/completions", "headers": headers}, None, send))
    return seen


def test_the_header_counts_only_with_the_engine_key() -> None:
    said = (CHECKED_HEADER.encode(), b"json_mode=schema")
    assert EngineKeyMiddleware and engine_auth.CHECKED_HEADER == CHECKED_HEADER.encode()
    assert _through("k", [(b"authorization", b"Bearer k"), said]) == ["json_mode=schema"]
    assert _through("k", [(b"authorization", b"Bearer k")]) == [None]
    assert _through(None, [said]) == [None]  # no engine key: anyone could have sent it
    assert engine_auth.checked_reading() is None  # reset after the request


def test_the_engine_check_skips_only_what_was_checked_under_its_reading() -> None:
    with pytest.raises(REFUSED, match="cannot be served"):
        grammar_validation.check_served(_params(UNSERVABLE))
    token = engine_auth._CHECKED.set(served_reading())
    try:
        grammar_validation.check_served(_params(UNSERVABLE))  # the gateway's word is taken
    finally:
        engine_auth._CHECKED.reset(token)
    other = "json_mode=strict" if settings.current().json_mode != "strict" else "json_mode=schema"
    token = engine_auth._CHECKED.set(served_reading().replace(served_reading().split(";")[0], other))
    try:
        with pytest.raises(REFUSED, match="cannot be served"):
            grammar_validation.check_served(_params(UNSERVABLE))  # another reading: checked here
    finally:
        engine_auth._CHECKED.reset(token)


def test_served_reading_names_the_settings_that_change_the_grammar() -> None:
    with settings.override(json_objects="open"):
        opened = served_reading()
    with settings.override(json_objects="closed"):
        closed = served_reading()
    assert opened != closed and "objects=open" in opened


def test_the_gateway_never_forwards_a_clients_copy_of_the_header() -> None:
    from specserve.gateway.proxy import Proxy

    sent = Proxy.forward_headers([(b"x-a", b"1"), (CHECKED_HEADER.encode(), served_reading().encode())])
    assert sent == {"x-a": "1"}


def test_the_in_process_fallback_answer_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the compile workers are not available, the engine compiles in the calling thread (its
    event loop); that answer is cached, so the same constraint is not compiled there twice."""
    from specserve.structured import served
    from specserve.structured.compile import CompileBusy, GrammarChecker

    checker = GrammarChecker(cache_size=8, timeout_s=1.0)
    monkeypatch.setitem(grammar_validation._CHECKER, "checker", checker)
    monkeypatch.setattr(checker, "_run", lambda *a: (_ for _ in ()).throw(CompileBusy("starting")))
    compiles: list[Any] = []
    real = served.compile_served

    def counting(kind: str, spec: Any) -> None:
        compiles.append(spec)
        real(kind, spec)

    monkeypatch.setattr(served, "compile_served", counting)
    unique = {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}  # admits no output
    for _ in range(2):
        with pytest.raises(REFUSED, match="admits no output"):
            grammar_validation.check_served(_params(unique))
    fine = {"type": "integer", "minimum": 7}
    grammar_validation.check_served(_params(fine))
    grammar_validation.check_served(_params(fine))
    assert compiles == [unique, fine]
