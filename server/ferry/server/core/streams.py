"""Running a bidirectional stream's requests: concurrently, bounded, cancelled with the stream.

Protocol-agnostic (any async iterator of requests, any response type), so every streaming
protocol gets the same flow control and the same cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from ferry.server.errors import Unavailable

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# How many times one stream's bound every stream of a process may hold together before each
# stream runs one request at a time (``StreamBudget``).
SHARED_FACTOR = 4
# How long a stream running nothing at the server's stop still reads for its client's half-close
# (``run_stream``'s ``stopping``): one already sent may be on the network, or in grpc's core
# waiting for the event loop. Short, since a client that keeps its stream open holds the stop
# this long.
HALF_CLOSE_S = 1.0


class StreamBudget:
    """The requests every stream of one process holds (read, and not yet answered on the wire).

    One stream's bound (``max_in_flight``) keeps a client that sends without reading from
    holding more than that many answers; it said nothing of many such streams (a connection
    carries hundreds, and connections are not counted), and each held up to ``max_in_flight``
    answers in memory. Past ``total``, a stream that holds any request is not read until its
    client has read its answers: a stream whose client reads goes on one request at a time,
    and one whose client does not adds at most one more."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        # The grace period of the server's stop, once it began (``half_close_window``).
        self.stop_grace_s: float | None = None

    def half_close_window(self) -> float:
        """How long a stream running nothing reads for its client's half-close at the stop:
        ``HALF_CLOSE_S``, within half the stop's grace period. A grace period shorter than it
        cut an idle stream its client kept open with grpc's "Cancelling all calls" (the SDK's
        ConnectionError_) instead of the stream's own UNAVAILABLE saying to send again."""
        if self.stop_grace_s is None:
            return HALF_CLOSE_S
        return max(0.0, min(HALF_CLOSE_S, self.stop_grace_s / 2))

    @property
    def full(self) -> bool:
        return self.held >= self.total


# A request whose handler raised instead of answering (cancelled with the stream): no answer to
# wait for in an ordered stream.
_SKIPPED = object()


async def run_stream(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    max_in_flight: int,
    budget: StreamBudget | None = None,
    *,
    ordered: bool = False,
    stopping: asyncio.Event | None = None,
) -> AsyncIterator[Resp]:
    """Run a bidirectional stream's requests concurrently, yielding responses as they complete,
    or with ``ordered`` in the order their requests came.

    ``handle`` turns one request into its response, errors included (a stream has no status per
    message). A request holds one of ``max_in_flight`` slots until its response is written, not
    merely computed: a client that sends without reading stops being read, and HTTP/2 flow
    control pushes back on it instead of responses piling up in memory. ``budget`` bounds what
    every stream holds together (``StreamBudget``). When the client goes away, every running
    request is cancelled, so nothing leaks. A request stream that breaks (a malformed message)
    ends the call with its error once every request read before it is answered: they were
    answered or dropped by chance (as they finished before the error reached here or not), so
    a client could not tell which of them had run.

    ``ordered`` is the Open Inference Protocol's stream: Triton answers a model that is not
    decoupled in request order, and its clients (tritonclient's ``start_stream`` callback,
    request ids optional) may match answers to requests by their order. In completion order,
    a request to a fast model overtook one to a slow model (or a batch, a priority, an instance
    finishing first), and such a client read each answer as the other's. Requests still run
    concurrently; an answer that is ready waits for the earlier ones, holding its slot.

    ``stopping``: set when the server begins to stop. The stream then runs no request read after
    it, answers every request it read, and ends UNAVAILABLE (``Unavailable``), so that a request
    without an answer is one that never ran, to send again elsewhere. Before, a stream its
    client kept open (the SDK's, tritonclient's start_stream) was read and served until the
    grace period ran out, holding the whole stop, and was then cut with the requests it was
    running unanswered, though they may have run. While requests it read are still running,
    the stream goes on reading, to see whether its client has half-closed: a stream whose
    client had sent everything and half-closed ends OK with every request answered. Before,
    a stop that came while the reader waited for a slot dropped the request it held (read,
    never run) and cut a half-closed stream UNAVAILABLE, as if the client had more to send.
    Once nothing runs, the stream still reads for ``HALF_CLOSE_S`` (at most half the stop's
    grace period: ``StreamBudget.half_close_window``) before it ends UNAVAILABLE:
    a half-close on its way when the stop began (sent, not yet read) ends it OK. Before, a
    stream running nothing was cut at once, and a client that had been answered and
    half-closed got UNAVAILABLE after its last answer."""
    budget = budget if budget is not None else StreamBudget(max_in_flight)
    done: asyncio.Queue[tuple[int, object] | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    held = 0  # this stream's share of budget.held
    emptied = asyncio.Event()  # set whenever this stream holds nothing
    reading = True  # the reader is still taking requests (a stop cancels it only there)
    halted = False  # the stop ended the reading
    in_hand = False  # the reader holds a request it read, waiting for a slot
    settled = asyncio.Event()  # set whenever a request ends or the reader moves on (``halt``)

    def release() -> None:
        nonlocal held
        if held:  # after the stream ended, its share is already given back
            held -= 1
            budget.held -= 1
        if not held:
            emptied.set()
        slots.release()

    async def one(msg: Req, seq: int) -> None:
        try:
            response = await handle(msg)
        except BaseException:
            release()
            done.put_nowait((seq, _SKIPPED))
            raise
        done.put_nowait((seq, response))

    def ended(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        settled.set()

    async def reader() -> None:
        nonlocal held, reading, halted, in_hand
        seq = 0
        broken: Exception | None = None
        try:
            try:
                async for msg in requests:
                    if stopping is not None and stopping.is_set():
                        halted = True  # read after the stop began: not run, nor read on
                        break
                    in_hand = True
                    await slots.acquire()
                    while budget.full and held:
                        emptied.clear()
                        await emptied.wait()
                    held += 1
                    budget.held += 1
                    task = asyncio.create_task(one(msg, seq))
                    seq += 1
                    tasks.add(task)
                    task.add_done_callback(ended)
                    in_hand = False
                    settled.set()
            except asyncio.CancelledError:
                if not halted:  # the stream itself ended: nothing to answer
                    raise
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            except Exception as exc:  # a broken request stream (a malformed message)
                broken = exc
            reading = False
            settled.set()
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            if broken is not None:  # after every request read before it is answered
                raise broken
        finally:
            done.put_nowait(None)

    async def halt() -> None:
        nonlocal halted
        assert stopping is not None
        await stopping.wait()
        # The stream cannot end before the requests it read are answered: until then, its
        # reader may yet read the client's half-close (or a request, which it does not run).
        while reading and (tasks or in_hand):
            settled.clear()
            await settled.wait()
        # Nothing runs: a half-close (or a request, which ends the reading too) may be on its
        # way still; the reader takes it within the moment, or the stream ends UNAVAILABLE.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget.half_close_window()):
                while reading:
                    settled.clear()
                    await settled.wait()
        if reading:  # every request answered, the client silent: stop waiting for it
            halted = True
            read_task.cancel()

    read_task = asyncio.create_task(reader())
    halt_task = asyncio.create_task(halt()) if stopping is not None else None
    ready: dict[int, object] = {}  # answers waiting for an earlier one (ordered)
    following = 0  # the request whose answer goes next (ordered)
    try:
        while (item := await done.get()) is not None:
            if not ordered:
                if item[1] is not _SKIPPED:
                    yield item[1]  # type: ignore[misc]
                    release()
                continue
            ready[item[0]] = item[1]
            while following in ready:
                response = ready.pop(following)
                following += 1
                if response is not _SKIPPED:  # its slot went back when it raised
                    yield response  # type: ignore[misc]
                    release()
        await read_task  # a broken request stream ends the call with its error
        if halted:
            raise Unavailable(
                "the server is shutting down: every request this stream started is answered, "
                "and those without an answer were not run: send them again on a new stream (to "
                "another replica)"
            )
    finally:
        budget.held -= held
        held = 0
        if halt_task is not None:
            halt_task.cancel()
        read_task.cancel()
        for task in list(tasks):
            task.cancel()
