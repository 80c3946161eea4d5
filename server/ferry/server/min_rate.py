"""One rule for a stream a client sends: no pause longer than ``idle`` seconds, and, once
``idle`` has passed, an average of ``rate`` bytes a second (a stream may take ``idle`` seconds
plus one per ``rate`` bytes). A pause bound alone let a client trickling a byte (or an empty
message) now and then hold its stream, and what the server kept for it, for ever (slowloris).

Both the HTTP listener's body reader and the gRPC upload judge their streams by it."""

from __future__ import annotations

import asyncio


class MinRate:
    """The bound of one stream, started when it is made (in the running event loop)."""

    def __init__(self, idle: float, rate: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.began = self._loop.time()
        self.idle = idle
        self.rate = rate
        self.by_rate = False  # which bound the last deadline() was: the average rate's

    def deadline(self, received: int) -> float:
        """The loop time by which the next bytes must arrive, ``received`` having come so far:
        the sooner of a pause's bound and the time the bytes so far allow."""
        pause = self._loop.time() + self.idle
        allowed = self.began + self.idle + received / self.rate
        self.by_rate = allowed < pause
        return min(pause, allowed)

    def too_slow(self, received: int, what: str) -> str:
        """Why the rate's bound cut the stream off, ``what`` naming the stream."""
        return (
            f"{received} bytes in {self._loop.time() - self.began:.1f} seconds, where {what} "
            f"may take {self.idle:g} seconds plus one per {self.rate:g} bytes"
        )
