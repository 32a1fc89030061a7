"""A client that leaves in the instant its queued request is granted a slot: nothing is sent.

The gateway waits for a slot and for the client's disconnect at once. When both happen in the
same event-loop turn (the slot freed by another client leaving), the slot must go back and the
request end as a 499, never reach the engine (found as a rare failure of the end-to-end test in
``test_gateway_security.py``; this reproduces it deterministically).
"""

from __future__ import annotations

import asyncio

import pytest

from specserve.errors import APIError
from specserve.gateway.limits import AdmissionQueue
from specserve.gateway.routes import take_slot


class LeavingClient:
    """The ASGI ``receive`` of a client whose only next message is its disconnect."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, str]:
        await self.left.wait()
        return {"type": "http.disconnect"}


async def _queued_behind_one(queue: AdmissionQueue, client: LeavingClient) -> asyncio.Future[None]:
    await queue.acquire()  # the request at the engine
    waiting = asyncio.ensure_future(take_slot(client, queue))  # type: ignore[arg-type]
    while queue.waiting != 1:
        await asyncio.sleep(0)
    return waiting


def test_a_slot_granted_as_the_client_leaves_is_given_back() -> None:
    async def main() -> None:
        queue, client = AdmissionQueue(1, 4, 30.0), LeavingClient()
        waiting = await _queued_behind_one(queue, client)
        client.left.set()
        queue.release()  # the same turn: the slot is granted as the client leaves
        with pytest.raises(APIError) as caught:
            await waiting
        assert caught.value.status == 499
        assert (queue.waiting, queue.active) == (0, 0)
        await asyncio.wait_for(queue.acquire(), 1)  # the slot is free, not leaked

    asyncio.run(main())


def test_a_client_that_leaves_while_queued_holds_nothing() -> None:
    async def main() -> None:
        queue, client = AdmissionQueue(1, 4, 30.0), LeavingClient()
        waiting = await _queued_behind_one(queue, client)
        client.left.set()
        with pytest.raises(APIError) as caught:
            await waiting
        assert caught.value.status == 499 and queue.waiting == 0
        queue.release()
        await asyncio.wait_for(queue.acquire(), 1)
        assert queue.active == 1

    asyncio.run(main())


def test_a_slot_granted_to_a_client_that_stays_is_kept() -> None:
    async def main() -> None:
        queue, client = AdmissionQueue(1, 4, 30.0), LeavingClient()
        waiting = await _queued_behind_one(queue, client)
        queue.release()
        await waiting
        assert (queue.waiting, queue.active) == (0, 1)

    asyncio.run(main())


def test_a_queue_timeout_is_a_503() -> None:
    async def main() -> None:
        queue, client = AdmissionQueue(1, 4, 0.05), LeavingClient()
        waiting = await _queued_behind_one(queue, client)
        with pytest.raises(APIError) as caught:
            await waiting
        assert caught.value.status == 503 and caught.value.code == "queue_timeout"
        assert (queue.waiting, queue.active) == (0, 1)

    asyncio.run(main())
