"""A streaming response that notices a client going away and closes its source at once.

Starlette's ``StreamingResponse`` only learns of a disconnect (on ASGI 2.4 servers) when the next
chunk fails to send, and leaves the source generator suspended. For a proxy that means the engine
keeps generating for nobody. This response watches ``http.disconnect`` while streaming and always
closes the source generator, which closes the upstream connection, which makes vLLM abort.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump(group: anyio.abc.TaskGroup) -> None:
            try:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the server reports a vanished client this way on ASGI 2.4
                self.disconnected = True
            finally:
                group.cancel_scope.cancel()

        async def watch(group: anyio.abc.TaskGroup) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    group.cancel_scope.cancel()
                    return

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(pump, group)
                group.start_soon(watch, group)
        finally:
            with anyio.CancelScope(shield=True):
                await self.chunks.aclose()
                if self.on_close is not None:
                    await self.on_close(self.disconnected)
