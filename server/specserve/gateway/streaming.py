"""A streaming response that notices a client going away and closes its source at once.

Starlette's ``StreamingResponse`` only learns of a disconnect (on ASGI 2.4 servers) when the next
chunk fails to send, and leaves the source generator suspended. For a proxy that means the engine
keeps generating for nobody. This response watches ``http.disconnect`` while streaming and always
closes the source generator, which closes the upstream connection, which makes vLLM abort.

Plain asyncio tasks (one sends the chunks, one waits for the disconnect and cancels the first): a
task group's cancel scopes cost more per request than the rest of the response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)


class PassthroughStream(Response):
    """Send ``chunks`` as they come; stop and close them when the client disconnects."""

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.chunks = chunks
        self.status_code = status_code
        self.on_close = on_close
        self.background = None
        self.init_headers(headers)
        self.disconnected = False

    async def _pump(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the server reports a vanished client this way on ASGI 2.4
            self.disconnected = True

    async def _watch(self, receive: Receive, pump: asyncio.Task[None]) -> None:
        """Wait for ``http.disconnect``; then stop the pump."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:  # noqa: BLE001 - a broken receive channel only ends the watch
            log.debug("disconnect watch ended", extra={"fields": {"error": type(exc).__name__}})
            return
        self.disconnected = True
        pump.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        # The pump runs in a task of its own: each chunk then resumes two frames, not the whole
        # middleware and routing stack of this request.
        pump = loop.create_task(self._pump(send))
        watcher = loop.create_task(self._watch(receive, pump))
        try:
            await pump
        except asyncio.CancelledError:
            if not pump.cancelled() or not self.disconnected:
                raise  # this request's task was cancelled, not the pump by a disconnect
        finally:
            watcher.cancel()
            if not pump.done():  # cancelled with this task: let the pump unwind first
                pump.cancel()
                await asyncio.wait([pump])
            await self.chunks.aclose()
            if self.on_close is not None:
                await self.on_close(self.disconnected)
