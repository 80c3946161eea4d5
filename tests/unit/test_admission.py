"""Predictive admission: a request that cannot finish before its deadline is refused at arrival.

Deterministic: time is a fake clock; the handler's "execution" advances it by a fixed cost per
batch (so the batcher measures exactly that cost), and batches are held by an Event the test sets.
No sleeps, no timing assertions: predicted waits are arithmetic on the fake costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from asyncutil import FakeClock, arun, until

from ferry.server.batching.batcher import BatchInfo, DynamicBatcher
from ferry.server.batching.service_time import ServiceTime
from ferry.server.errors import DeadlineExceeded, QueueFull


class CostlyHandler:
    """Each batch "runs" ``fixed + per_unit * units`` seconds of the fake clock, after waiting
    on ``gate`` while ``gated``: the batcher's own measurement then sees exactly that cost."""

    def __init__(self, clock: FakeClock, fixed: float, per_unit: float = 0.0) -> None:
        self.clock = clock
        self.fixed = fixed
        self.per_unit = per_unit
        self.gated = False
        self.gate = asyncio.Event()
        self.batches: list[list[Any]] = []

    @property
    def items(self) -> list[Any]:
        return [x for b in self.batches for x in b]

    async def __call__(self, items: Sequence[Any], info: BatchInfo) -> list[Any]:
        self.batches.append(list(items))
        if self.gated:
            await self.gate.wait()
        self.clock.now += self.fixed + self.per_unit * info.size
        return list(items)


def spawn(b: DynamicBatcher[Any, Any], item: Any, **kw: Any) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(b.submit(item, **kw))


async def train(b: DynamicBatcher[Any, Any], *sizes: int) -> None:
    """Run one batch of each size through ``b`` (its handler's cost is what it learns)."""
    for n in sizes:
        await asyncio.gather(*(b.submit(f"train{i}") for i in range(n)))


async def busy_batcher(
    fixed: float, **kw: Any
) -> tuple[FakeClock, CostlyHandler, DynamicBatcher[Any, Any], asyncio.Task[Any]]:
    """A batcher that learned ``fixed`` s per batch, with one request ("run") held executing."""
    clock = FakeClock()
    h = CostlyHandler(clock, fixed=fixed)
    b = DynamicBatcher(h, max_batch_size=0, clock=clock, **kw)
    await train(b, 1)
    h.gated = True
    running = spawn(b, "run")
    await until(lambda: b.in_flight == 1)
    return clock, h, b, running


# --- the predictor ------------------------------------------------------------------------------


def test_service_time_fits_fixed_plus_per_unit() -> None:
    est = ServiceTime()
    assert not est.ready and est.predict(8) == 0.0  # nothing known: nothing refused on a guess
    for _ in range(3):
        est.observe(1, 0.010)
        est.observe(9, 0.018)
    assert est.fixed == pytest.approx(0.009)
    assert est.per_unit == pytest.approx(0.001)
    assert est.predict(32) == pytest.approx(0.041)


def test_service_time_with_one_size_is_proportional_and_follows_change() -> None:
    est = ServiceTime(decay=0.5)
    est.observe(2, 0.020)
    assert est.predict(2) == pytest.approx(0.020)
    assert est.predict(8) == pytest.approx(0.080)  # pessimistic until other sizes are seen
    for _ in range(40):
        est.observe(2, 0.002)  # the model got faster: recent batches dominate
    assert est.predict(2) == pytest.approx(0.002, rel=1e-3)
    est.observe(2, float("nan"))
    est.observe(2, -1.0)
    assert est.predict(2) == pytest.approx(0.002, rel=1e-3)


# --- admission ---------------------------------------------------------------------------------


def test_refused_at_arrival_when_predicted_wait_exceeds_remaining_deadline() -> None:
    async def main() -> None:
        clock, h, b, running = await busy_batcher(0.010, name="m/1")
        queued = [spawn(b, f"q{i}") for i in range(3)]
        await until(lambda: b.queue_depth == 3)
        # 3 queued x 10 ms + half the running batch (5 ms) + its own 10 ms.
        assert b.predicted_wait() == pytest.approx(0.045)
        with pytest.raises(QueueFull) as refused:
            await b.submit("late", deadline=clock.now + 0.040)
        message = str(refused.value)
        assert "m/1" in message and "predicted wait 45.0 ms" in message
        assert "remaining 40.0 ms" in message
        assert b.rejected == 1 and b.queue_depth == 3
        admitted = spawn(b, "fits", deadline=clock.now + 0.060)
        await until(lambda: b.queue_depth == 4)
        h.gate.set()
        await asyncio.gather(running, *queued, admitted)
        assert "late" not in h.items and "fits" in h.items
        await b.close()

    arun(main)


def test_a_deadline_shorter_than_one_run_is_deadline_exceeded_not_overload() -> None:
    """Nothing queued, an instance free: the prediction is the request's own run, and a
    RESOURCE_EXHAUSTED there sent clients to back off and retry a request no server could run."""

    async def main() -> None:
        clock = FakeClock()
        h = CostlyHandler(clock, fixed=0.010)
        b = DynamicBatcher(h, max_batch_size=0, clock=clock, name="m/1")
        await train(b, 1)
        with pytest.raises(DeadlineExceeded) as refused:
            await b.submit("short", deadline=clock.now + 0.004)
        assert "one run takes 10.0 ms" in str(refused.value)
        assert "4.0 ms remain; give it a longer deadline" in str(refused.value)
        assert await b.submit("enough", deadline=clock.now + 0.020) is not None
        assert "short" not in h.items
        assert b.rejected == 0  # counted as queue full (ferry_rejected_total) it is not
        await b.close()

    arun(main)


def test_a_deadline_shorter_than_one_run_is_deadline_exceeded_behind_a_queue_too() -> None:
    """Work queued ahead does not make a deadline shorter than the request's own run overload:
    no backoff cures it, and it is no queue-full rejection."""

    async def main() -> None:
        clock, h, b, running = await busy_batcher(0.010, name="m/1")
        queued = spawn(b, "q")
        await until(lambda: b.queue_depth == 1)
        with pytest.raises(DeadlineExceeded) as refused:
            await b.submit("short", deadline=clock.now + 0.004)
        assert "4.0 ms remain; give it a longer deadline" in str(refused.value)
        assert b.rejected == 0 and b.queue_depth == 1
        h.gate.set()
        await asyncio.gather(running, queued)
        assert "short" not in h.items
        await b.close()

    arun(main)


def test_one_slow_run_does_not_refuse_every_later_request() -> None:
    """The estimate is refreshed only by batches that run: after one slow run (a GPU's first
    run at a shape, a stall), every request with a shorter deadline was refused at the door and
    none ran, so the version refused them all forever. An idle version whose estimate no batch
    has confirmed for several predicted runs lets a request through to measure again."""

    async def main() -> None:
        clock = FakeClock()
        h = CostlyHandler(clock, fixed=10.0)
        b = DynamicBatcher(h, max_batch_size=0, clock=clock, name="m/1")
        await train(b, 1)  # one run of 10 s
        h.fixed = 0.010  # the model's real cost
        with pytest.raises(DeadlineExceeded, match=r"one run takes 10000\.0 ms"):
            await b.submit("soon", deadline=clock.now + 1.0)  # just measured: trusted
        answered = []
        for second in range(60):
            clock.now += 1.0
            try:
                answered.append(await b.submit(second, deadline=clock.now + 1.0))
            except DeadlineExceeded:
                continue
        assert answered and answered[-1] == 59  # measured again: every later one runs
        assert "soon" not in h.items
        await b.close()

    arun(main)


def test_a_partial_batch_waiting_for_company_keeps_the_estimate() -> None:
    """The estimate was dropped once nothing had run for four predicted one-row runs, even
    while a partial batch waited out max_queue_delay for company: after full batches alone one
    row is predicted at a batch's share, so a short wait reset it, and every request was then
    admitted on no prediction until the next batch ended. Queued work will confirm it."""

    async def main() -> None:
        clock = FakeClock()
        h = CostlyHandler(clock, fixed=1.0, per_unit=1.0)
        b = DynamicBatcher(h, max_batch_size=4, max_queue_delay=3600.0, clock=clock)
        await train(b, 4)  # one batch of 4 in 5 s: one row is predicted at 1.25 s
        h.batches.clear()
        first = spawn(b, "a")
        await until(lambda: b.queue_depth == 1)
        clock.now += 6.0  # "a" waits for company past four one-row runs (5 s)
        # It would run with "a" in a batch of 2: 2.5 s predicted (3 s in fact), 2 s left.
        late = spawn(b, "late", deadline=clock.now + 2.0)
        await until(lambda: late.done() or b.queue_depth == 2)
        assert late.done()
        with pytest.raises(QueueFull):
            late.result()
        assert b.service_time.ready
        rest = [spawn(b, x) for x in "bcd"]
        await asyncio.gather(first, *rest)
        assert h.batches == [["a", "b", "c", "d"]]
        await b.close()

    arun(main)


def test_no_deadline_or_no_measurement_is_never_refused_by_prediction() -> None:
    async def main() -> None:
        clock = FakeClock()
        h = CostlyHandler(clock, fixed=10.0)
        h.gated = True
        b = DynamicBatcher(h, max_batch_size=0, clock=clock)
        # Nothing has run yet: no estimate, so a tight deadline is admitted.
        first = spawn(b, "first", deadline=0.001)
        await until(lambda: b.in_flight == 1)
        h.gate.set()
        await first
        h.gate.clear()
        running = spawn(b, "run")
        await until(lambda: b.in_flight == 1)
        # Known to take 10 s per item: without a deadline it still queues (max_queue_size bounds it).
        waits = [spawn(b, f"w{i}") for i in range(5)]
        await until(lambda: b.queue_depth == 5)
        assert b.rejected == 0
        h.gate.set()
        await asyncio.gather(running, *waits)
        await b.close()

    arun(main)


def test_batching_and_instances_shorten_the_prediction() -> None:
    async def main() -> None:
        clock = FakeClock()
        h = CostlyHandler(clock, fixed=0.009, per_unit=0.001)
        # The measured cost, injected: batches of 1 and of 9 ran in 10 and 18 ms.
        est = ServiceTime()
        est.observe(1, 0.010)
        est.observe(9, 0.018)
        b = DynamicBatcher(h, max_batch_size=8, max_concurrency=2, clock=clock, service_time=est)
        h.gated = True
        blockers = [spawn(b, "b0"), spawn(b, "b1")]
        await until(lambda: b.in_flight == 2)
        assert est.predict(1) == pytest.approx(0.010)
        queued = [spawn(b, f"q{i}") for i in range(16)]
        await until(lambda: b.queue_depth == 16)
        # 16 queued units = 2 full batches (2 x 9 ms + 16 x 1 ms), plus half the 2 running
        # batches, over 2 instances, plus the batch it joins: a full one of 8 behind 16 rows.
        running = 2 * est.predict(1)
        expected = (2 * est.fixed + 16 * est.per_unit + running / 2) / 2 + est.predict(8)
        assert b.predicted_wait() == pytest.approx(expected)
        # Items ahead x one item's cost on one instance would have been 16 x 10 ms = 160 ms.
        assert b.predicted_wait() < 0.040
        ok = spawn(b, "ok", deadline=clock.now + 0.040)
        await until(lambda: b.queue_depth == 17)
        assert b.rejected == 0  # admitted (the fake clock then runs batches one after another)
        h.gate.set()
        await asyncio.gather(*blockers, *queued, ok, return_exceptions=True)
        await b.close()

    arun(main)


def test_priority_is_judged_by_the_queue_ahead_of_it() -> None:
    async def main() -> None:
        clock, h, b, running = await busy_batcher(0.010)
        low = [spawn(b, f"low{i}", priority=5) for i in range(10)]
        await until(lambda: b.queue_depth == 10)
        # A low-priority arrival waits behind 10 items; a high-priority one behind none of them.
        with pytest.raises(QueueFull):
            await b.submit("low-late", priority=5, deadline=clock.now + 0.030)
        assert b.predicted_wait(priority=1) == pytest.approx(0.015)
        high = spawn(b, "high", priority=1, deadline=clock.now + 0.030)
        await until(lambda: b.queue_depth == 11)
        # Now a second high-priority arrival has "high" ahead of it, not the low ones.
        assert b.predicted_wait(priority=1) == pytest.approx(0.025)
        # And low-priority arrivals count the high one too.
        assert b.predicted_wait(priority=5) == pytest.approx(0.125)
        h.gate.set()
        await asyncio.gather(running, high, *low)
        assert h.items.index("high") < h.items.index("low0")
        assert "low-late" not in h.items
        await b.close()

    arun(main)


def test_work_that_cannot_finish_in_time_is_never_executed() -> None:
    async def main() -> None:
        clock, h, b, running = await busy_batcher(0.010)
        # Admitted with time to spare (predicted 15 ms of 1 s) ...
        tight = spawn(b, "tight", deadline=clock.now + 1.0)
        passed = spawn(b, "passed", deadline=clock.now + 0.5)
        after = spawn(b, "after")
        await until(lambda: b.queue_depth == 3)
        # ... but the running batch held the instance: at dispatch "tight" has 5 ms left, less
        # than the 10 ms it needs, and "passed" is past its deadline. Neither runs.
        clock.now += 0.995 - 0.010  # the running batch adds its own 10 ms when it ends
        h.gate.set()
        await asyncio.gather(running, after)
        for doomed in (tight, passed):
            with pytest.raises(DeadlineExceeded, match="not executed"):
                await doomed
        assert h.items == ["train0", "run", "after"]
        assert b.expired == 2
        await b.close()

    arun(main)


class LengthHandler:
    """Items are (name, length): a batch "runs" 1 us per element of the fake clock, as a
    request long on a dynamic axis costs more than a short one of the same rows."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def __call__(self, items: Sequence[Any], info: BatchInfo) -> list[Any]:
        self.clock.now += 1e-6 * sum(length for _, length in items)
        return [name for name, _ in items]


def test_a_head_that_expires_at_dispatch_hands_the_slot_to_the_next_priority() -> None:
    """ "a1" (key a, priority 1) heads the queue but can no longer finish in time when the slot
    frees. The batch was still formed for its key, so "a2" at priority 5 ran ahead of "b1" at
    priority 1, which had been queued before it."""

    async def main() -> None:
        clock, h, b, running = await busy_batcher(0.010, batch_key=lambda item: item[0])
        a1 = spawn(b, "a1", priority=1, deadline=clock.now + 1.0)
        b1 = spawn(b, "b1", priority=1)
        a2 = spawn(b, "a2", priority=5)
        await until(lambda: b.queue_depth == 3)
        clock.now += 0.995 - 0.010  # "a1" has 5 ms left once the running 10 ms end
        h.gate.set()
        await asyncio.gather(running, b1, a2)
        with pytest.raises(DeadlineExceeded):
            await a1
        assert h.items[-2:] == ["b1", "a2"]
        await b.close()

    arun(main)


def test_a_request_long_on_a_dynamic_axis_does_not_make_short_ones_look_long() -> None:
    """Batch time was fitted per row: after one row of 1,000,000 elements ran (1 s), every
    row was predicted to take about that, and a short request with a 10 ms deadline was
    refused DEADLINE_EXCEEDED ("one run takes 1000.0 ms ... give it a longer deadline") though
    it runs in 4 us. With ``cost_of`` (a request's input elements, as the server passes it),
    a line is fitted per element too, and a run is predicted by the shorter of the two: short
    requests are admitted and run."""

    async def main() -> None:
        clock = FakeClock()
        b: DynamicBatcher[Any, Any] = DynamicBatcher(
            LengthHandler(clock), max_batch_size=8, clock=clock, cost_of=lambda item: item[1]
        )
        for i in range(3):
            assert await b.submit((f"short{i}", 4)) == f"short{i}"
        assert await b.submit(("long", 1_000_000)) == "long"
        assert await b.submit(("late", 4), deadline=clock.now + 0.010) == "late"
        assert b.predicted_wait(1, cost=4) < 0.001
        await b.close()

    arun(main)


def test_a_size_the_cost_line_never_saw_is_not_refused_on_its_extrapolation() -> None:
    """Seen at one cost only, the cost line is proportional: a fixed overhead of 50 ms on
    requests of 3 elements read as 17 ms per element, and a request of 2,100 elements (one
    that runs in 50 ms) was predicted at 35 s and refused DEADLINE_EXCEEDED under a 10 s
    deadline. Rows say 50 ms, and the shorter reading is the one trusted."""

    async def main() -> None:
        clock = FakeClock()
        h = CostlyHandler(clock, fixed=0.050)
        b: DynamicBatcher[Any, Any] = DynamicBatcher(
            h, max_batch_size=8, clock=clock, cost_of=lambda item: item[1]
        )
        for i in range(3):
            await b.submit((f"short{i}", 3))
        assert await b.submit(("long", 2100), deadline=clock.now + 10.0) == ("long", 2100)
        await b.close()

    arun(main)


# --- the batch a request joins -----------------------------------------------------------------


async def _batching_busy(clock: FakeClock) -> tuple[CostlyHandler, DynamicBatcher[Any, Any]]:
    """A batcher of batches up to 8 that learned 1 s + 1 s per row (batches of 1 and 3 ran)."""
    h = CostlyHandler(clock, fixed=1.0, per_unit=1.0)
    b = DynamicBatcher(h, max_batch_size=8, clock=clock)
    await train(b, 1, 3)
    assert b.service_time.predict(4) == pytest.approx(5.0)
    return h, b


def test_a_batch_grows_only_while_its_tightest_deadline_holds() -> None:
    """The head of the queue, admitted to run in 2 s, was sent in the batch of 4 the queue behind
    it made (5 s) and ended past its deadline: the batch stops growing at the size it can
    finish in; the rest is the next batch."""

    async def main() -> None:
        clock = FakeClock()
        h, b = await _batching_busy(clock)
        h.gated = True
        h.batches.clear()
        running = spawn(b, "run")
        await until(lambda: b.in_flight == 1)
        # 2 s (half the running batch) + its own 2 s fit 4.5 s.
        head = spawn(b, "head", deadline=clock.now + 4.5)
        rest = [spawn(b, f"r{i}") for i in range(3)]
        await until(lambda: b.queue_depth == 4)
        h.gated = False
        h.gate.set()  # "run" ends at 2 s: 2.5 s are left to "head", a batch of 1 runs 2 s
        await asyncio.gather(running, head, *rest)
        assert h.batches == [["run"], ["head"], ["r0", "r1", "r2"]]
        assert b.expired == 0
        await b.close()

    arun(main)


def test_admission_counts_the_batch_a_request_joins() -> None:
    """Behind 3 queued rows a request runs in a batch of 4 (5 s), not alone (2 s): one whose
    deadline its own run alone would meet, and that batch would not, is refused at the door."""

    async def main() -> None:
        clock = FakeClock()
        h, b = await _batching_busy(clock)
        h.gated = True
        h.batches.clear()
        running = spawn(b, "run")
        await until(lambda: b.in_flight == 1)
        queued = [spawn(b, f"q{i}") for i in range(3)]
        await until(lambda: b.queue_depth == 3)
        # Half the running batch (1 s) + the 3 ahead in one batch (4 s) + the batch of 4 it
        # joins (5 s), where its own run alone (2 s) predicted 7 s.
        assert b.predicted_wait() == pytest.approx(10.0)
        with pytest.raises(QueueFull):
            await b.submit("late", deadline=clock.now + 9.0)
        fits = spawn(b, "fits", deadline=clock.now + 10.5)
        await until(lambda: b.queue_depth == 4)
        h.gated = False
        h.gate.set()
        await asyncio.gather(running, *queued, fits)
        assert h.batches == [["run"], ["q0", "q1", "q2", "fits"]]
        await b.close()

    arun(main)


def test_rows_waiting_for_company_are_counted_once_in_the_batch_a_request_joins() -> None:
    """With an instance free, rows queued ahead wait only for company (max_queue_delay), and a
    request arriving behind them is that company: it runs in their batch. Counted both as a
    batch ahead of it and in the batch it joins, it was refused as overload (QueueFull) with
    nothing running, though the batch it made ended well before its deadline."""

    async def main() -> None:
        clock = FakeClock()
        h = CostlyHandler(clock, fixed=1.0, per_unit=1.0)
        b = DynamicBatcher(h, max_batch_size=4, max_queue_delay=3600.0, clock=clock)
        await train(b, 4)  # one size seen: 5 s a batch of 4, 1.25 s a row
        h.batches.clear()
        start = clock.now
        queued = [spawn(b, f"q{i}") for i in range(3)]
        await until(lambda: b.queue_depth == 3)
        assert b.in_flight == 0  # nothing runs: the 3 wait for a fourth
        # The batch of 4 it completes (5 s), not the 3 ahead (3.75 s) and then that batch.
        assert b.predicted_wait() == pytest.approx(5.0)
        fits = spawn(b, "fits", deadline=clock.now + 6.0)
        await asyncio.gather(*queued, fits)
        assert h.batches == [["q0", "q1", "q2", "fits"]]
        assert clock.now - start == pytest.approx(5.0)
        assert b.rejected == 0 and b.expired == 0
        await b.close()

    arun(main)
