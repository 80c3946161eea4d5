"""Per-version counters on /metrics that never go down while their series is served.

A version loaded again in place (its files changed, then a load or a poll) is a new load whose
statistics start from zero: ModelStatistics then counts since that load, as Triton's does. Its
Prometheus series, though, never left: ``ferry_inferences_total{model, version}`` read 4 and
then 0, and ``increase()`` over the reload lost what came before it. Triton's counters go on
across a reload (the new load shares the old one's reporter while both exist).

The rule: a version's series lives from its load until it is unloaded, whether or not a scrape
saw it go; within it, each counter is what every load of it counted, so it never goes down.
Each snapshot names its load and its series (``VersionStatistics.load``, ``series``; a reload
in place keeps the series, core.registry), so a new load is told by its name, never by counts
going down: a reload whose new load outcounted the old one before the next scrape read as no
reload, and the old load's counts were lost. A load that a scrape showed and the next does not
show, in a series that goes on, is carried at what that scrape showed into every later one:
what it counted after that scrape is missed, at most one scrape interval, never counted twice,
as for a worker that died (docs/deployment.md). A version unloaded (loaded again or not) ends
its series, and what was carried for it: loaded again between two scrapes, it counts from zero,
a drop Prometheus reads as the reset it is (it carried the unloaded load's counts before).
The series is the first process's: with ``--workers``, the other workers' loads and what the
first keeps of dead ones (workers.peers) are carried the same way within it.
"""

from __future__ import annotations

import dataclasses
import threading

from ferry.server.core.stats_merge import merge
from ferry.server.core.types import VersionStatistics

Version = tuple[str, int]
Load = tuple[str, int, str]


def _load(s: VersionStatistics) -> Load:
    return (s.name, s.version, s.load)


class Carried:
    """What ended loads of each served version counted, added to what its loads count now.
    Scrapes run on the metrics listener's threads, two at once at times: one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # At the last compared read: each load's counts, and each version's series.
        self._last: dict[Load, VersionStatistics] = {}
        self._series: dict[Version, str | None] = {}
        self._carried: dict[Version, VersionStatistics] = {}
        # Reads numbered as they begin, and the latest one compared: two scrapes at once read
        # the statistics outside the lock, and the earlier read's counts, compared after the
        # later one's, looked like a new load that carried the later one's into every scrape.
        self._begun = 0
        self._compared = 0

    def begin(self) -> int:
        """Called before a scrape reads the statistics: its number for ``add``."""
        with self._lock:
            self._begun += 1
            return self._begun

    def add(
        self, own: list[VersionStatistics], others: list[VersionStatistics], read: int
    ) -> list[VersionStatistics]:
        """One snapshot per served version: ``own`` (this process's, one per load it serves)
        and ``others`` (the other workers', per load), read after ``begin`` gave ``read``,
        added up with what each version's ended loads counted."""
        with self._lock:
            if read >= self._compared:  # else a later read was compared already
                self._compared = read
                self._compare(own, others)
            return [self._with_carried(s) for s in merge([*own, *others])]

    def _with_carried(self, s: VersionStatistics) -> VersionStatistics:
        carried = self._carried.get((s.name, s.version))
        return s if carried is None else merge([s, carried])[0]

    def _compare(self, own: list[VersionStatistics], others: list[VersionStatistics]) -> None:
        """Under the lock: loads gone since the last compared read, in a series that goes on,
        are carried; a series that ended takes what it carried with it."""
        now = {_load(s): s for s in [*own, *others]}
        served = {(s.name, s.version) for s in now.values()}
        series: dict[Version, str | None] = {key: None for key in served}
        series.update({(s.name, s.version): s.series for s in own})
        going_on = {
            key for key in served if key in self._series and self._series[key] == series[key]
        }
        for key in [k for k in self._carried if k not in going_on]:
            del self._carried[key]  # unloaded since: its counts leave with it
        for load, before in self._last.items():
            key = load[:2]
            if load in now or key not in going_on:
                continue
            # A load that ended: the gauge (what was queued then) is not carried.
            ended = dataclasses.replace(before, queue_depth=0)
            prior = self._carried.get(key)
            self._carried[key] = ended if prior is None else merge([prior, ended])[0]
        self._last = now
        self._series = series
