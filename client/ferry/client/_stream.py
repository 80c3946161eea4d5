"""Many requests in flight on one ``InferStream``, results matched to requests by id.

Why a stream beats many unary calls for small models: a unary call pays for a new HTTP/2 stream,
headers and a Python-side call object each time, and a closed-loop caller waits a full round trip
between requests; on one stream every request is a single message and the server keeps a batch's
worth of them in flight.

Both classes share one model: ``submit()`` sends a request and returns its id at once;
``results()`` yields ``(id, InferResult | FerryError)`` in completion order. A request that fails
yields its error instead of raising, because the stream (and every other request on it) carries
on; only the end of the whole call (deadline, cancellation, the server going away) fails what is
still outstanding, each with that call's error. ``infer_many()`` is the loop most callers want:
it keeps ``max_in_flight`` requests outstanding over an iterable and yields results as they come.

The sync class runs a background thread that reads the gRPC response iterator; the async one runs a
reader task on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Final

import grpc
from grpc import aio

from ferry.client._errors import CancelledError, FerryError, InvalidInputError, from_rpc_error
from ferry.client._requests import (
    ArrayLike,
    encode_infer_request,
    needs_dtypes,
    new_request_id,
    parse_stream_response,
)
from ferry.client._types import InferResult, Timings
from ferry.proto.v1 import inference_pb2 as pb

StreamResult = tuple[str, InferResult | FerryError]
Inputs = Mapping[str, ArrayLike]
InputItem = Inputs | tuple[str, Inputs]

DEFAULT_MAX_IN_FLIGHT = 1024


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_END: Final = _Marker("END")  # the call is over: nothing more will arrive
_WAKE: Final = _Marker("WAKE")  # close() was called: re-check whether to stop waiting


def _item(index: int, item: InputItem) -> tuple[str, Inputs]:
    """An ``infer_many`` item: inputs (id = its position) or ``(id, inputs)``."""
    if isinstance(item, tuple):
        rid, inputs = item
        return str(rid), inputs
    return str(index), item


class _Base:
    """State and request building shared by the two flavours; no IO here."""

    def __init__(
        self,
        model: str,
        *,
        version: int | None,
        outputs: Sequence[str] | None,
        priority: int,
        max_in_flight: int,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.model = model
        self.version = version
        self.outputs = outputs
        self.priority = priority
        self.max_in_flight = max_in_flight
        self._pending: dict[str, tuple[float, float]] = {}  # id -> (sent at, encode seconds)
        self._unread = 0  # submitted, not yet yielded by results()
        self._closed = False
        self._done = False
        self._error: FerryError | None = None

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    def _build(
        self,
        inputs: Inputs,
        request_id: str | None,
        *,
        timeout: float | None,
        priority: int | None,
        outputs: Sequence[str] | None,
        dtypes: Mapping[str, Any] | None = None,
    ) -> tuple[str, bytes, float]:
        rid = new_request_id() if request_id is None else request_id
        t0 = time.perf_counter()
        request = encode_infer_request(
            self.model,
            inputs,
            version=self.version,
            outputs=outputs or self.outputs,
            timeout=timeout,
            priority=self.priority if priority is None else priority,
            request_id=rid,
            dtypes=dtypes,
        )
        return rid, request, time.perf_counter() - t0

    def _check_open(self, rid: str) -> None:
        if self._done:
            raise self._terminal_error()
        if self._closed:
            raise FerryError("this stream is closed: open a new one with client.stream(model)")
        if rid in self._pending:
            raise InvalidInputError(f"request id {rid!r} is already in flight on this stream")

    def _terminal_error(self) -> FerryError:
        if self._error is not None:
            return self._error
        return FerryError("this stream has ended: open a new one with client.stream(model)")

    def _answer(self, resp: pb.InferStreamResponse) -> StreamResult | None:
        """Match an answer to its request; None for an id we never sent (ignored)."""
        entry = self._pending.pop(resp.id, None)
        if entry is None:
            return None
        sent, encode = entry
        t0 = time.perf_counter()
        result = parse_stream_response(resp)
        if isinstance(result, InferResult):
            result.timings = Timings(encode=encode, rpc=t0 - sent, decode=time.perf_counter() - t0)
        return resp.id, result

    def _orphans(self, error: FerryError | None) -> list[StreamResult]:
        """Fail what is still outstanding when the call ends, each with the call's error."""
        self._done = True
        self._error = error
        err = error or FerryError("the server ended the stream before answering this request")
        orphans: list[StreamResult] = [(rid, err) for rid in self._pending]
        self._pending.clear()
        return orphans

    def _should_stop(self, until_closed: bool) -> bool:
        return self._unread == 0 and (not until_closed or self._closed or self._done)


class InferStream(_Base):
    """A synchronous stream of inference requests to one model; see the module docstring.

    >>> with client.stream("mlp") as stream:                        # doctest: +SKIP
    ...     ids = [stream.submit({"input": x}) for x in batches]
    ...     for rid, result in stream.results():
    ...         ...

    ``submit`` blocks while ``max_in_flight`` requests are unanswered, which bounds memory without
    a reader having to keep up. Thread-safe: one thread may submit while another reads results.
    """

    def __init__(
        self,
        method: Any,
        model: str,
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        dtypes: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        super().__init__(
            model, version=version, outputs=outputs, priority=priority, max_in_flight=max_in_flight
        )
        self._dtypes = dtypes
        self._cond = threading.Condition()
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[StreamResult | _Marker] = queue.SimpleQueue()
        self._call = method(self._request_iterator(), timeout=timeout, metadata=metadata)
        self._reader = threading.Thread(
            target=self._read, name=f"ferry-stream-{model}", daemon=True
        )
        self._reader.start()

    def _request_iterator(self) -> Iterator[bytes]:
        while True:
            request = self._requests.get()
            if request is None:
                return
            yield request

    def _read(self) -> None:
        error: FerryError | None = None
        try:
            for resp in self._call:
                with self._cond:
                    answered = self._answer(resp)
                    self._cond.notify_all()
                if answered is not None:
                    self._results.put(answered)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        except Exception as exc:  # a bug decoding an answer must not hang the readers
            error = FerryError(f"stream reader failed: {type(exc).__name__}: {exc}")
        with self._cond:
            orphans = self._orphans(error)
            self._cond.notify_all()
        for orphan in orphans:
            self._results.put(orphan)
        self._results.put(_END)

    def submit(
        self,
        inputs: Inputs,
        request_id: str | None = None,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        outputs: Sequence[str] | None = None,
    ) -> str:
        """Send one request and return its id (``request_id``, or a fresh unique one).

        ``timeout`` is this request's queueing + execution budget on the server. Raises
        InvalidInputError for an id already in flight, and the stream's error once it has ended.
        """
        dtypes = self._dtypes() if self._dtypes is not None and needs_dtypes(inputs) else None
        rid, request, encode = self._build(
            inputs, request_id, timeout=timeout, priority=priority, outputs=outputs, dtypes=dtypes
        )
        with self._cond:
            self._check_open(rid)
            while len(self._pending) >= self.max_in_flight and not self._done:
                self._cond.wait()
            self._check_open(rid)
            self._pending[rid] = (time.perf_counter(), encode)
            self._unread += 1
            self._requests.put(request)
        return rid

    def results(self, *, until_closed: bool = False) -> Iterator[StreamResult]:
        """Yield ``(id, InferResult | FerryError)`` as answers arrive.

        Ends once every request submitted so far has been yielded; with ``until_closed=True`` it
        instead waits for more until ``close()`` is called (for a producer in another thread).
        It also ends when the call ends, after yielding each outstanding request with its error.
        """
        while True:
            with self._cond:
                if self._should_stop(until_closed):
                    return
            item = self._results.get()
            if item is _END:
                self._results.put(_END)  # later calls must not block either
                return
            if isinstance(item, _Marker):
                continue
            with self._cond:
                self._unread -= 1
            yield item

    def infer_many(
        self, items: Iterable[InputItem], *, max_in_flight: int = 64
    ) -> Iterator[StreamResult]:
        """Run every item, ``max_in_flight`` at a time, yielding results in completion order.

        An item is a mapping of inputs (its id is its position, ``"0"``, ``"1"``, ...) or an
        ``(id, inputs)`` pair. Do not mix with ``results()`` on the same stream.
        """
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        source = enumerate(items)
        outstanding = 0

        def send_next() -> bool:
            nxt = next(source, None)
            if nxt is None:
                return False
            rid, inputs = _item(*nxt)
            self.submit(inputs, rid)
            return True

        while outstanding < max_in_flight and send_next():
            outstanding += 1
        while outstanding:
            item = self._results.get()
            if item is _END:
                self._results.put(_END)
                raise self._terminal_error()
            if isinstance(item, _Marker):
                continue
            with self._cond:
                self._unread -= 1
            outstanding -= 1
            yield item
            if send_next():
                outstanding += 1

    def close(self) -> None:
        """Send no more requests; answers to those in flight still arrive."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._requests.put(None)
        self._results.put(_WAKE)

    def cancel(self) -> None:
        """End the call now: outstanding requests yield CancelledError."""
        self.close()
        self._call.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the call to end (after ``close()``); False if ``timeout`` passed first."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def __enter__(self) -> InferStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()
        self._reader.join()


class AsyncInferStream(_Base):
    """The asyncio stream: ``await submit(...)``, ``async for ... in results()``.

    >>> async with client.stream("mlp") as stream:                  # doctest: +SKIP
    ...     async for rid, result in stream.infer_many(inputs, max_in_flight=32):
    ...         ...

    The call starts on first use, on the running loop. Not thread-safe (asyncio objects never are).
    """

    def __init__(
        self,
        method: Any,
        model: str,
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        dtypes: Callable[[], Awaitable[Mapping[str, Any] | None]] | None = None,
    ) -> None:
        super().__init__(
            model, version=version, outputs=outputs, priority=priority, max_in_flight=max_in_flight
        )
        self._dtypes = dtypes
        self._method = method
        self._timeout = timeout
        self._metadata = metadata
        self._call: aio.StreamStreamCall[Any, Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._results: asyncio.Queue[StreamResult | _Marker] = asyncio.Queue()
        self._slots = asyncio.Condition()
        self._blocked = 0  # submitters waiting for a free slot
        self._write_lock = asyncio.Lock()
        self._cancelled = False

    def _start(self) -> aio.StreamStreamCall[Any, Any]:
        if self._call is None:
            self._call = self._method(timeout=self._timeout, metadata=self._metadata)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call))
        return self._call

    async def _read(self, call: aio.StreamStreamCall[Any, Any]) -> None:
        error: FerryError | None = None
        try:
            while True:
                resp = await call.read()
                if resp is aio.EOF:
                    break
                answered = self._answer(resp)
                if answered is not None:
                    self._results.put_nowait(answered)
                if self._blocked:
                    async with self._slots:
                        self._slots.notify_all()
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        except asyncio.CancelledError:
            error = CancelledError("the stream was cancelled by the client")
            if not self._cancelled:
                self._finish(error)
                raise
        except Exception as exc:
            error = FerryError(f"stream reader failed: {type(exc).__name__}: {exc}")
        if self._cancelled and error is None:
            error = CancelledError("the stream was cancelled by the client")
        self._finish(error)
        async with self._slots:
            self._slots.notify_all()

    def _finish(self, error: FerryError | None) -> None:
        for orphan in self._orphans(error):
            self._results.put_nowait(orphan)
        self._results.put_nowait(_END)

    async def submit(
        self,
        inputs: Inputs,
        request_id: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the server-side budget, as in submit()
        priority: int | None = None,
        outputs: Sequence[str] | None = None,
    ) -> str:
        """Send one request and return its id; see :meth:`InferStream.submit`."""
        dtypes = None
        if self._dtypes is not None and needs_dtypes(inputs):
            dtypes = await self._dtypes()
        rid, request, encode = self._build(
            inputs, request_id, timeout=timeout, priority=priority, outputs=outputs, dtypes=dtypes
        )
        call = self._start()
        self._check_open(rid)
        if len(self._pending) >= self.max_in_flight:
            self._blocked += 1
            try:
                async with self._slots:
                    await self._slots.wait_for(
                        lambda: len(self._pending) < self.max_in_flight or self._done
                    )
            finally:
                self._blocked -= 1
        self._check_open(rid)
        self._pending[rid] = (time.perf_counter(), encode)
        self._unread += 1
        try:
            async with self._write_lock:
                await call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            # The call ended under us; the reader fails the request unless it already has.
            if rid in self._pending:
                del self._pending[rid]
                self._unread -= 1
            if isinstance(exc, grpc.RpcError):
                raise from_rpc_error(exc) from None
            raise self._terminal_error() from None
        return rid

    async def results(self, *, until_closed: bool = False) -> AsyncIterator[StreamResult]:
        """Yield ``(id, InferResult | FerryError)`` as answers arrive; see
        :meth:`InferStream.results` for when it ends."""
        while not self._should_stop(until_closed):
            item = await self._results.get()
            if item is _END:
                self._results.put_nowait(_END)
                return
            if isinstance(item, _Marker):
                continue
            self._unread -= 1
            yield item

    async def infer_many(
        self, items: Iterable[InputItem] | AsyncIterable[InputItem], *, max_in_flight: int = 64
    ) -> AsyncIterator[StreamResult]:
        """Run every item, ``max_in_flight`` at a time; see :meth:`InferStream.infer_many`."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        source = _aenumerate(items)
        outstanding = 0

        async def send_next() -> bool:
            nxt = await anext(source, None)
            if nxt is None:
                return False
            rid, inputs = _item(*nxt)
            await self.submit(inputs, rid)
            return True

        while outstanding < max_in_flight and await send_next():
            outstanding += 1
        while outstanding:
            item = await self._results.get()
            if item is _END:
                self._results.put_nowait(_END)
                raise self._terminal_error()
            if isinstance(item, _Marker):
                continue
            self._unread -= 1
            outstanding -= 1
            yield item
            if await send_next():
                outstanding += 1

    async def close(self) -> None:
        """Send no more requests; answers to those in flight still arrive."""
        if self._closed:
            return
        self._closed = True
        if self._call is not None:
            async with self._write_lock:
                # If the call already ended, the reader has recorded why.
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
        self._results.put_nowait(_WAKE)

    async def cancel(self) -> None:
        """End the call now: outstanding requests yield CancelledError."""
        self._cancelled = True
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._results.put_nowait(_WAKE)
        await self.wait()

    async def wait(self) -> None:
        """Wait for the call to end (after ``close()``)."""
        if self._reader is not None:
            await asyncio.shield(self._reader)

    async def __aenter__(self) -> AsyncInferStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
            await self.wait()
        else:
            await self.cancel()


async def _aenumerate(
    items: Iterable[InputItem] | AsyncIterable[InputItem],
) -> AsyncIterator[tuple[int, InputItem]]:
    index = 0
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield index, item
            index += 1
    else:
        for item in items:
            yield index, item
            index += 1
