"""Per-version counters on /metrics that never go down while their series stays.

A version loaded again in place (its files changed, then a load or a poll) is a new load whose
statistics start from zero: ModelStatistics then counts since that load, as Triton's does. Its
Prometheus series, though, never left: ``ferry_inferences_total{model, version}`` read 4 and
then 0, and ``increase()`` over the reload lost what came before it. Triton's counters go on
across a reload (the new load shares the old one's reporter while both exist). So each scrape
compares a version's counts with what the previous scrape rendered: counts that went down are a
new load, and what the previous scrape showed is carried into every later one. What the old
load counted after that scrape is missed, at most one scrape interval, never counted twice, as
for a worker that died (docs/deployment.md). A version absent from a scrape was unloaded: its
series and what it carried leave with it, as its statistics do.
"""

from __future__ import annotations

import dataclasses
import threading

from ferry.server.core.stats_merge import merge
from ferry.server.core.types import VersionStatistics


def _counts(s: VersionStatistics) -> tuple[int, ...]:
    """Counters of a load that only grow while it is loaded."""
    return (
        s.inference_count,
        s.execution_count,
        s.success.count,
        s.fail.count,
        s.queue.count,
        s.compute_infer.count,
        s.rejected,
        s.expired,
        sum(b.compute_infer.count for b in s.batches),
        s.plan_changes,
        sum(n for _, n in s.planned_executions),
        sum(n for _, n in s.device_executions),
    )


class Carried:
    """What earlier loads of each served version counted, added to what its load counts now.
    Scrapes run on the metrics listener's threads, two at once at times: one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, int], VersionStatistics] = {}
        self._carried: dict[tuple[str, int], VersionStatistics] = {}
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

    def add(self, stats: list[VersionStatistics], read: int) -> list[VersionStatistics]:
        """``stats`` (one per served version, summed over the workers, read after ``begin``
        gave ``read``) with what each version's earlier loads counted added."""
        with self._lock:
            if read < self._compared:
                # A later read was compared already: older counts are not a new load.
                return [self._with_carried(s) for s in stats]
            self._compared = read
            return self._compare(stats)

    def _with_carried(self, s: VersionStatistics) -> VersionStatistics:
        carried = self._carried.get((s.name, s.version))
        return s if carried is None else merge([s, carried])[0]

    def _compare(self, stats: list[VersionStatistics]) -> list[VersionStatistics]:
        """Under the lock: counts below the last compared read's are a new load."""
        out = []
        seen = {}
        for s in stats:
            key = (s.name, s.version)
            seen[key] = s
            before = self._last.get(key)
            if before is not None and any(
                now < then for now, then in zip(_counts(s), _counts(before), strict=True)
            ):
                # A new load: the gauge (what was queued then) is not carried.
                ended = dataclasses.replace(before, queue_depth=0)
                prior = self._carried.get(key)
                self._carried[key] = ended if prior is None else merge([prior, ended])[0]
            out.append(self._with_carried(s))
        for key in [k for k in self._carried if k not in seen]:
            del self._carried[key]  # unloaded: its counts leave with it
        self._last = seen
        return out
