"""The load generator: closed and open loops over grpc.aio, unary or streaming.

Built so that the generator is not what gets measured: one event loop and plain coroutines (no
threads, no task per request in the closed loop), the request serialized once before the run and
sent as the same bytes every time (the stream appends each request's id to those bytes: a
protobuf parser keeps the last value of a repeated scalar field, so no re-encoding is needed), and
unary answers left undecoded. ``bench/loadgen_ceiling.py`` measures what this reaches against a
server that answers instantly.

Open-loop latency is measured from each request's *scheduled* time, not from when it was sent, so a
generator or server that falls behind shows up in the latency instead of silently lowering the
offered load (coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import grpc
import numpy as np
from grpc import aio

from ferry.client._requests import build_infer_request, status_code
from ferry.client.loadtest._report import Recorder, latency_summary
from ferry.codec import datatype_name, to_bytes
from ferry.codec._wire import encode_varint
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.v1 import inference_pb2 as pb

UNARY_PATH = "/ferry.v1.Inference/Infer"
STREAM_PATH = "/ferry.v1.Inference/InferStream"
KSERVE_PATH = "/inference.GRPCInferenceService/ModelInfer"
KSERVE_STREAM_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"
MAX_OPEN_IN_FLIGHT = 4096  # open loop: arrivals beyond this many unanswered are dropped

Metadata = tuple[tuple[str, str], ...] | None


def encode_ferry(
    model: str, version: int | None, inputs: Mapping[str, np.ndarray], timeout: float
) -> bytes:
    """The serialized ``ferry.v1.InferRequest``, built once per run."""
    request = build_infer_request(model, inputs, version=version, timeout=timeout)
    return bytes(request.SerializeToString())


def encode_kserve(model: str, version: int | None, inputs: Mapping[str, np.ndarray]) -> bytes:
    """The serialized Open Inference Protocol ``ModelInferRequest`` (raw_input_contents)."""
    try:
        from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
    except ImportError:  # pragma: no cover - the adapter's messages ship with this package
        raise NotImplementedError(
            "--protocol kserve needs the Open Inference Protocol messages "
            "(ferry.proto.kserve.v2), which this install lacks: use --protocol ferry"
        ) from None
    request = kpb.ModelInferRequest(model_name=model, model_version=str(version or ""))
    for name, array in inputs.items():
        code, shape, data = to_bytes(np.asarray(array))
        request.inputs.add(name=name, datatype=datatype_name(code), shape=shape)
        request.raw_input_contents.append(data)
    return bytes(request.SerializeToString())


def id_field(request_id: str) -> bytes:
    """``InferRequest.id`` (field 3, length-delimited) as bytes to append to a serialized request."""
    raw = request_id.encode()
    return b"\x1a" + encode_varint(len(raw)) + raw


def _code(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    return code.name if code is not None else "UNKNOWN"


class UnaryTransport:
    """One RPC per request, round-robin over the connections; answers are not decoded."""

    def __init__(
        self,
        channels: Sequence[aio.Channel],
        path: str,
        payload: bytes,
        timeout: float,
        metadata: Metadata,
    ) -> None:
        self._calls: list[aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            ch.unary_unary(path, request_serializer=None, response_deserializer=None)
            for ch in channels
        ]
        self._payload = payload
        self._timeout = timeout
        self._metadata = metadata
        self._next = 0

    async def request(self) -> str:
        call = self._calls[self._next]
        self._next = (self._next + 1) % len(self._calls)
        try:
            await call(self._payload, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            return _code(exc)
        return "OK"

    async def close(self) -> None:
        return None


_CODE_NAMES = frozenset(code.name for code in grpc.StatusCode)


def _ferry_answer(resp: pb.InferStreamResponse) -> tuple[str, str]:
    """A ferry.v1 stream answer's request id and status code name."""
    if not resp.HasField("error"):
        return resp.id, "OK"
    sc = status_code(resp.error.code)
    return resp.id, sc.name if sc is not None else "UNKNOWN"


def _kserve_answer(resp: kpb.ModelStreamInferResponse) -> tuple[str, str]:
    """An Open Inference Protocol stream answer's request id and status code name: an error
    is ``error_message``, led by "[StatusCode.NAME]" (Ferry's and tritonclient's form)."""
    rid = resp.infer_response.id
    if not resp.error_message:
        return rid, "OK"
    head = resp.error_message.partition("]")[0]
    name = head.removeprefix("[StatusCode.")
    return rid, name if head.startswith("[StatusCode.") and name in _CODE_NAMES else "UNKNOWN"


class _OneStream:
    """One stream call (ferry.v1 ``InferStream`` or the Open Inference Protocol's
    ``ModelStreamInfer``): a writer task drains a queue of pre-encoded requests and a reader
    task resolves each request's future by the id in its answer. Both protocols' requests
    carry their id as field 3, so the same bytes are appended to either."""

    def __init__(
        self,
        channel: aio.Channel,
        base: bytes,
        metadata: Metadata,
        prefix: str,
        timeout: float | None = None,
        *,
        protocol: str = "ferry",
    ) -> None:
        self._timeout = timeout
        kserve = protocol == "kserve"
        self._answer = _kserve_answer if kserve else _ferry_answer
        self._method: aio.StreamStreamMultiCallable[bytes, Any] = channel.stream_stream(
            KSERVE_STREAM_PATH if kserve else STREAM_PATH,
            request_serializer=None,
            response_deserializer=(
                kpb.ModelStreamInferResponse.FromString
                if kserve
                else pb.InferStreamResponse.FromString
            ),
        )
        self._base = base
        self._metadata = metadata
        self._prefix = prefix
        self._counter = 0
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    def _open(self) -> None:
        for task in self._tasks:  # the ended call's writer still waits on its old queue
            task.cancel()
        self._call = self._method(metadata=self._metadata)
        self._queue = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._write(self._call, self._queue)),
            asyncio.create_task(self._read(self._call)),
        ]

    async def _write(self, call: Any, q: asyncio.Queue[bytes | None]) -> None:
        try:
            while True:
                msg = await q.get()
                if msg is None:
                    await call.done_writing()
                    return
                await call.write(msg)
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the reader sees the call's status and fails what is pending

    async def _read(self, call: Any) -> None:
        code = "UNKNOWN"
        try:
            while True:
                resp = await call.read()
                if resp is aio.EOF:
                    break
                rid, status = self._answer(resp)
                fut = self._pending.pop(rid, None)
                if fut is None or fut.done():
                    continue
                fut.set_result(status)
        except grpc.RpcError as exc:
            code = _code(exc)
        except asyncio.CancelledError:
            code = "CANCELLED"
        if self._call is call:
            self._call = None  # the next request opens a fresh stream
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(code)
        self._pending.clear()

    async def request(self) -> str:
        if self._call is None:
            self._open()
        self._counter += 1
        rid = f"{self._prefix}{self._counter}"
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._queue.put_nowait(self._base + id_field(rid))
        try:
            # The client's own deadline, as a unary call has: the request's timeout_us asks the
            # server to keep to it, but a request the server never answers (or answers late)
            # was counted OK with its whole latency, and held the level open past its end.
            return await asyncio.wait_for(fut, self._timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            return "DEADLINE_EXCEEDED"

    async def close(self) -> None:
        if self._call is not None:
            self._queue.put_nowait(None)
            # The server ends the stream once it has answered; one that never does must not
            # hold the run: after the timeout the call is cancelled.
            await asyncio.wait(self._tasks, timeout=self._timeout)
            if hasattr(self._call, "cancel"):
                self._call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._call = None


class StreamTransport:
    """Requests spread over one stream per connection (``_OneStream``)."""

    def __init__(
        self,
        channels: Sequence[aio.Channel],
        base: bytes,
        metadata: Metadata,
        timeout: float | None = None,
        *,
        protocol: str = "ferry",
    ) -> None:
        self._streams = [
            _OneStream(ch, base, metadata, f"{i}-", timeout, protocol=protocol)
            for i, ch in enumerate(channels)
        ]
        self._next = 0

    async def request(self) -> str:
        stream = self._streams[self._next]
        self._next = (self._next + 1) % len(self._streams)
        return await stream.request()

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams))


Transport = UnaryTransport | StreamTransport


# A closed-loop caller's pause after UNAVAILABLE (doubling up to the most), as a client with
# backoff would wait before trying a server that is not there.
MIN_PAUSE = 0.01
MAX_PAUSE = 1.0


class Budget:
    """Whether another request may start: a request count and a stop flag set by a timer."""

    def __init__(self, requests: int | None) -> None:
        self.remaining = requests
        self.stopped = False
        self.stopped_at: float | None = None  # perf_counter when stop() was called
        self.stopping = asyncio.Event()  # set with stopped: a wait for the next arrival ends

    def take(self) -> bool:
        if self.stopped:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True

    def stop(self) -> None:
        self.stopped = True
        self.stopped_at = time.perf_counter()
        self.stopping.set()


async def closed_loop(
    transport: Transport, concurrency: int, budget: Budget, rec: Recorder
) -> None:
    """``concurrency`` coroutines, each sending its next request as soon as one is answered."""
    clock = time.perf_counter

    async def worker() -> None:
        request, add, take = transport.request, rec.add, budget.take
        pause = 0.0
        while take():
            t0 = clock()
            code = await request()
            add(clock() - t0, code)
            if code != "UNAVAILABLE":
                pause = 0.0
                continue
            # A server that is gone answers at once: without a pause the loop spun, and its
            # error count (22,411 in 2 s in a review) measured the client, not the server.
            pause = min(max(pause * 2, MIN_PAUSE), MAX_PAUSE)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(budget.stopping.wait(), pause)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def open_loop(
    transport: Transport,
    rate: float,
    *,
    arrival: str,
    budget: Budget,
    rec: Recorder,
    rng: random.Random,
    max_in_flight: int = MAX_OPEN_IN_FLIGHT,
    duration: float | None = None,
) -> None:
    """Send at ``rate`` requests per second whatever the answers do (constant gaps or Poisson
    arrivals); latency counts from each request's scheduled time.

    With ``duration`` the level is the window ``[first arrival, first arrival + duration)`` of
    this loop's own schedule: the arrivals due in it are sent (or dropped, or counted unsent when
    the loop fell behind), none after it. A timer's stop came a little after the window (the
    event loop runs timers late), so the arrival due exactly at its end was reported as due
    and never sent on every run, with a warning that the rate had not been offered. Without
    ``duration`` the level ends when ``budget`` stops, or at its request count."""
    clock = time.perf_counter
    tasks: set[asyncio.Task[None]] = set()
    in_flight = 0

    async def one(scheduled: float) -> None:
        nonlocal in_flight
        try:
            code = await transport.request()
            rec.add(clock() - scheduled, code)
        finally:
            in_flight -= 1

    first = scheduled = clock()
    arrivals = 0

    def advance() -> None:
        # Constant arrivals are computed, not summed: 0.025 added 40 times is not 1.0, and the
        # arrival due exactly at the level's end must compare equal to that end.
        nonlocal scheduled, arrivals
        arrivals += 1
        if arrival == "poisson":
            scheduled += rng.expovariate(rate)
        else:
            scheduled = first + arrivals / rate

    def count_unsent(end: float) -> None:
        # Arrivals due before the end that this loop never reached (it fell behind its
        # schedule) were offered to no one: counted, or the report hid the shortfall.
        while scheduled < end:
            rec.unsent += 1
            advance()

    end = None if duration is None else first + duration
    while budget.take():
        if end is not None:
            if scheduled >= end:
                # The next arrival falls after the level; the level still lasts its whole
                # window, or a rate of 7/s over 1 s read as 8.1/s (7 answers in 0.86 s).
                await asyncio.sleep(max(0.0, end - clock()))
                break
            if clock() >= end:
                count_unsent(end)
                break
        delay = scheduled - clock()
        if delay > 0.0005:
            # Until the next arrival or the level's end, whichever comes first: at 0.01
            # requests/s a 2 s level slept 100 s for its next arrival.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(budget.stopping.wait(), delay)
        else:
            await asyncio.sleep(0)  # behind schedule: still let answers in
        if budget.stopped:
            count_unsent(budget.stopped_at or clock())
            break
        if in_flight >= max_in_flight:
            rec.dropped += 1
        else:
            in_flight += 1
            task = asyncio.create_task(one(scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        advance()
    if tasks:
        await asyncio.gather(*tasks)


class Progress:
    """A one-line live view on a terminal, redrawn twice a second; a no-op elsewhere."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._task: asyncio.Task[None] | None = None

    def start(self, label: str, rec: Recorder, limit: float | None) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run(label, rec, limit))

    async def _run(self, label: str, rec: Recorder, limit: float | None) -> None:
        start = last_t = time.perf_counter()
        last_n = last_ok = 0
        while True:
            await asyncio.sleep(0.5)
            now = time.perf_counter()
            n = rec.completed
            recent = latency_summary(rec.latencies[last_ok:])["p50"]
            until = f"/{limit:.0f}s" if limit else "s"
            self.stream.write(
                f"\r{label}  {now - start:5.1f}{until}  {n:>10,} req  "
                f"{(n - last_n) / (now - last_t):>9,.0f} req/s  p50 {recent:7.3f} ms  "
                f"errors {n - rec.ok:,}   "
            )
            self.stream.flush()
            last_t, last_n, last_ok = now, n, len(rec.latencies)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


async def run_level(
    transport: Transport,
    *,
    concurrency: int | None,
    rate: float | None,
    arrival: str,
    duration: float | None,
    requests: int | None,
    rng: random.Random,
    progress: Progress | None = None,
    label: str = "",
) -> tuple[Recorder, float]:
    """Run one level; returns what was recorded and the seconds it took."""
    rec = Recorder()
    budget = Budget(requests)
    loop = asyncio.get_running_loop()
    # An open loop ends its level by its own schedule (see open_loop); a closed one by this timer.
    timer = None
    if duration is not None and rate is None:
        timer = loop.call_later(duration, budget.stop)
    if progress is not None:
        progress.start(label, rec, duration)
    start = time.perf_counter()
    try:
        if rate is not None:
            await open_loop(
                transport,
                rate,
                arrival=arrival,
                budget=budget,
                rec=rec,
                rng=rng,
                duration=duration,
            )
        else:
            await closed_loop(transport, concurrency or 1, budget, rec)
    finally:
        elapsed = time.perf_counter() - start
        if timer is not None:
            timer.cancel()
        if progress is not None:
            await progress.stop()
    return rec, elapsed


def make_transport(
    channels: Sequence[aio.Channel],
    *,
    mode: str,
    protocol: str,
    payload: bytes,
    timeout: float,
    metadata: Metadata,
) -> Transport:
    if mode == "stream":
        return StreamTransport(channels, payload, metadata, timeout, protocol=protocol)
    path = KSERVE_PATH if protocol == "kserve" else UNARY_PATH
    return UnaryTransport(channels, path, payload, timeout, metadata)
