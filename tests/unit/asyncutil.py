"""Deterministic asyncio for the unit tests (the batcher's, the registry's): a fake clock the test sets, a bounded
yield-until, and a hang guard. Ordering, never elapsed time, decides what a test observes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

GUARD_S = 20.0
# The hang guard of tests that open real onnxruntime sessions, which a loaded box makes slow.
LOAD_GUARD_S = 60.0


def arun(fn: Callable[[], Awaitable[None]], guard_s: float = GUARD_S) -> None:
    """Run ``fn`` in a fresh loop; the timeout only stops a hang, it checks nothing."""

    async def guarded() -> None:
        async with asyncio.timeout(guard_s):
            await fn()

    asyncio.run(guarded())


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def until(pred: Callable[[], bool], spins: int = 1000) -> None:
    """Yield to the loop until ``pred`` holds: ordering, not time, decides when it does."""
    for _ in range(spins):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


class WatchedLock(asyncio.Lock):
    """A model's edit lock that says when an edit has come to wait behind its holder."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.queued.set()
        return await super().acquire()
