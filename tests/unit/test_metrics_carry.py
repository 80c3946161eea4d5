"""metrics_carry: a version's counters on /metrics never go down, nor count a load twice."""

from __future__ import annotations

from ferry.server.core.shadow import ShadowStatistics
from ferry.server.core.types import Duration, VersionStatistics
from ferry.server.metrics_carry import Carried, ShadowCarried


def _stats(load: str, count: int) -> VersionStatistics:
    return VersionStatistics(
        name="m",
        version=1,
        last_inference_ms=0,
        inference_count=count,
        execution_count=count,
        success=Duration(count, count),
        fail=Duration(),
        queue=Duration(),
        compute_input=Duration(),
        compute_infer=Duration(),
        compute_output=Duration(),
        batches=(),
        rejected=0,
        expired=0,
        queue_depth=0,
        load=load,
    )


def _counts(shown: list[VersionStatistics]) -> list[int]:
    return [s.inference_count for s in shown]


def test_an_overtaken_scrape_does_not_add_a_carried_load_twice() -> None:
    """Two scrapes at once around a reload: the later read, compared first, carried the old
    load's 10; the earlier read still held that old load and showed it on top of what was
    carried (20), more than was ever served, and the next scrape's 13 read as a reset."""
    carried = Carried()
    assert _counts(carried.add([_stats("a", 10)], [], carried.begin())) == [10]
    early, late = carried.begin(), carried.begin()
    assert _counts(carried.add([_stats("b", 2)], [], late)) == [12]
    # The earlier read saw the old load before it ended: no more than the version served.
    assert _counts(carried.add([_stats("a", 10)], [], early)) == [10]
    assert _counts(carried.add([_stats("b", 3)], [], carried.begin())) == [13]


def test_an_overtaken_scrape_does_not_add_a_carried_comparison_twice() -> None:
    """The same for a shadow comparison started afresh between two scrapes at once."""
    carried = ShadowCarried()

    def shown(key: str, compared: int, read: int) -> tuple[int, int, int]:
        stats = ShadowStatistics(candidate=2, model="m", compared=compared, key=key)
        return carried.add([stats], read)[("m", 2)]

    assert shown("a", 10, carried.begin()) == (10, 0, 0)
    early, late = carried.begin(), carried.begin()
    assert shown("b", 2, late) == (12, 0, 0)
    assert shown("a", 10, early) == (10, 0, 0)
    assert shown("b", 3, carried.begin()) == (13, 0, 0)
