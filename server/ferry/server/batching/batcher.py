"""Dynamic batching: many concurrent requests become few handler executions.

A model instance runs a batch of N items in far less than N times the cost of one item, so items
that arrive while an instance is busy are worth grouping. This module holds the policy only (when to
dispatch, what goes together, what to refuse); it knows nothing of tensors, runtimes or protocols,
so the same code serves every model and can be tested with plain Python objects.

It sheds load at the door: a request whose deadline falls before the moment it could finish (the
work queued ahead of it, at its priority or better, spread over the instances, plus the run of
the batch it joins, all predicted from the batches that ran) is refused at once with QueueFull
(RESOURCE_EXHAUSTED) instead of being queued to be executed too late, and a queued request whose
deadline comes before it could finish is dropped when batches form, so late work is never run.
A batch grows only while the tightest deadline in it still holds at its size.
One whose deadline is shorter than its own run (whatever is queued ahead of it) is
DeadlineExceeded instead: no backoff or other replica helps it, so it is not reported as overload.

It is event driven: every decision is taken when something changes (a submit, a slot freeing, a
timer firing, a caller going away), never by a polling loop, so an idle batcher costs nothing and a
lone request at low load is dispatched in the same loop iteration as its submit. With ``run_now``
(a synchronous handler that may decline), a request that finds nothing queued and a slot free runs
at once in its caller: no future, no task, no second loop iteration. For a model that runs in tens
of microseconds those cost more than the execution (measured: 158 -> 110 us per request for the
tiny MLP through the whole Open Inference Protocol path, in process).

With ``preferred_sizes`` (Triton's preferred batch sizes: the sizes a model's config plans, which
run without padding, runtime.plans), a partial batch whose queued units reach one of them is
dispatched at once instead of waiting out ``max_queue_delay`` for a full one; one between two sizes
waits for company (never past the delay). Every batch takes everything compatible that is waiting
(up to ``max_batch_size``), so the padding up to the next planned size is filled with real requests
wherever there are any. Keys (what may share a batch) are judged apart: a partial batch waiting for
company holds up no batch of another key.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ferry.server.batching.service_time import ServiceTime
from ferry.server.errors import (
    DeadlineExceeded,
    InternalError,
    LimitExceeded,
    QueueFull,
    Unavailable,
)

__all__ = ["DEADLINE_SLACK", "BatchInfo", "DynamicBatcher", "Failed"]

T = TypeVar("T")
R = TypeVar("R")
# Seconds a batch waiting for company is sent ahead of the last moment its earliest deadline
# allows (the timer and the loop are not punctual).
_START_MARGIN = 0.002
# A caller that goes away this close to (or after) its deadline was ended by the deadline, not by
# its client: grpc cancels a call at its deadline, often before the queue's own timer fires, and
# the server's deadline is the client's timeout counted from when the call arrived, so later than
# the client's own by the call's trip and its wait to be read. At 5 ms, a call whose client's
# deadline cancelled it 20 ms before the server's (a busy host) was counted as a client's cancel:
# in no failure and no expiry. A client that cancels on purpose this close to its deadline is
# rare, and counting it as expired is the lesser mistake.
DEADLINE_SLACK = 0.05

# An entry's life: queued, then either dispatched to a handler or gone (cancelled, expired, or
# failed at close). Entries leave their deque lazily, so the state is what says whether they count.
_QUEUED = 0
_DISPATCHED = 1
_GONE = 2

# Batch key of every item when no batch_key is given: one shared object keeps the hot path free of
# a branch on "is there a key function".
_ALL: Hashable = object()

# Predicted runs an idle batcher's estimate stays trusted without a batch confirming it: only
# batches that run refresh it, so it must not be able to refuse every request for good.
TRUST_RUNS = 4

# Dead entries tolerated in the deques before they are compacted: lazily deleted entries are only
# popped when they reach the front, so a long-lived head could otherwise pin unbounded garbage.
_GARBAGE_FLOOR = 64


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Passed to the handler with each batch, so it can report queueing time per request without
    the batcher knowing what a request or a metric is."""

    queue_ns: list[int]
    size: int
    # Which of the batch's callers have stopped waiting (cancelled, or their deadline ended the
    # call) by the time it is asked: their requests are nobody's success, so a handler charges
    # them no per-request time. None: every caller waits (an item run in its caller).
    left: Callable[[], list[bool]] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Failed:
    """A handler's result for one item that failed on its own: that item's caller gets
    ``error`` and the batch's other callers their results. Without it one item's failure is
    every caller's (one exception for the whole batch)."""

    error: Exception


class _Entry(Generic[T, R]):
    """One queued item: the only per-request allocation besides its future."""

    __slots__ = (
        "cost",
        "counted",
        "deadline",
        "enqueued",
        "future",
        "item",
        "key",
        "prio",
        "size",
        "state",
        "timer",
    )

    def __init__(
        self,
        item: T,
        size: int,
        key: Hashable,
        enqueued: float,
        future: asyncio.Future[R],
        *,
        cost: int,
        deadline: float | None,
        prio: int,
        counted: bool = True,
    ) -> None:
        self.item = item
        self.counted = counted
        self.prio = prio
        self.size = size
        self.cost = cost
        self.key = key
        self.enqueued = enqueued
        self.deadline = deadline
        self.future = future
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None


class DynamicBatcher(Generic[T, R]):
    """Groups submitted items into batches for ``handler``, bounded in queue size and concurrency.

    Batches form only when an execution slot is free (as in Triton), so under load the queue, not a
    pile of half-filled batches, absorbs bursts, and each batch is as large as the backlog allows.
    ``run_now(items, info)`` returns the results, or None to decline (the item then queues as
    usual); it must not block for long, since it runs on the event loop.
    Counters ``rejected`` and ``expired`` are plain ints so stats code can read them without locks.
    """

    rejected: int
    expired: int

    def __init__(
        self,
        handler: Callable[[Sequence[T], BatchInfo], Awaitable[Sequence[R | Failed]]],
        *,
        max_batch_size: int,
        max_queue_delay: float = 0.0,
        max_queue_size: int = 1024,
        max_concurrency: int = 1,
        batch_size_of: Callable[[T], int] | None = None,
        batch_key: Callable[[T], Hashable] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
        service_time: ServiceTime | None = None,
        run_now: Callable[[Sequence[T], BatchInfo], Sequence[R | Failed] | None] | None = None,
        preferred_sizes: Sequence[int] = (),
        cost_of: Callable[[T], int] | None = None,
    ) -> None:
        label = f"batcher {name!r}" if name else "batcher"
        if max_batch_size < 0:
            raise ValueError(f"{label}: max_batch_size must be >= 0 (0 disables batching)")
        if max_queue_delay < 0:
            raise ValueError(f"{label}: max_queue_delay must be >= 0 seconds")
        if max_queue_size < 1:
            # An unbounded queue turns overload into unbounded latency and memory; refuse it.
            raise ValueError(f"{label}: max_queue_size must be >= 1 (an unbounded queue is unsafe)")
        if max_concurrency < 1:
            raise ValueError(f"{label}: max_concurrency must be >= 1")
        self._handler = handler
        self._run_now = run_now
        self._preferred = frozenset(preferred_sizes)
        self._max_batch_size = max_batch_size
        self._max_queue_delay = max_queue_delay
        self._max_queue_size = max_queue_size
        self._max_concurrency = max_concurrency
        self._size_of = batch_size_of
        # The work an item brings (a request's input elements), beside its rows: batch time in
        # rows alone predicted, after one request long on a dynamic axis ran, every short one as
        # long, and refused them all. A second line is fitted in cost, and a run is predicted
        # by the shorter of the two: the cost line extrapolates a size it never saw
        # proportionally (a fixed overhead read as cost per element), and is trusted only as
        # far as it says a run is shorter than rows do. None: rows alone, as without it.
        self._cost_of = cost_of
        self._cost_time: ServiceTime | None = ServiceTime() if cost_of is not None else None
        self._key_of = batch_key
        self._clock = clock
        self._label = label
        # One deque per priority, priorities kept sorted: there are few distinct priorities, and
        # this keeps enqueue O(1) where a heap would be O(log n) with a tuple per item.
        self._queues: dict[int, deque[_Entry[T, R]]] = {}
        self._prios: list[int] = []
        self._depth = 0
        # Live (items, units, cost) per priority: what is ahead of an arrival, in O(priorities).
        self._ahead: dict[int, list[int]] = {}
        self._garbage = 0
        # Queued batch units per key: tells in O(1) whether the head's batch is already full.
        self._units: dict[Hashable, int] = {}
        self._in_flight = 0
        # Predicted seconds of the batches running now, and the predictor itself.
        self._running = 0.0
        self.service_time = service_time if service_time is not None else ServiceTime()
        self._observed_at = clock()  # when a batch last refreshed the estimate
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_at = 0.0
        self._closed = False
        self.rejected = 0
        self.expired = 0

    @property
    def max_batch_size(self) -> int:
        """Units per batch; 0: one item per batch."""
        return self._max_batch_size

    def one_per_batch(self) -> None:
        """From now on each batch holds one item (as max_batch_size 0): the handler found that
        its items must run alone, and a batch of several ran them one after another in one
        slot while other slots sat idle. Items already queued keep their sizes; the limit on
        an item's size is its submitter's to check from here on. Event loop only."""
        self._max_batch_size = 0
        self._preferred = frozenset()

    @property
    def queue_depth(self) -> int:
        return self._depth

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    def predicted_wait(self, size: int = 1, priority: int = 0, cost: int | None = None) -> float:
        """Seconds until an item of ``size`` units (and ``cost``, by default its size)
        submitted now at ``priority`` would have run:
        the queued work at its priority or better (lower numbers first; equal ones are ahead of
        it), in full batches, spread over the instances, after the running batches' remaining
        time (half their predicted time, on average), plus the run of its batch: itself and the
        work just ahead of it, up to a full batch (with an instance free, that work runs in its
        batch only, not before it as well). 0 until a batch has run: nothing is refused on a
        guess."""
        est = self.service_time
        if not est.ready:
            return 0.0
        items = units = costs = 0
        for prio, (n, u, c) in self._ahead.items():
            if prio <= priority:
                items += n
                units += u
                costs += c
        limit = self._max_batch_size
        if cost is None:
            cost = size
        own = self._predict(size, cost)
        if limit and units:
            # It runs in a batch with the work queued just ahead of it, up to a full one: its
            # own run alone admitted, under load, requests whose batch then ended past their
            # deadline (bench/batch_deadlines.py: at 1.5x capacity 13,391 of 31,908 answered
            # late), and capping a batch at its tightest deadline alone (_take_batch) left
            # batches too small to keep up. The rows ahead that share its batch are counted in
            # `work` as well, on purpose: the time it leaves is what lets its batch grow with
            # the rows behind it. Counted once, requests were admitted with no room to spare,
            # the deadline cap cut every batch short, and goodput fell at every load
            # (docs/benchmarking.md, "Batches that outgrow their tightest deadline").
            joined = min(limit, units + size)
            own = max(own, self._predict(joined, round((costs + cost) * joined / (units + size))))
            if self._in_flight < self._max_concurrency and units + size <= limit:
                # An instance is free: the rows ahead wait only for company (max_queue_delay),
                # and it is that company; they run in its batch, counted just above. Counted
                # as a batch ahead of it too, a request was refused "overloaded" behind 3
                # queued rows with nothing running, though it would have ended in time. While
                # a batch runs they stay counted twice: its batch grows with the rows arriving
                # until then, which that stands for (counted once, the simulation with a 5 ms
                # delay fell from 74% to 50% of capacity at 0.8x, most of it expired).
                items = units = costs = 0
        # One item per batch, or full batches: the backlog is what fills them. (Keys that do
        # not batch together make a few more; the estimate stays the common case's.)
        batches = items if limit == 0 or not items else math.ceil(units / limit)
        work = batches * est.fixed + units * est.per_unit
        by_cost = self._cost_time
        if by_cost is not None and by_cost.ready:
            work = min(work, batches * by_cost.fixed + costs * by_cost.per_unit)
        if self._in_flight >= self._max_concurrency:
            work += self._running / 2
        return work / self._max_concurrency + own

    async def submit(
        self, item: T, *, deadline: float | None = None, priority: int = 0, counted: bool = True
    ) -> R:
        """Queue ``item`` and wait for its result. ``deadline`` is absolute on the batcher's clock
        and bounds only the time spent queued: once a handler has the item, it runs to the end.
        An item predicted to finish after its deadline is refused here, before it costs anything
        (QueueFull, so RESOURCE_EXHAUSTED: retry later, elsewhere, or with a longer deadline).
        ``counted=False``: work no caller waits for (a rollout's shadow run), which adds nothing
        to ``rejected`` and ``expired``: those are requests' failures, and a shadow shed under
        load read as the candidate's expired requests though none had failed."""
        if self._closed:
            raise Unavailable(f"{self._label} is closed")
        size = 1 if self._size_of is None else self._size_of(item)
        cost = size if self._cost_of is None else self._cost_of(item)
        if self._max_batch_size and size > self._max_batch_size:
            raise LimitExceeded(
                f"item batch size {size} is over the max_batch_size {self._max_batch_size} "
                f"of {self._label}; split the request"
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"deadline passed before the request reached {self._label}")
        if self._depth >= self._max_queue_size:
            self.rejected += counted
            raise QueueFull(
                f"{self._label} queue is full (max_queue_size={self._max_queue_size}); "
                "retry with backoff or add capacity"
            )
        if deadline is not None:
            self._forget_stale_estimate(now)
        if deadline is not None and self.service_time.ready:
            wait = self.predicted_wait(size, priority, cost)
            if now + wait > deadline:
                own = self._predict(size, cost)
                # Its own run alone overruns the deadline: the deadline, not the load, is the
                # cause, queue or not. Judged by the wait, a queue ahead made it "overload",
                # which sent clients to back off and retry a request no server could finish.
                if now + own > deadline:
                    raise DeadlineExceeded(
                        f"{self._label} cannot run this request within its deadline: one run "
                        f"takes {own * 1000:.1f} ms (predicted from the runs so far) and "
                        f"{(deadline - now) * 1000:.1f} ms remain; give it a longer deadline"
                    )
                self.rejected += counted
                # What the prediction counted: the whole queue's depth named requests of lower
                # priorities, which wait behind this one and are not in it.
                before = sum(n for prio, (n, _, _) in self._ahead.items() if prio <= priority)
                raise QueueFull(
                    f"{self._label} cannot finish this request before its deadline: predicted "
                    f"wait {wait * 1000:.1f} ms ({before} queued ahead of it, "
                    f"{self._in_flight} running) "
                    f"> remaining {(deadline - now) * 1000:.1f} ms; retry with backoff, with a "
                    "longer deadline, or add capacity"
                )
        if (
            self._run_now is not None
            and not self._depth
            and self._in_flight < self._max_concurrency
            and (not self._max_queue_delay or size >= self._max_batch_size)
        ):
            done = self._direct(item, size, cost)
            if done is not None:
                return done[0]
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(f"{self._label} is bound to another event loop")
        key = _ALL if self._key_of is None else self._key_of(item)
        future: asyncio.Future[R] = loop.create_future()
        entry = _Entry(
            item,
            size,
            key,
            now,
            future,
            cost=cost,
            deadline=deadline,
            prio=priority,
            counted=counted,
        )
        self._units[key] = self._units.get(key, 0) + size  # first: an unhashable key fails here
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = deque()
            bisect.insort(self._prios, priority)
        queue.append(entry)
        self._depth += 1
        ahead = self._ahead.get(priority)
        if ahead is None:
            self._ahead[priority] = [1, size, cost]
        else:
            ahead[0] += 1
            ahead[1] += size
            ahead[2] += cost
        if deadline is not None:
            entry.timer = loop.call_later(deadline - now, self._on_deadline, entry)
        self._pump()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: a queued item must not cost a model execution.
            if entry.state == _QUEUED:
                self._unlink(entry, _GONE)
                if deadline is not None and self._clock() >= deadline - DEADLINE_SLACK:
                    self.expired += counted  # its deadline ended it while queued: it expired
                self._tidy()
                self._pump()
            raise

    def _forget_stale_estimate(self, now: float) -> None:
        """Drop an estimate that no batch has confirmed for TRUST_RUNS of its own predicted
        runs while nothing runs. Only batches that run refresh it: after one slow run (a GPU's
        first run at a shape, a stall) every request with a shorter deadline was refused at the
        door or dropped from the queue, none ran, and the version refused them all until it
        was reloaded. Dropped, nothing is refused on a guess until the next batch has run.

        Not while work is queued: that work runs (or is dropped) within max_queue_delay and
        confirms the estimate or empties the queue, so the wait is no sign of a stale estimate.
        Counted, a partial batch waiting for company longer than four one-row runs (1.25 ms
        after full batches of 32 in bench/batch_deadlines.py) reset it, and until the next
        batch ended every request was admitted, and every batch sent whole, on no prediction."""
        est = self.service_time
        if (
            est.ready
            and not self._in_flight
            and not self._depth
            and now - self._observed_at > TRUST_RUNS * est.predict(1)
        ):
            est.reset()
            if self._cost_time is not None:
                self._cost_time.reset()

    def _predict(self, size: int, cost: int) -> float:
        """Seconds a batch of ``size`` rows and ``cost`` runs: the shorter of the two lines."""
        predicted = self.service_time.predict(size)
        by_cost = self._cost_time
        if by_cost is not None and by_cost.ready:
            predicted = min(predicted, by_cost.predict(cost))
        return predicted

    def _observe(self, size: int, cost: int, seconds: float) -> None:
        """Fold a batch that ran into both estimates."""
        self.service_time.observe(size, seconds)
        if self._cost_time is not None:
            self._cost_time.observe(cost, seconds)

    def _direct(self, item: T, size: int, cost: int) -> tuple[R] | None:
        """An idle batcher's item runs at once in its caller, when ``run_now`` takes it: no
        future, no task, no loop iteration between the arrival and the execution."""
        assert self._run_now is not None
        self._in_flight += 1
        try:
            started = self._clock()
            results = self._run_now((item,), BatchInfo(queue_ns=[0], size=size))
            if results is None:
                return None
            self._observed_at = self._clock()
            self._observe(size, cost, self._observed_at - started)
        finally:
            self._in_flight -= 1
        if len(results) != 1:
            raise InternalError(
                f"{self._label}: handler returned {len(results)} results for 1 item"
            )
        if isinstance(results[0], Failed):
            raise results[0].error
        return (results[0],)

    async def close(self, *, drain: bool = True) -> None:
        """Stop accepting items, then return once nothing is queued or running. ``drain=True``
        runs what is queued (without waiting out max_queue_delay); ``drain=False`` fails it."""
        self._closed = True
        if not drain:
            for entry in list(self._queued()):
                self._unlink(entry, _GONE)
                if not entry.future.done():
                    entry.future.set_exception(
                        Unavailable(f"{self._label} closed before the request ran")
                    )
            self._tidy()
        self._pump()
        while self._tasks:
            await asyncio.wait(tuple(self._tasks))
        self._cancel_flush()

    # --- scheduling -------------------------------------------------------------------------

    def _pump(self, force: bool = False) -> None:
        """Dispatch batches while a slot is free and some batch is ready. Called on every
        state change; ``force`` is the flush timer's verdict, trusted over the injected clock."""
        while self._depth and self._in_flight < self._max_concurrency:
            now = self._clock()
            if not self._drop_late_heads(now):
                break
            key, target = self._next_key(now, force)
            if target is not None:
                self._arm_flush(target, now)
                return
            force = False
            batch, units = self._take_batch(now, key)
            if batch:
                self._launch(batch, units, now)
        # Nothing queued, or every slot busy: a slot freeing re-evaluates, so no timer is needed.
        self._cancel_flush()

    def _drop_late_heads(self, now: float) -> bool:
        """Expire the queue's heads that can no longer finish in time; whether anything is
        left. The head names the batch that goes next: one that expired only as its batch
        formed still chose it, and a lower priority of its key ran ahead of the higher
        priority requests of other keys queued before it."""
        self._forget_stale_estimate(now)
        while self._depth:
            head = self._queues[self._prios[0]][0]
            if head.deadline is None or head.deadline > now + self._predict(head.size, head.cost):
                return True
            self._expire(head)
            self._tidy()
        return False

    def _next_key(self, now: float, force: bool) -> tuple[Hashable, float | None]:
        """(the key whose batch goes now, None), or (None, when the first batch must go) while
        every queued batch waits for company. Keys are judged apart, in dispatch order: a
        partial batch waiting for company held up the batches of other keys (requests with
        other sizes on a dynamic axis) behind it, full ones included, and let theirs expire
        unrun while instances sat idle."""
        if self._max_batch_size == 0 or self._max_queue_delay <= 0 or self._closed:
            return self._queues[self._prios[0]][0].key, None
        # Per key, in dispatch order: its oldest arrival, earliest deadline and queued cost, and
        # its best priority (its first entry's: entries come in priority order).
        keys: dict[Hashable, list[float]] = {}
        best: dict[Hashable, int] = {}
        for entry in self._queued():
            seen = keys.get(entry.key)
            deadline = math.inf if entry.deadline is None else entry.deadline
            if seen is None:
                keys[entry.key] = [entry.enqueued, deadline, entry.cost]
                best[entry.key] = entry.prio
            else:
                seen[0] = min(seen[0], entry.enqueued)
                seen[1] = min(seen[1], deadline)
                seen[2] += entry.cost
        first: Hashable = None
        first_at = math.inf
        waiting: list[Hashable] = []  # the first key waiting for company, if any
        for key, (oldest, deadline, cost) in keys.items():
            units = self._units[key]
            ready = units >= self._max_batch_size or units in self._preferred
            if not ready:
                # Company is not worth a caller's deadline: the batch goes, partial, when one of
                # its requests must start to finish in time. A lone request under a delay near
                # its timeout (the server's default one included) expired waiting for company.
                run = self._predict(units, round(cost)) + _START_MARGIN
                target = min(oldest + self._max_queue_delay, deadline - run)
                ready = now >= target
            if ready:
                # A slot goes to a batch now: to one of a higher priority waiting for company
                # first. The batch of a lower priority went ahead of it and took the instance
                # (a priority-1 request queued first ran after four of priority 5), and it then
                # waited out its whole delay for company as well.
                if waiting and best[waiting[0]] < best[key]:
                    return waiting[0], None
                return key, None
            if not waiting:
                waiting.append(key)
            if target < first_at:
                first, first_at = key, target
        if force:
            # The flush timer's batch goes now, partial: after a higher priority's, as above.
            if waiting and first is not None and best[waiting[0]] < best[first]:
                return waiting[0], None
            return first, None
        return None, first_at

    def _arm_flush(self, target: float, now: float) -> None:
        if self._flush_timer is not None:
            if self._flush_at == target:
                return
            self._flush_timer.cancel()
        assert self._loop is not None
        self._flush_at = target
        self._flush_timer = self._loop.call_later(target - now, self._on_flush)

    def _cancel_flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    def _on_flush(self) -> None:
        self._flush_timer = None
        self._pump(force=True)

    def _queued(self) -> Iterator[_Entry[T, R]]:
        """Live entries in dispatch order: priority, then arrival."""
        for prio in self._prios:
            for entry in self._queues[prio]:
                if entry.state == _QUEUED:
                    yield entry

    def _take_batch(self, now: float, key: Hashable) -> tuple[list[_Entry[T, R]], int]:
        """Remove and return the next batch of ``key``: its first item plus later items with
        that key that fit. Stops at the first one that does not fit, so they keep FIFO."""
        limit = self._max_batch_size
        batch: list[_Entry[T, R]] = []
        stale: list[_Entry[T, R]] = []
        units = 0
        # Work that would finish after its deadline is not run: its caller has stopped waiting.
        self._forget_stale_estimate(now)
        cost = 0
        due = math.inf  # the batch's tightest deadline
        for entry in self._queued():
            if entry.deadline is not None and entry.deadline <= now + self._predict(
                entry.size, entry.cost
            ):
                stale.append(entry)
                continue
            if entry.key != key:
                continue
            if batch and units + entry.size > limit:
                break
            # A batch grows only while its tightest deadline still holds at its size: the head,
            # admitted to run as it was, ended late in the batch the queue behind it made.
            ends = math.inf if entry.deadline is None else entry.deadline
            if batch and now + self._predict(units + entry.size, cost + entry.cost) >= min(
                due, ends
            ):
                break
            batch.append(entry)
            units += entry.size
            cost += entry.cost
            due = min(due, ends)
            if limit == 0 or units >= limit:
                break
        for entry in stale:
            self._expire(entry)
        for entry in batch:
            self._unlink(entry, _DISPATCHED)
        self._tidy()
        return batch, units

    def _launch(self, batch: list[_Entry[T, R]], units: int, now: float) -> None:
        assert self._loop is not None
        info = BatchInfo(
            queue_ns=[max(0, round((now - e.enqueued) * 1e9)) for e in batch],
            size=units,
            left=lambda: [e.future.cancelled() for e in batch],
        )
        self._in_flight += 1
        cost = sum([e.cost for e in batch])
        predicted = self._predict(units, cost) if self.service_time.ready else 0.0
        self._running += predicted
        # A task per batch, not per item: callers and other batches proceed while it runs.
        task = self._loop.create_task(
            self._execute(batch, [e.item for e in batch], info, predicted, cost)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(
        self,
        batch: list[_Entry[T, R]],
        items: list[T],
        info: BatchInfo,
        predicted: float,
        cost: int,
    ) -> None:
        try:
            try:
                started = self._clock()
                results = await self._handler(items, info)
                self._observed_at = self._clock()
                self._observe(info.size, cost, self._observed_at - started)
                if len(results) != len(batch):
                    raise InternalError(
                        f"{self._label}: handler returned {len(results)} results "
                        f"for {len(batch)} items"
                    )
            except Exception as exc:
                # One failure, one exception object: every caller of the batch sees the same cause.
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                return
            except BaseException:
                for entry in batch:
                    entry.future.cancel()
                raise
            for entry, result in zip(batch, results, strict=True):
                if entry.future.done():  # a caller cancelled mid-batch: drop its result
                    continue
                if isinstance(result, Failed):
                    entry.future.set_exception(result.error)
                else:
                    entry.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._running = max(0.0, self._running - predicted) if self._in_flight else 0.0
            self._pump()

    # --- queue bookkeeping ------------------------------------------------------------------

    def _unlink(self, entry: _Entry[T, R], state: int) -> None:
        """Take an entry out of the counts at once; its deque slot is reclaimed later (_tidy)."""
        entry.state = state
        self._depth -= 1
        ahead = self._ahead[entry.prio]
        if ahead[0] == 1:
            del self._ahead[entry.prio]
        else:
            ahead[0] -= 1
            ahead[1] -= entry.size
            ahead[2] -= entry.cost
        self._garbage += 1
        left = self._units[entry.key] - entry.size
        if left:
            self._units[entry.key] = left
        else:
            del self._units[entry.key]
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _expire(self, entry: _Entry[T, R]) -> None:
        self._unlink(entry, _GONE)
        self.expired += entry.counted
        if not entry.future.done():
            entry.future.set_exception(
                DeadlineExceeded(
                    f"the deadline passed, or would pass before the request could finish, while "
                    f"it was queued in {self._label}; it was not executed"
                )
            )

    def _on_deadline(self, entry: _Entry[T, R]) -> None:
        entry.timer = None
        if entry.state == _QUEUED:
            self._expire(entry)
            self._tidy()
            self._pump()

    def _tidy(self) -> None:
        """Restore the invariant that every deque is non-empty and starts with a live entry, and
        compact when dead entries outnumber live ones, so removals stay O(1) amortized."""
        prios = self._prios
        i = 0
        while i < len(prios):
            queue = self._queues[prios[i]]
            while queue and queue[0].state != _QUEUED:
                queue.popleft()
                self._garbage -= 1
            if queue:
                i += 1
            else:
                del self._queues[prios[i]]
                del prios[i]
        if self._garbage > _GARBAGE_FLOOR and self._garbage > self._depth:
            for queue in self._queues.values():
                live = [e for e in queue if e.state == _QUEUED]
                queue.clear()
                queue.extend(live)
            self._garbage = 0
