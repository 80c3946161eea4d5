"""DynamicBatcher's guarantees, property-checked: whatever the arrivals, sizes, keys, priorities,
deadlines, cancellations, instances and handler speeds, no item runs after its deadline as
predicted when its batch starts, every submit ends exactly once (a result, a refusal, an expiry
or its cancellation), a batch goes to the best priority queued, and no batch mixes keys or
exceeds max_batch_size.

Deterministic: the batcher runs on an event loop whose clock jumps to its next timer instead of
sleeping (as bench/batch_deadlines.py does), so queue delays, deadlines and handler runs are
simulated time, each example takes milliseconds, and a failure replays exactly.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.server.batching.batcher import BatchInfo, DynamicBatcher, Failed, _Entry
from ferry.server.errors import DeadlineExceeded, LimitExceeded, QueueFull


class _Jump(selectors.DefaultSelector):
    """No file descriptor ever becomes ready: a select() that would block moves the clock."""

    def __init__(self, loop: _SimLoop) -> None:
        super().__init__()
        self._sim = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout:
            self._sim.now += timeout
        return super().select(0)


class _SimLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_Jump(self))

    def time(self) -> float:
        return self.now


@dataclass(frozen=True)
class Req:
    n: int
    size: int
    key: int
    prio: int
    gap: float  # seconds after the previous arrival
    deadline: float | None  # seconds after its arrival
    cancel_after: float | None  # the caller goes away this long after its arrival
    fails: bool  # the handler answers it with Failed


@dataclass
class Launch:
    at: float
    predicted_end: float  # start + the run predicted for the batch (start: estimate unknown)
    reqs: list[Req]
    best_queued: int | None  # the best priority still queued once the batch was taken


class Recording(DynamicBatcher[Req, int]):
    """The batcher under test, noting each batch as it leaves the queue: the prediction it was
    formed on, and what it left queued."""

    launches: list[Launch]

    def _launch(self, batch: list[_Entry[Req, int]], units: int, now: float) -> None:
        cost = sum(e.cost for e in batch)
        predicted = self._predict(units, cost) if self.service_time.ready else 0.0
        left = [e.prio for e in self._queued()]
        self.launches.append(
            Launch(now, now + predicted, [e.item for e in batch], min(left) if left else None)
        )
        super()._launch(batch, units, now)


# Times are in units of a batch's fixed cost (FIXED), so deadlines, gaps and delays land near
# the runs they compete with: a batch growing past its tightest deadline needs a deadline a few
# runs long, and rows arriving within one run.
FIXED = 0.002


def _times(*factors: float) -> st.SearchStrategy[float]:
    return st.sampled_from([f * FIXED for f in factors])


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    limit = draw(st.sampled_from([0, 1, 2, 4, 4, 6, 6]))
    reqs = []
    for n in range(draw(st.integers(4, 30))):
        reqs.append(
            Req(
                n=n,
                # Mostly one row, now and then up to one over the limit (refused).
                size=draw(st.sampled_from([1, 1, 1, 2, max(limit, 1), max(limit, 1) + 1])),
                key=draw(st.sampled_from([0, 0, 1, 2])),
                prio=draw(st.integers(0, 2)),
                gap=draw(_times(0.0, 0.0, 0.0, 0.25, 1.0, 3.0)),
                # The first has none: a batch runs, and what follows is judged on an estimate.
                deadline=None if n == 0 else draw(st.none() | _times(1.2, 2.0, 3.0, 5.0, 10.0)),
                cancel_after=draw(st.none() | st.none() | _times(0.0, 1.0, 4.0)),
                fails=draw(st.integers(0, 5)) == 0,
            )
        )
    return {
        "reqs": reqs,
        "limit": limit,
        "delay": draw(_times(0.0, 0.5, 2.0)),
        "concurrency": draw(st.sampled_from([1, 1, 2, 3])),
        "queue_size": draw(st.sampled_from([1, 4, 30, 30])),
        "preferred": draw(st.sets(st.integers(1, 6), max_size=2)),
        "per_unit": draw(_times(0.0, 0.25, 1.0)),
        # Each batch's run is its line times the next of these: a model whose speed wanders.
        "noise": draw(st.lists(st.sampled_from([0.5, 1.0, 1.0, 1.5, 3.0]), min_size=1)),
        "costly": draw(st.booleans()),
    }


async def _run(
    sc: dict[str, Any],
) -> tuple[Recording, dict[int, Any], dict[int, float], list[list[Req]]]:
    loop = asyncio.get_running_loop()
    executed: list[list[Req]] = []
    noise = sc["noise"]

    async def handler(items: Sequence[Req], info: BatchInfo) -> list[int | Failed]:
        executed.append(list(items))
        factor = noise[(len(executed) - 1) % len(noise)]
        await asyncio.sleep((FIXED + sc["per_unit"] * info.size) * factor)
        return [Failed(ValueError(f"item {r.n}")) if r.fails else r.n * 10 for r in items]

    def key_of(r: Req) -> Hashable:
        return r.key

    b = Recording(
        handler,
        max_batch_size=sc["limit"],
        max_queue_delay=sc["delay"],
        max_queue_size=sc["queue_size"],
        max_concurrency=sc["concurrency"],
        batch_size_of=lambda r: r.size,
        batch_key=key_of,
        cost_of=(lambda r: r.size * (1 + r.key)) if sc["costly"] else None,
        preferred_sizes=sorted(sc["preferred"]),
        clock=loop.time,
    )
    b.launches = []
    outcomes: dict[int, Any] = {}
    dues: dict[int, float] = {}

    async def one(r: Req) -> None:
        due = None if r.deadline is None else loop.time() + r.deadline
        if due is not None:
            dues[r.n] = due
        try:
            outcomes[r.n] = ("result", await b.submit(r, deadline=due, priority=r.prio))
        except asyncio.CancelledError:
            outcomes[r.n] = ("cancelled", None)
        except Exception as exc:
            outcomes[r.n] = ("error", exc)

    tasks = []
    for r in sc["reqs"]:
        await asyncio.sleep(r.gap)
        task = loop.create_task(one(r))
        tasks.append(task)
        if r.cancel_after is not None:
            loop.call_later(r.cancel_after, task.cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    for r, task in zip(sc["reqs"], tasks, strict=True):
        if task.cancelled():  # cancelled before it reached submit: nothing to answer
            outcomes.setdefault(r.n, ("cancelled", None))
    await b.close()
    return b, outcomes, dues, executed


async def _guarded(
    sc: dict[str, Any],
) -> tuple[Recording, dict[int, Any], dict[int, float], list[list[Req]]]:
    """A submit never answered hangs the scenario: an hour of simulated time (a few ms of real
    time) ends it, where every scenario is over in a few simulated seconds."""
    async with asyncio.timeout(3600):
        return await _run(sc)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(scenarios())
def test_the_batchers_guarantees_hold_for_any_traffic(sc: dict[str, Any]) -> None:
    loop = _SimLoop()
    try:
        b, outcomes, dues, executed = loop.run_until_complete(_guarded(sc))
    finally:
        loop.close()
    reqs = {r.n: r for r in sc["reqs"]}
    limit = sc["limit"]

    # Every submit ended exactly once, with an answer its item can have.
    assert sorted(outcomes) == sorted(reqs)
    runs = [r.n for batch in executed for r in batch]
    assert len(runs) == len(set(runs)), "an item was executed twice"
    for n, (kind, value) in outcomes.items():
        r = reqs[n]
        if kind == "result":
            assert value == n * 10 and n in runs and not r.fails
        elif kind == "error":
            if isinstance(value, ValueError):
                assert r.fails and n in runs and str(value) == f"item {n}"
            elif isinstance(value, LimitExceeded):
                assert limit and r.size > limit
            else:
                assert isinstance(value, QueueFull | DeadlineExceeded), repr(value)
                assert n not in runs, f"{n} was executed and answered {value!r}"
        else:
            assert kind == "cancelled" and r.cancel_after is not None

    # What ran is what the batcher launched, batch for batch.
    assert [[r.n for r in launch.reqs] for launch in b.launches] == [
        [r.n for r in batch] for batch in executed
    ]
    for launch in b.launches:
        batch = launch.reqs
        # No item starts in a batch predicted to end at or after its deadline.
        for r in batch:
            if r.n in dues:
                assert launch.predicted_end < dues[r.n], (
                    f"item {r.n} (deadline {dues[r.n]}) ran in a batch predicted to end at "
                    f"{launch.predicted_end}"
                )
        # One key per batch, never over max_batch_size (one item per batch without batching).
        assert len({r.key for r in batch}) == 1
        if limit:
            assert sum(r.size for r in batch) <= limit
        else:
            assert len(batch) == 1
        # Nothing of a better priority is left queued when a batch goes.
        if launch.best_queued is not None:
            assert min(r.prio for r in batch) <= launch.best_queued
    assert b.queue_depth == 0 and b.in_flight == 0
