"""Coalesced: a burst of requests runs the job once or twice, and none is dropped."""

from __future__ import annotations

import asyncio

from ferry.server.coalesced import Coalesced


def test_a_burst_runs_once_and_a_request_during_a_run_runs_it_again() -> None:
    async def main() -> None:
        runs = 0
        entered = asyncio.Event()
        release = asyncio.Event()

        async def job() -> None:
            nonlocal runs
            runs += 1
            entered.set()
            await release.wait()

        c = Coalesced(job)
        for _ in range(10):
            c.request()  # a burst before the job starts: one run
        await entered.wait()
        assert runs == 1
        entered.clear()
        c.request()  # while it runs: it must go round once more, not be dropped
        c.request()
        release.set()
        await entered.wait()
        await c.cancel()
        assert runs == 2

    asyncio.run(main())


def test_cancel_stops_a_run_in_progress() -> None:
    async def main() -> None:
        started = asyncio.Event()
        finished = False

        async def job() -> None:
            nonlocal finished
            started.set()
            await asyncio.Event().wait()  # never set: only cancel ends it
            finished = True

        c = Coalesced(job)
        c.request()
        await started.wait()
        await c.cancel()
        assert not finished

    asyncio.run(main())
