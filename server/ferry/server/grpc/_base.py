"""Shared plumbing of the protocol adapters: error translation and deadlines."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from grpc import aio

from ferry.server.grpc.status import status_of, trailing

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def translate_errors(fn: F) -> F:
    """Turn any exception escaping a unary handler into a status from the one table."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            code, message, kind = status_of(exc)
            context.set_trailing_metadata(trailing(kind))
            await context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def call_deadline(context: aio.ServicerContext) -> float | None:
    """The call's gRPC deadline on the monotonic clock, or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining


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
