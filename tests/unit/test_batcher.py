"""DynamicBatcher: dispatch policy, limits, deadlines, cancellation and shutdown.

Deterministic by construction: batches are held by Event gates inside a fake handler, time is a
fake clock the test sets, and the only real timers are tiny ones whose firing the test awaits (never
a sleep followed by an assertion). ``asyncio.timeout`` in ``arun`` is a hang guard, not a check.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import pytest
from asyncutil import FakeClock, arun, until

from ferry.server.batching import batcher as batcher_module
from ferry.server.batching.batcher import BatchInfo, DynamicBatcher, Failed
from ferry.server.errors import (
    DeadlineExceeded,
    InternalError,
    LimitExceeded,
    QueueFull,
    Unavailable,
)


class Handler:
    """Records batches; every batch waits on ``gate`` when ``gated`` (released by the test)."""

    def __init__(self, *, gated: bool = False) -> None:
        self.gated = gated
        self.gate = asyncio.Event()
        self.batches: list[list[Any]] = []
        self.infos: list[BatchInfo] = []
        self.running = 0
        self.peak = 0

    @property
    def items(self) -> list[Any]:
        return [x for batch in self.batches for x in batch]

    async def __call__(self, items: Sequence[Any], info: BatchInfo) -> list[Any]:
        self.batches.append(list(items))
        self.infos.append(info)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.gated:
                await self.gate.wait()
        finally:
            self.running -= 1
        return [("ok", x) for x in items]


def spawn(b: DynamicBatcher[Any, Any], item: Any, **kw: Any) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(b.submit(item, **kw))


def live_timers(b: DynamicBatcher[Any, Any]) -> list[asyncio.TimerHandle]:
    """The batcher's pending loop timers (CPython's loop keeps them in ``_scheduled``)."""
    scheduled = getattr(asyncio.get_running_loop(), "_scheduled", [])
    return [
        h
        for h in scheduled
        if not h.cancelled() and getattr(getattr(h, "_callback", None), "__self__", None) is b
    ]


# --- run_now: an idle batcher's item runs in its caller -------------------------------------------


class RunNow:
    """A synchronous handler that takes a batch (``take``) or declines it (None)."""

    def __init__(self, *, take: bool = True, error: Exception | None = None) -> None:
        self.take = take
        self.error = error
        self.batches: list[list[Any]] = []
        self.infos: list[BatchInfo] = []

    def __call__(self, items: Sequence[Any], info: BatchInfo) -> list[Any] | None:
        if not self.take:
            return None
        self.batches.append(list(items))
        self.infos.append(info)
        if self.error is not None:
            raise self.error
        return [("now", x) for x in items]


def test_run_now_runs_an_idle_batchers_item_in_its_caller() -> None:
    async def main() -> None:
        h, now = Handler(), RunNow()
        b = DynamicBatcher(h, max_batch_size=8, run_now=now)
        assert await b.submit("x") == ("now", "x")
        assert await b.submit("y") == ("now", "y")
        assert now.batches == [["x"], ["y"]]
        assert [i.queue_ns for i in now.infos] == [[0], [0]]
        assert h.batches == []  # no task, no future: the caller ran it
        assert b.in_flight == 0
        assert b.service_time.ready  # its executions teach the predictor like any batch
        await b.close()

    arun(main)


def test_run_now_never_overtakes_queued_items_or_a_busy_slot() -> None:
    async def main() -> None:
        h, now = Handler(gated=True), RunNow()
        b = DynamicBatcher(h, max_batch_size=8, run_now=now)
        now.take = False
        hold = spawn(b, "hold")  # declined by run_now: runs on the (gated) handler
        await until(lambda: b.in_flight == 1)
        now.take = True
        tasks = [spawn(b, i, priority=0) for i in range(3)]
        await until(lambda: b.queue_depth == 3)
        assert now.batches == []  # the slot is busy: they queue, in order
        h.gate.set()
        assert await asyncio.gather(hold, *tasks) == [("ok", "hold")] + [
            ("ok", i) for i in range(3)
        ]
        assert h.batches == [["hold"], [0, 1, 2]]
        assert await b.submit("z") == ("now", "z")  # idle again
        await b.close()

    arun(main)


def test_run_now_that_declines_leaves_the_item_to_the_queue() -> None:
    async def main() -> None:
        h, now = Handler(), RunNow(take=False)
        b = DynamicBatcher(h, max_batch_size=8, run_now=now)
        assert await b.submit("x") == ("ok", "x")
        assert h.batches == [["x"]]
        assert b.in_flight == 0
        await b.close()

    arun(main)


def test_run_now_is_not_used_while_a_partial_batch_may_wait_for_company() -> None:
    async def main() -> None:
        h, now = Handler(), RunNow()
        b = DynamicBatcher(
            h, max_batch_size=4, max_queue_delay=3600.0, clock=FakeClock(), run_now=now
        )
        tasks = [spawn(b, i) for i in range(4)]
        assert await asyncio.gather(*tasks) == [("ok", i) for i in range(4)]
        assert h.batches == [[0, 1, 2, 3]]
        assert now.batches == []
        await b.close()

    arun(main)


def test_run_now_failure_reaches_its_caller_only_and_frees_the_slot() -> None:
    async def main() -> None:
        boom = ValueError("boom")
        h, now = Handler(), RunNow(error=boom)
        b = DynamicBatcher(h, max_batch_size=8, run_now=now)
        with pytest.raises(ValueError, match="boom"):
            await b.submit("x")
        assert b.in_flight == 0
        now.error = None
        assert await b.submit("y") == ("now", "y")
        await b.close()

    arun(main)


def test_run_now_item_is_still_judged_at_the_door() -> None:
    async def main() -> None:
        clock = FakeClock(100.0)
        now = RunNow()
        b = DynamicBatcher(Handler(), max_batch_size=8, clock=clock, run_now=now)
        with pytest.raises(DeadlineExceeded):
            await b.submit("late", deadline=99.0)
        await b.close()
        with pytest.raises(Unavailable):
            await b.submit("closed")
        assert now.batches == []

    arun(main)


# --- preferred sizes: a planned session's sizes ----------------------------------------------


def test_a_partial_batch_at_a_preferred_size_goes_at_once() -> None:
    async def main() -> None:
        h = Handler()
        b = DynamicBatcher(
            h, max_batch_size=8, max_queue_delay=3600.0, clock=FakeClock(), preferred_sizes=(4, 8)
        )
        tasks = [spawn(b, i) for i in range(6)]
        assert await asyncio.gather(*tasks[:4]) == [("ok", i) for i in range(4)]
        assert h.batches == [[0, 1, 2, 3]]  # four reached a planned size: no wait for eight
        assert b.queue_depth == 2  # two is not planned here: they wait for company
        await b.close()
        assert await asyncio.gather(*tasks[4:]) == [("ok", 4), ("ok", 5)]

    arun(main)


def test_between_preferred_sizes_the_delay_still_bounds_the_wait() -> None:
    async def main() -> None:
        # Frozen clock: only the flush timer can dispatch three items that are not a planned size.
        h = Handler()
        b = DynamicBatcher(
            h, max_batch_size=8, max_queue_delay=0.005, clock=FakeClock(), preferred_sizes=(4, 8)
        )
        first = [spawn(b, i) for i in range(4)]
        assert await asyncio.gather(*first) == [("ok", i) for i in range(4)]
        rest = [spawn(b, i) for i in range(4, 7)]
        assert await asyncio.gather(*rest) == [("ok", 4), ("ok", 5), ("ok", 6)]
        assert h.batches == [[0, 1, 2, 3], [4, 5, 6]]
        await b.close()

    arun(main)


# --- dispatch policy ---------------------------------------------------------------------------


def test_no_delay_at_low_load() -> None:
    async def main() -> None:
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=8, max_queue_delay=0.0)
        assert await b.submit("x") == ("ok", "x")
        assert await b.submit("y") == ("ok", "y")
        assert h.batches == [["x"], ["y"]]
        await b.close()

    arun(main)


def test_flush_on_size_without_waiting_for_delay() -> None:
    async def main() -> None:
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=4, max_queue_delay=3600.0, clock=FakeClock())
        tasks = [spawn(b, i) for i in range(5)]
        results = await asyncio.gather(*tasks[:4])
        assert results == [("ok", i) for i in range(4)]
        assert h.batches == [[0, 1, 2, 3]]
        assert h.infos[0].size == 4
        assert b.queue_depth == 1  # the fifth waits for company or the delay
        await b.close()  # draining does not wait out the delay
        assert await tasks[4] == ("ok", 4)
        assert h.batches == [[0, 1, 2, 3], [4]]

    arun(main)


def test_flush_on_delay_timer() -> None:
    async def main() -> None:
        # Frozen clock: only the batcher's own flush timer can dispatch this partial batch.
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=8, max_queue_delay=0.005, clock=FakeClock())
        results = await asyncio.gather(*(b.submit(i) for i in range(3)))
        assert results == [("ok", 0), ("ok", 1), ("ok", 2)]
        assert h.batches == [[0, 1, 2]]
        assert h.infos[0].size == 3
        await b.close()

    arun(main)


def test_delay_counts_from_oldest_item_on_injected_clock() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=8, max_queue_delay=3600.0, clock=clock)
        tasks = [spawn(b, "a")]
        await until(lambda: b.queue_depth == 1)
        clock.now = 3000.0
        tasks.append(spawn(b, "b"))
        await until(lambda: b.queue_depth == 2)
        clock.now = 3599.5
        tasks.append(spawn(b, "c"))
        await until(lambda: b.queue_depth == 3)
        assert h.batches == []
        clock.now = 3600.0  # "a" has now waited max_queue_delay: the next event flushes
        tasks.append(spawn(b, "d"))
        await asyncio.gather(*tasks)
        assert h.batches == [["a", "b", "c", "d"]]
        await b.close()

    arun(main)


def test_a_partial_batch_goes_when_a_deadline_would_otherwise_pass() -> None:
    """A lone request under a queue delay longer than its time left (the server's default
    timeout of 10 s against a 12 s delay) expired waiting for company and never ran."""

    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=8, max_queue_delay=12.0, clock=clock)
        task = spawn(b, "a", deadline=10.0)
        await until(lambda: b.queue_depth == 1)
        assert h.batches == []
        clock.now = 9.0  # a second to go: company may still come
        b._pump()
        assert h.batches == []
        clock.now = 9.999  # past the last start its deadline allows (10 s - run - margin)
        b._pump()
        await task
        assert h.batches == [["a"]]
        await b.close()
        assert live_timers(b) == []

    arun(main)


def test_a_batch_waiting_for_company_holds_up_no_other_key() -> None:
    """Requests of another size on a dynamic axis (another key) waited behind a partial batch
    of the head's key for its whole queue delay, a full batch included, with instances idle;
    one with a deadline shorter than that delay expired unrun. Each key is judged apart."""

    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler()
        key: Callable[[tuple[str, str]], Hashable] = lambda item: item[1]  # noqa: E731
        b = DynamicBatcher(
            h,
            max_batch_size=2,
            max_queue_delay=100.0,
            max_concurrency=2,
            batch_key=key,
            clock=clock,
        )
        waits = spawn(b, ("a1", "a"))  # partial: waits for company up to 100 s
        await until(lambda: b.queue_depth == 1)
        full = [spawn(b, ("b1", "b")), spawn(b, ("b2", "b"))]
        await until(lambda: len(h.batches) == 1)  # at once, at time 0
        assert await asyncio.gather(*full) == [("ok", ("b1", "b")), ("ok", ("b2", "b"))]
        assert h.batches == [[("b1", "b"), ("b2", "b")]]
        late = spawn(b, ("c1", "c"), deadline=10.0)
        await until(lambda: b.queue_depth == 2)
        clock.now = 9.999  # past the last start c1's deadline allows; a1 may wait on
        b._pump()
        await until(lambda: len(h.batches) == 2)
        assert await late == ("ok", ("c1", "c"))
        assert h.batches[1:] == [[("c1", "c")]] and b.queue_depth == 1
        await b.close()
        assert await waits == ("ok", ("a1", "a"))

    arun(main)


def test_a_higher_priority_batch_waiting_for_company_goes_before_a_lower_ones_batch() -> None:
    """A priority-1 request queued first, of another key (size on a dynamic axis) than four of
    priority 5 that filled a batch: the slot went to theirs, and it ran after them (a real
    server showed it), having waited for company as well. When a slot goes to a batch now, a
    higher priority's goes first, partial; at the same priority the ready batch goes (above)."""

    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler(gated=True)
        key: Callable[[tuple[str, str]], Hashable] = lambda item: item[1]  # noqa: E731
        b = DynamicBatcher(h, max_batch_size=2, max_queue_delay=100.0, batch_key=key, clock=clock)
        # A full batch first: it takes the one instance until the gate opens.
        holds = [spawn(b, ("hold1", "h")), spawn(b, ("hold2", "h"))]
        await until(lambda: b.in_flight == 1)
        high = spawn(b, ("p1", "a"), priority=1)  # partial: would wait for company
        await until(lambda: b.queue_depth == 1)
        low = [spawn(b, ("p5a", "b"), priority=5), spawn(b, ("p5b", "b"), priority=5)]
        await until(lambda: b.queue_depth == 3)
        h.gate.set()
        await until(lambda: len(h.batches) == 3)
        assert h.batches[1:] == [[("p1", "a")], [("p5a", "b"), ("p5b", "b")]]
        await asyncio.gather(*holds, high, *low)
        await b.close()

    arun(main)


def test_the_flush_timer_also_sends_a_higher_priority_batch_first() -> None:
    """The flush timer of a priority-5 batch (its delay over, by the timer's verdict) sent it
    ahead of a priority-1 request of another key waiting for company, where a batch found due
    by the clock gives the slot to the higher priority first (above)."""

    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler()
        key: Callable[[tuple[str, str]], Hashable] = lambda item: item[1]  # noqa: E731
        b = DynamicBatcher(h, max_batch_size=4, max_queue_delay=100.0, batch_key=key, clock=clock)
        low = spawn(b, ("p5", "b"), priority=5)  # its delay ends at 100
        await until(lambda: b.queue_depth == 1)
        clock.now = 10.0
        high = spawn(b, ("p1", "a"), priority=1)  # its delay ends at 110
        await until(lambda: b.queue_depth == 2)
        clock.now = 99.999  # the timer fires a little early by this clock: its verdict stands
        b._on_flush()
        await until(lambda: len(h.batches) == 1)
        assert h.batches == [[("p1", "a")]]
        await b.close()
        await asyncio.gather(low, high)

    arun(main)


def test_delay_follows_oldest_across_priorities_and_cancellation() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=8, max_queue_delay=100.0, clock=clock)
        old = spawn(b, "a", priority=1)
        await until(lambda: b.queue_depth == 1)
        clock.now = 10.0
        tasks = [spawn(b, "b", priority=0)]
        await until(lambda: b.queue_depth == 2)
        clock.now = 50.0
        old.cancel()  # the oldest leaves: the flush target moves to b's, 110
        with pytest.raises(asyncio.CancelledError):
            await old
        clock.now = 100.0
        tasks.append(spawn(b, "c", priority=1))
        await until(lambda: b.queue_depth == 2)
        assert h.batches == []
        clock.now = 110.0
        tasks.append(spawn(b, "d", priority=0))
        await asyncio.gather(*tasks)
        assert h.batches == [["b", "d", "c"]]
        await b.close()
        assert live_timers(b) == []

    arun(main)


def test_lower_priority_oldest_item_bounds_the_delay() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=8, max_queue_delay=100.0, clock=clock)
        tasks = [spawn(b, "a", priority=1)]
        await until(lambda: b.queue_depth == 1)
        clock.now = 60.0
        tasks.append(spawn(b, "b", priority=0))
        await until(lambda: b.queue_depth == 2)
        clock.now = 100.0
        tasks.append(spawn(b, "c", priority=0))
        await asyncio.gather(*tasks)
        assert h.batches == [["b", "c", "a"]]
        await b.close()

    arun(main)


def test_items_arriving_during_execution_form_the_next_batch() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=8)
        first = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        rest = [spawn(b, x) for x in "bcd"]
        await until(lambda: b.queue_depth == 3)
        assert h.batches == [["a"]]
        h.gate.set()
        assert await first == ("ok", "a")
        assert await asyncio.gather(*rest) == [("ok", "b"), ("ok", "c"), ("ok", "d")]
        assert h.batches == [["a"], ["b", "c", "d"]]
        await b.close()

    arun(main)


def test_max_batch_size_zero_runs_items_one_by_one() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=0, max_queue_delay=3600.0, clock=FakeClock())
        tasks = [spawn(b, i) for i in range(4)]
        await until(lambda: b.queue_depth == 3)
        h.gate.set()
        await asyncio.gather(*tasks)
        assert h.batches == [[0], [1], [2], [3]]
        assert [i.size for i in h.infos] == [1, 1, 1, 1]
        await b.close()

    arun(main)


def test_max_concurrency_two_runs_two_batches_never_three() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=1, max_concurrency=2)
        tasks = [spawn(b, i) for i in range(6)]
        await until(lambda: len(h.batches) == 2)
        assert b.in_flight == 2
        assert h.running == 2
        assert b.queue_depth == 4
        h.gate.set()
        await asyncio.gather(*tasks)
        assert h.peak == 2
        assert sorted(h.items) == list(range(6))
        assert b.in_flight == 0
        await b.close()

    arun(main)


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [
        (1, [["p0"], ["p1a"], ["p1b"], ["p3"], ["p5"]]),
        (3, [["p0", "p1a", "p1b"], ["p3", "p5"]]),
    ],
)
def test_priority_then_fifo(max_batch_size: int, expected: list[list[str]]) -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=max_batch_size)
        hold = spawn(b, "hold")
        await until(lambda: b.in_flight == 1)
        order = [("p5", 5), ("p1a", 1), ("p3", 3), ("p1b", 1), ("p0", 0)]
        tasks = [spawn(b, name, priority=prio) for name, prio in order]
        await until(lambda: b.queue_depth == 5)
        h.gate.set()
        await asyncio.gather(hold, *tasks)
        assert h.batches == [["hold"], *expected]
        await b.close()

    arun(main)


def test_a_shadow_run_queues_after_every_priority_a_client_can_send() -> None:
    """Shadow work is queued at the lowest priority: a client's priority, which the wire
    carries as uint32 (ferry.v1) or uint64 (the Open Inference Protocol), never sorts after it."""
    from ferry.server.core.shadow import SHADOW_PRIORITY

    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=1)
        hold = spawn(b, "hold")
        await until(lambda: b.in_flight == 1)
        order = [("shadow", SHADOW_PRIORITY), ("v1", 2**32 - 1), ("oip", 2**64 - 1)]
        tasks = [spawn(b, name, priority=prio) for name, prio in order]
        await until(lambda: b.queue_depth == 3)
        h.gate.set()
        await asyncio.gather(hold, *tasks)
        assert h.batches == [["hold"], ["v1"], ["oip"], ["shadow"]]
        await b.close()

    arun(main)


def test_batch_key_keeps_incompatible_items_apart() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        key: Callable[[tuple[str, int]], Hashable] = lambda item: item[0]  # noqa: E731
        b = DynamicBatcher(h, max_batch_size=8, batch_key=key)
        hold = spawn(b, ("H", 0))
        await until(lambda: b.in_flight == 1)
        items = [("A", 1), ("B", 1), ("A", 2), ("B", 2), ("A", 3)]
        tasks = [spawn(b, x) for x in items]
        await until(lambda: b.queue_depth == 5)
        h.gate.set()
        await asyncio.gather(hold, *tasks)
        assert h.batches == [[("H", 0)], [("A", 1), ("A", 2), ("A", 3)], [("B", 1), ("B", 2)]]
        await b.close()

    arun(main)


def test_batch_size_of_limits_batches_and_rejects_oversize_items() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        size: Callable[[tuple[str, int]], int] = lambda item: item[1]  # noqa: E731
        b = DynamicBatcher(h, max_batch_size=4, batch_size_of=size, name="m")
        hold = spawn(b, ("h", 1))
        await until(lambda: b.in_flight == 1)
        items = [("a", 2), ("b", 1), ("c", 2), ("d", 1)]
        tasks = [spawn(b, x) for x in items]
        await until(lambda: b.queue_depth == 4)
        with pytest.raises(LimitExceeded, match=r"5.*max_batch_size 4"):
            await b.submit(("big", 5))
        assert b.queue_depth == 4
        h.gate.set()
        await asyncio.gather(hold, *tasks)
        # a+b = 3; c would make 5 > 4, so the batch closes there and c leads the next one.
        assert h.batches == [[("h", 1)], [("a", 2), ("b", 1)], [("c", 2), ("d", 1)]]
        assert [i.size for i in h.infos] == [1, 3, 3]
        await b.close()

    arun(main)


# --- limits, deadlines, cancellation ------------------------------------------------------------


def test_queue_full_rejects_at_once_and_counts() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=1, max_queue_size=2, name="resnet")
        running = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        queued = [spawn(b, "b"), spawn(b, "c")]
        await until(lambda: b.queue_depth == 2)
        with pytest.raises(QueueFull, match=r"resnet.*max_queue_size=2"):
            await b.submit("d")  # the gate is still closed: this must not block
        assert b.rejected == 1
        assert b.queue_depth == 2
        h.gate.set()
        await asyncio.gather(running, *queued)
        assert "d" not in h.items
        await b.close()

    arun(main)


def test_deadline_already_past_fails_at_once() -> None:
    async def main() -> None:
        h = Handler()
        b = DynamicBatcher(h, max_batch_size=8, clock=FakeClock(100.0))
        with pytest.raises(DeadlineExceeded):
            await b.submit("late", deadline=99.5)
        with pytest.raises(DeadlineExceeded):
            await b.submit("now", deadline=100.0)
        assert h.batches == []
        assert b.queue_depth == 0
        await b.close()

    arun(main)


def test_deadline_expires_while_queued_by_timer() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=8, clock=FakeClock(0.0))
        running = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        doomed = spawn(b, "b", deadline=0.002)  # a real 2 ms timer: the clock never moves
        other = spawn(b, "c")
        await until(lambda: b.queue_depth == 2)
        with pytest.raises(DeadlineExceeded):
            await doomed  # failed by the timer while the only slot is still busy
        assert b.expired == 1
        assert b.queue_depth == 1
        assert b.in_flight == 1
        h.gate.set()
        await asyncio.gather(running, other)
        assert h.batches == [["a"], ["c"]]
        await b.close()

    arun(main)


def test_deadline_rechecked_at_batch_formation() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=8, clock=clock)
        running = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        doomed = spawn(b, "b", deadline=60.0)  # its timer is a real minute away
        other = spawn(b, "c")
        await until(lambda: b.queue_depth == 2)
        clock.now = 61.0
        h.gate.set()
        await asyncio.gather(running, other)
        with pytest.raises(DeadlineExceeded):
            await doomed
        assert b.expired == 1
        assert h.batches == [["a"], ["c"]]
        await b.close()
        assert live_timers(b) == []

    arun(main)


def test_cancelled_while_queued_is_removed_and_never_run() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=8)
        running = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        gone = spawn(b, "b", deadline=1e12)
        kept = spawn(b, "c")
        await until(lambda: b.queue_depth == 2)
        assert len(live_timers(b)) == 1  # the deadline timer, cancelled with the item
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert b.queue_depth == 1
        h.gate.set()
        await asyncio.gather(running, kept)
        assert h.batches == [["a"], ["c"]]
        await b.close()
        assert live_timers(b) == []

    arun(main)


def test_cancelled_at_its_deadline_while_queued_counts_as_expired() -> None:
    """grpc cancels a call at its deadline, often before the queue's timer fires: that item
    expired (it was never run, its caller got DEADLINE_EXCEEDED), unlike one whose caller went
    away earlier."""

    async def main() -> None:
        clock = FakeClock()
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=8, clock=clock)
        running = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        early = spawn(b, "b", deadline=10.0)
        late = spawn(b, "c", deadline=10.0)
        await until(lambda: b.queue_depth == 2)
        early.cancel()  # its caller went away at 0, long before its deadline
        with pytest.raises(asyncio.CancelledError):
            await early
        # 20 ms before the server's deadline: the client's own deadline, which came first (the
        # server counts the client's timeout from the call's arrival); counted as expired, where
        # a 5 ms slack counted it as the client's cancel, in no failure and no expiry.
        clock.now = 9.98
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert (b.expired, b.queue_depth) == (1, 0)
        h.gate.set()
        await running
        await b.close()
        assert h.batches == [["a"]]

    arun(main)


def test_cancelled_while_executing_batch_completes_for_others() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=2, max_queue_delay=3600.0, clock=FakeClock())
        x, y = spawn(b, "x"), spawn(b, "y")
        await until(lambda: b.in_flight == 1)
        x.cancel()
        with pytest.raises(asyncio.CancelledError):
            await x
        h.gate.set()
        assert await y == ("ok", "y")
        assert h.batches == [["x", "y"]]
        await b.close()

    arun(main)


def test_many_cancellations_keep_depth_exact_and_order() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=1, max_queue_size=1000)
        hold = spawn(b, -1)
        await until(lambda: b.in_flight == 1)
        tasks = {i: spawn(b, i, priority=i % 2) for i in range(300)}
        await until(lambda: b.queue_depth == 300)
        for i, t in tasks.items():
            if i % 3:
                t.cancel()
        for i, t in tasks.items():
            if i % 3:
                with pytest.raises(asyncio.CancelledError):
                    await t
        assert b.queue_depth == 100
        h.gate.set()
        await asyncio.gather(hold, *(t for i, t in tasks.items() if i % 3 == 0))
        expected = sorted((i for i in range(300) if i % 3 == 0), key=lambda i: (i % 2, i))
        assert h.items == [-1, *expected]
        assert b.queue_depth == 0
        await b.close()

    arun(main)


# --- handler contract ---------------------------------------------------------------------------


def test_handler_exception_fans_out_to_its_batch_only() -> None:
    async def main() -> None:
        boom = ValueError("boom")

        async def handler(items: Sequence[str], info: BatchInfo) -> list[str]:
            if "bad" in items:
                raise boom
            return [s.upper() for s in items]

        b = DynamicBatcher(
            handler,
            max_batch_size=2,
            max_concurrency=2,
            max_queue_delay=3600.0,
            clock=FakeClock(),
        )
        tasks = [spawn(b, s) for s in ("bad", "x", "y", "z")]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[0] is boom
        assert results[1] is boom
        assert results[2:] == ["Y", "Z"]
        assert list(await asyncio.gather(b.submit("p"), b.submit("q"))) == ["P", "Q"]
        await b.close()

    arun(main)


def test_a_failed_result_is_its_item_s_alone() -> None:
    """A handler may answer one item with Failed(error): that caller gets the error, the batch's
    others their results (inline or queued alike)."""

    async def main() -> None:
        boom = ValueError("boom")

        async def handler(items: Sequence[str], info: BatchInfo) -> list[str | Failed]:
            return [Failed(boom) if s == "bad" else s.upper() for s in items]

        b = DynamicBatcher(handler, max_batch_size=4, max_queue_delay=3600.0, clock=FakeClock())
        tasks = [spawn(b, s) for s in ("x", "bad", "y", "z")]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results == ["X", boom, "Y", "Z"]
        await b.close()

        def now(items: Sequence[str], info: BatchInfo) -> list[str | Failed]:
            return [Failed(boom) if s == "bad" else s for s in items]

        inline = DynamicBatcher(Handler(), max_batch_size=8, run_now=now)
        with pytest.raises(ValueError, match="boom"):
            await inline.submit("bad")
        assert inline.in_flight == 0 and await inline.submit("ok") == "ok"
        await inline.close()

    arun(main)


def test_result_count_mismatch_is_internal_error_for_all() -> None:
    async def main() -> None:
        async def handler(items: Sequence[str], info: BatchInfo) -> list[str]:
            return []

        b = DynamicBatcher(handler, max_batch_size=2, max_queue_delay=3600.0, clock=FakeClock())
        results = await asyncio.gather(b.submit("a"), b.submit("b"), return_exceptions=True)
        for r in results:
            assert isinstance(r, InternalError)
            assert "handler returned 0 results for 2 items" in str(r)
        assert results[0] is results[1]
        await b.close()

    arun(main)


def test_batch_info_queue_ns_per_item() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=8, clock=clock)
        first = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        clock.now = 1.0
        second = spawn(b, "b")
        await until(lambda: b.queue_depth == 1)
        clock.now = 1.5
        third = spawn(b, "c")
        await until(lambda: b.queue_depth == 2)
        clock.now = 2.0
        h.gate.set()
        await asyncio.gather(first, second, third)
        assert h.infos[0] == BatchInfo(queue_ns=[0], size=1)
        assert h.infos[1] == BatchInfo(queue_ns=[1_000_000_000, 500_000_000], size=2)
        for info, batch in zip(h.infos, h.batches, strict=True):
            assert len(info.queue_ns) == len(batch)
            assert all(ns >= 0 for ns in info.queue_ns)
        await b.close()

    arun(main)


def test_no_timer_without_deadline() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=8)
        tasks = [spawn(b, i) for i in range(3)]
        await until(lambda: b.queue_depth == 2)
        assert live_timers(b) == []
        h.gate.set()
        await asyncio.gather(*tasks)
        await b.close()

    arun(main)


# --- close --------------------------------------------------------------------------------------


def test_close_drain_completes_queued_and_running_items() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=2, max_queue_delay=3600.0, clock=FakeClock())
        tasks = [spawn(b, i) for i in range(5)]
        await until(lambda: b.in_flight == 1 and b.queue_depth == 3)
        closing = asyncio.get_running_loop().create_task(b.close(drain=True))
        await until(lambda: b.closed)
        with pytest.raises(Unavailable, match="is closed"):
            await b.submit(99)
        assert not closing.done()
        h.gate.set()
        await closing
        assert [await t for t in tasks] == [("ok", i) for i in range(5)]
        assert h.batches == [[0, 1], [2, 3], [4]]
        assert b.queue_depth == 0 and b.in_flight == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert live_timers(b) == []

    arun(main)


def test_close_without_drain_fails_queued_and_waits_for_running() -> None:
    async def main() -> None:
        h = Handler(gated=True)
        b = DynamicBatcher(h, max_batch_size=1, name="m")
        running = spawn(b, "a")
        await until(lambda: b.in_flight == 1)
        queued = [spawn(b, "b", deadline=1e12), spawn(b, "c")]
        await until(lambda: b.queue_depth == 2)
        closing = asyncio.get_running_loop().create_task(b.close(drain=False))
        for t in queued:
            with pytest.raises(Unavailable):
                await t
        assert b.queue_depth == 0
        assert not closing.done()
        h.gate.set()
        await closing
        assert await running == ("ok", "a")
        assert h.batches == [["a"]]
        await b.close()  # idempotent
        await b.close(drain=False)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert live_timers(b) == []

    arun(main)


def test_submit_after_close_raises_unavailable() -> None:
    async def main() -> None:
        b = DynamicBatcher(Handler(), max_batch_size=4, name="m")
        await b.close()
        assert b.closed
        with pytest.raises(Unavailable, match=r"batcher 'm' is closed"):
            await b.submit("x")

    arun(main)


def test_bound_to_the_loop_of_its_first_submit() -> None:
    b = DynamicBatcher(Handler(), max_batch_size=4)

    async def use() -> None:
        assert await b.submit(1) == ("ok", 1)

    asyncio.run(use())
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(use())


# --- construction and layering ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 4, "max_queue_size": 0},
        {"max_batch_size": -1},
        {"max_batch_size": 4, "max_concurrency": 0},
        {"max_batch_size": 4, "max_queue_delay": -0.1},
    ],
)
def test_invalid_configuration_raises_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(Handler(), **kwargs)


def test_module_imports_only_stdlib_and_domain_errors() -> None:
    tree = ast.parse(inspect.getsource(batcher_module))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots.isdisjoint({"numpy", "onnxruntime", "grpc", "onnx"})
    assert roots <= {"__future__", "asyncio", "bisect", "math", "time", "collections"} | {
        "dataclasses",
        "typing",
        "ferry",
    }
