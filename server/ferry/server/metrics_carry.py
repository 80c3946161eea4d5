"""Per-version counters on /metrics that never go down while every scrape shows their series.

A version loaded again in place (its files changed, then a load or a poll) is a new load whose
statistics start from zero: ModelStatistics then counts since that load, as Triton's does. Its
Prometheus series, though, never left: ``ferry_inferences_total{model, version}`` read 4 and
then 0, and ``increase()`` over the reload lost what came before it. Triton's counters go on
across a reload (the new load shares the old one's reporter while both exist).

The rule: a counter never goes down for one label set unless a scrape saw the series gone.
Prometheus reads a counter from its scrapes alone: a new load that outcounted the old before
the next scrape reads as growth, never as the reset it was, whether it came from a reload in
place or from an unload and a load between two scrapes. So each snapshot names its load
(``VersionStatistics.load``), and a new load is told by that name, never by counts going down:
a load that a scrape showed and the next does not show, of a version that scrape still shows,
is carried at what that scrape showed into every later one. What it counted after that scrape
is missed, at most one scrape interval, never counted twice, as for a worker that died
(docs/deployment.md). A version absent from a scrape was unloaded: its series and what it
carried leave with it, and a later load of it starts from zero (a new series to Prometheus).
With ``--workers`` the other workers' loads, and what the first keeps of dead ones
(workers.peers), are carried the same way.
"""

from __future__ import annotations

import dataclasses
import threading

from ferry.server.core.shadow import ShadowStatistics
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
        self._last: dict[Load, VersionStatistics] = {}  # each load's, at the last compared read
        self._carried: dict[Version, VersionStatistics] = {}
        # The loads whose counts _carried holds: a read overtaken by a later compared one may
        # still hold such a load, and showing it beside what was carried counted it twice.
        self._ended: set[Load] = set()
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
            else:
                # Read before a load ended that a later read, compared already, carried: its
                # counts are in _carried (20 shown for 10 served, then 13 read as a reset).
                return self._overtaken([*own, *others])
            return [self._with_carried(s) for s in merge([*own, *others])]

    def _overtaken(self, read: list[VersionStatistics]) -> list[VersionStatistics]:
        """Under the lock: an overtaken read's versions, its ended loads shown by what was
        carried of them alone."""
        live = [s for s in read if _load(s) not in self._ended]
        shown = {(s.name, s.version) for s in live}
        only_carried = [
            self._carried[key]
            for key in dict.fromkeys((s.name, s.version) for s in read)
            if key not in shown and key in self._carried
        ]
        return [*(self._with_carried(s) for s in merge(live)), *only_carried]

    def _with_carried(self, s: VersionStatistics) -> VersionStatistics:
        carried = self._carried.get((s.name, s.version))
        return s if carried is None else merge([s, carried])[0]

    def _compare(self, own: list[VersionStatistics], others: list[VersionStatistics]) -> None:
        """Under the lock: loads gone since the last compared read, of a version this read
        still shows, are carried; a version it does not show takes what it carried with it."""
        now = {_load(s): s for s in [*own, *others]}
        shown = {load[:2] for load in now}
        for key in [k for k in self._carried if k not in shown]:
            del self._carried[key]  # unloaded: its counts leave with it
        self._ended = {load for load in self._ended if load[:2] in self._carried}
        for load, before in self._last.items():
            key = load[:2]
            if load in now or key not in shown:
                continue
            # A load that ended: the gauge (what was queued then) is not carried.
            ended = dataclasses.replace(before, queue_depth=0)
            prior = self._carried.get(key)
            self._carried[key] = ended if prior is None else merge([prior, ended])[0]
            self._ended.add(load)
        self._last = now


Shadow = tuple[str, int]  # (model, candidate): a shadow counter's labels


class ShadowCarried:
    """The same rule for the shadow comparison's counters (compared, errors, shed), labelled by
    model and candidate: a comparison started afresh (a shadow set again, its rules changed,
    a file replaced) counts from zero in GetRollout, where the rules judge it, but on /metrics
    what the comparisons before it showed goes on under the same labels, until a scrape does
    not show them (the shadow ended, or nothing compared yet)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[Shadow, tuple[str, tuple[int, int, int]]] = {}  # comparison, counts
        self._carried: dict[Shadow, tuple[int, int, int]] = {}
        self._ended: set[tuple[Shadow, str]] = set()  # comparisons whose counts are carried
        self._begun = 0
        self._compared = 0  # reads numbered as for Carried: an overtaken one compares nothing

    def begin(self) -> int:
        with self._lock:
            self._begun += 1
            return self._begun

    def add(self, shadows: list[ShadowStatistics], read: int) -> dict[Shadow, tuple[int, int, int]]:
        """What each shown comparison's counters read with the earlier ones' carried."""
        with self._lock:
            now = {(s.model, s.candidate): (s.key, (s.compared, s.errors, s.shed)) for s in shadows}
            if read >= self._compared:
                self._compared = read
                for key in [k for k in self._carried if k not in now]:
                    del self._carried[key]  # not shown: the series ends
                self._ended = {e for e in self._ended if e[0] in self._carried}
                for key, (comparison, counts) in self._last.items():
                    if key in now and now[key][0] != comparison:  # started afresh since
                        prior = self._carried.get(key, (0, 0, 0))
                        self._carried[key] = _plus(prior, counts)
                        self._ended.add((key, comparison))
                self._last = now
            else:
                # Overtaken by a later read, compared already, that carried this read's
                # comparison: its counts are in _carried, shown once.
                now = {
                    key: (comparison, (0, 0, 0) if (key, comparison) in self._ended else counts)
                    for key, (comparison, counts) in now.items()
                }
            return {key: _plus(self._carried.get(key, (0, 0, 0)), c) for key, (_, c) in now.items()}


def _plus(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int, int]:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])
