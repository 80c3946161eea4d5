"""Every stream together: a client that sends without reading holds at most its stream's bound,
and past the process's budget each stream runs one request at a time, so many such streams
cannot hold answers without end while a stream whose client reads goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ferry.server.core.streams import StreamBudget, run_stream


async def _requests(count: int, pulled: list[int]) -> AsyncIterator[int]:
    for i in range(count):
        pulled.append(i)
        yield i


async def _answer(x: int) -> int:
    return x * 10


async def _settle() -> None:
    """Let every ready task run until none can go on (no clock involved)."""
    for _ in range(200):
        await asyncio.sleep(0)


def test_streams_that_never_read_cannot_hold_more_than_the_budget() -> None:
    async def scenario() -> None:
        budget = StreamBudget(4)
        silent_pulled: list[int] = []
        silent = run_stream(_requests(50, silent_pulled), _answer, 4, budget)
        assert await silent.__anext__() == 0  # the client read one answer, then stopped
        await _settle()
        assert budget.held == 4 and budget.full  # its own bound: 4 held

        # A stream whose client reads goes on, one request at a time, to the end.
        honest_pulled: list[int] = []
        honest = [a async for a in run_stream(_requests(20, honest_pulled), _answer, 4, budget)]
        assert honest == [i * 10 for i in range(20)]
        assert budget.held == 4  # the honest stream gave back all it held

        # More silent streams past the budget add one request each, not their whole bound.
        others = []
        for _ in range(3):
            other = run_stream(_requests(50, []), _answer, 4, budget)
            assert await other.__anext__() == 0
            others.append(other)
        await _settle()
        assert budget.held == 4 + 3

        # A silent client that reads again goes on (one at a time while the budget is full).
        assert [await others[0].__anext__() for _ in range(5)] == [10, 20, 30, 40, 50]

        for stream in [silent, *others]:
            await stream.aclose()
        assert budget.held == 0  # every share given back with its stream
        assert len(silent_pulled) <= 4 + 1  # what the silent stream read: its bound and one

    asyncio.run(scenario())


def test_a_stream_under_the_budget_keeps_its_whole_bound_in_flight() -> None:
    """The budget changes nothing for streams that stay under it."""

    async def scenario() -> None:
        budget = StreamBudget(16)
        gate = asyncio.Event()
        started = 0

        async def slow(x: int) -> int:
            nonlocal started
            started += 1
            await gate.wait()
            return x

        stream = run_stream(_requests(8, []), slow, 8, budget)
        first = asyncio.ensure_future(stream.__anext__())
        await _settle()
        assert started == 8 and budget.held == 8  # all eight run at once
        gate.set()
        assert await first == 0
        rest = [a async for a in stream]
        assert sorted(rest) == list(range(1, 8)) and budget.held == 0

    asyncio.run(scenario())
