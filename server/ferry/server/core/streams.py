"""Running a bidirectional stream's requests: concurrently, bounded, cancelled with the stream.

Protocol-agnostic (any async iterator of requests, any response type), so every streaming
protocol gets the same flow control and the same cleanup.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def run_stream(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    max_in_flight: int,
) -> AsyncIterator[Resp]:
    """Run a bidirectional stream's requests concurrently, yielding responses as they complete.

    ``handle`` turns one request into its response, errors included (a stream has no status per
    message). A request holds one of ``max_in_flight`` slots until its response is written, not
    merely computed: a client that sends without reading stops being read, and HTTP/2 flow
    control pushes back on it instead of responses piling up in memory. When the client goes
    away, every running request is cancelled, so nothing leaks."""
    done: asyncio.Queue[Resp | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(msg: Req) -> None:
        try:
            response = await handle(msg)
        except BaseException:
            slots.release()
            raise
        done.put_nowait(response)

    async def reader() -> None:
        try:
            async for msg in requests:
                await slots.acquire()
                task = asyncio.create_task(one(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            done.put_nowait(None)

    read_task = asyncio.create_task(reader())
    try:
        while (item := await done.get()) is not None:
            yield item
            slots.release()
        await read_task  # a broken request stream ends the call with its error
    finally:
        read_task.cancel()
        for task in list(tasks):
            task.cancel()
