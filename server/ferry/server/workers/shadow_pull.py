"""The first worker's reading of the other workers' shadow comparisons (``--workers N``).

A shadow compares a share of the requests every worker serves, each worker its own share, but
one process decides (the first, which owns management): its rules must judge the comparison
of every worker added up, and GetRollout and /metrics show that sum (core.shadow_sum).

Asking the others after every shadow outcome would put a call to every process on each
shadowed request; instead the first worker reads them all on a short period while a shadow is
set (and until their last runs have ended), and sums with what it read last. So:

* a rollback is decided on the figures as last read, with this process's own up to date: the
  disagreement it saw is evidence enough, whoever compared it;
* a promotion is decided only right after a pull that every worker answered (``soon`` asks
  for one at once), so a candidate is never promoted on figures that miss what another
  worker compared since: one that did not answer in time adds what it answered last, and the
  promotion waits for a later pull;
* GetRollout pulls first (management, never the serving path); a scrape reads what the last
  pull read (at most ``PERIOD`` old), so it adds no call to its own.

Pulls never overlap: two answers of one worker recorded out of order would make its figures,
and the sum, go back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ferry.server.core.dataplane import DataPlane, ShadowStatistics
from ferry.server.workers.peers import Peers

log = logging.getLogger(__name__)

PERIOD = 1.0  # seconds between pulls while a shadow is set


class ShadowPull:
    """core.shadow_sum.PeerShadows over the control sockets."""

    def __init__(self, peers: Peers, dataplane: DataPlane, period: float = PERIOD) -> None:
        self._peers = peers
        self._dataplane = dataplane
        self._period = period
        self._wake = asyncio.Event()
        self._one_at_a_time = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def latest(self) -> list[ShadowStatistics]:
        return self._peers.shadow_rows()

    def latest_splits(self) -> list[list[Any]]:
        return self._peers.split_rows()

    async def pull(self) -> bool:
        async with self._one_at_a_time:
            return await self._peers.shadows()

    def soon(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._period)
            self._wake.clear()
            try:
                await self.once()
            except Exception:  # the next period tries again; serving never depends on it
                log.exception("reading the workers' shadow comparisons failed")

    async def once(self) -> None:
        """One pull and the rules on its sum, when there is anything to read: a shadow set, a
        split ruled by max_error_rate (its counts, core.split_sum), or a worker whose runs of
        a shadow were still in flight at the last pull (their outcomes belong in the sum
        /metrics shows after the shadow ended)."""
        splits = self._dataplane.split_ruled_models()
        if (
            not splits
            and not self._dataplane.shadowed_models()
            and not any(s.in_flight for s in self.latest())
        ):
            return
        every_worker = await self.pull()
        self._dataplane.judge_shadows(every_worker)
        own = self._dataplane.own_shadow_statistics()
        self._peers.prune_retired_shadows({s.model: s.key for s in own})
        if splits:
            # A rollback needs no answer from every worker: the failures read are evidence.
            self._dataplane.judge_splits()
        self._peers.prune_retired_splits(self._dataplane.split_keys())
