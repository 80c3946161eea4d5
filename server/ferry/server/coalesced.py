"""A job the event loop runs after changes, once per burst of them rather than once each."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Coalesced:
    """``request()`` starts ``job`` on the running loop unless it is running already; a request
    that arrives while it runs (the job awaits) makes it go round once more, so no change is
    dropped and a burst of changes costs one or two runs, not one per change."""

    def __init__(self, job: Callable[[], Awaitable[None]]) -> None:
        self._job = job
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._dirty:
            self._dirty = False
            await self._job()

    async def cancel(self) -> None:
        """Stop a run in progress and wait for it to end."""
        self._dirty = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
