"""The asyncio client: the sync client's methods and names, awaited.

Both clients derive from ``InferenceClientBase`` (``_base``), which holds the constructor, the
dtype cache and request building, and both parse answers with the same IO-free functions
(``_requests``, ``_wire``), so the two cannot drift apart; only the transport differs. The channel
is created on first use, inside the running event loop, because grpc.aio binds a channel to the
loop it was made in: a client constructed at import time and used under ``asyncio.run`` still
works.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc import aio

from ferry.client import _health
from ferry.client._base import InferenceClientBase
from ferry.client._channel import create_aio_channel
from ferry.client._errors import (
    CancelledError,
    ClientClosedError,
    FerryError,
    InvalidInputError,
    from_rpc_error,
)
from ferry.client._requests import (
    ArrayLike,
    check_timeout,
    needs_dtypes,
    parse_list_models,
    parse_metadata,
    parse_statistics,
    request,
)
from ferry.client._retry import acall_with_retry
from ferry.client._stream import (
    DEFAULT_MAX_IN_FLIGHT,
    END,
    WAKE,
    InputItem,
    Inputs,
    Marker,
    Positions,
    Resend,
    StreamResult,
    StreamState,
    aenumerate,
    cancelled_error,
    check_max_in_flight,
    left_of,
    stamped,
)
from ferry.client._stream_limit import HEADERS_WAIT_S, over_server_limit, stream_metadata
from ferry.client._types import InferResult, ModelMetadata, ModelStatistics, ModelVersionStatus
from ferry.proto.v1 import inference_pb2 as pb

R = TypeVar("R")
# Seconds close() waits for a loop running in another thread to close its channel; past them (a
# loop that stopped or is blocked) the channel is released from the closing thread instead.
_CLOSE_ELSEWHERE_S = 5.0


class AsyncInferenceClient(InferenceClientBase):
    """Asynchronous client of Ferry's inference listener (grpc.aio).

    >>> async with AsyncInferenceClient("127.0.0.1:8001") as client:  # doctest: +SKIP
    ...     out = await client.infer("mlp", {"input": np.zeros((1, 64), np.float32)})

    The constructor takes exactly the sync ``InferenceClient``'s arguments, with the same meaning.
    """

    def _open(self) -> None:
        """Nothing yet: the channel must be made inside the loop that will use it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        # Streams made by this client: one whose call is open when its channel is released
        # from another loop must be ended on its own loop (``_release_idle``).
        self._streams: weakref.WeakSet[AsyncInferStream] = weakref.WeakSet()

    def _release_idle(self, why: FerryError) -> None:
        """Release the channel of a loop that has ended or idles, ending its open streams.

        grpc.aio leaves a call of a released channel pending for good: a stream on a loop that
        idled (``run_until_complete`` returned) while the client was closed or used from
        another loop hung in ``results()`` and ``wait()`` once its loop ran again. Each such
        stream is ended with ``why`` when its loop next runs (it cannot be touched from here,
        asyncio objects belong to their loop's thread)."""
        channel, loop = self._channel, self._loop
        self._channel = None
        if loop is not None and not loop.is_closed():
            for stream in list(self._streams):
                if stream._open_on(loop):
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        loop.call_soon_threadsafe(stream._abandon, why)
        _release(channel)

    def _connect(self) -> Any:
        """The stub, binding a channel on this loop first if there is none, or if the channel
        was made on a loop that is not running now: a client used by a second ``asyncio.run``
        raised RuntimeError ("Event loop is closed") from its first loop's channel, and one
        used after ``run_until_complete`` left its loop idle, "attached to a different loop".
        grpc.aio binds a channel to one loop, so a loop running in another thread keeps its
        channel, and a call from a second live loop is refused with a FerryError (it was that
        same bare RuntimeError, or a call left pending)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is not loop:
            if self._loop is not None and self._loop.is_running():
                raise FerryError(
                    f"this {type(self).__name__} is in use by an event loop running in another "
                    "thread, and grpc.aio binds a channel to one loop: make one client per "
                    "event loop (one per thread that runs a loop)"
                )
            # Its loop has ended or idles: it cannot serve this one.
            self._release_idle(
                CancelledError(
                    f"this stream's channel was closed: its {type(self).__name__} was used "
                    "from another event loop while this stream's loop was not running, and "
                    "grpc.aio binds a channel to one loop; finish a stream before using its "
                    "client elsewhere, or make one client per event loop"
                )
            )
        if self._channel is None:
            self._bind(create_aio_channel(self.channel_config))
            self._loop = loop
        return self._stub

    async def _call(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        timeout: float | None,  # noqa: ASYNC109 - the budget of all attempts together
    ) -> R:
        """One idempotent RPC with retries, translated errors and the call metadata."""

        async def attempt(remaining: float | None) -> R:
            # Checked before every attempt, and after a failure: a client closed during a
            # retry's pause raised grpc's UsageError ("Channel is closed."), and one closed
            # during the call a bare asyncio.CancelledError, as if the caller's task had been
            # cancelled. A cancellation of the task itself still propagates as such.
            self._check_open()
            try:
                return await method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as exc:
                self._check_open()
                raise from_rpc_error(exc) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or not task.cancelling():
                    self._check_open()
                raise

        return await acall_with_retry(attempt, self.retry, self._timeout(timeout))

    async def _input_dtypes(
        self,
        model: str,
        version: int | None,
        timeout: float | None = None,  # noqa: ASYNC109 - the calling infer's budget
    ) -> dict[str, Any]:
        """The model's input dtypes, for list and scalar inputs; fetched once per model."""
        dtypes = self._known_dtypes(model, version)
        if dtypes is None:
            meta = await self.model_metadata(model, version=version, timeout=timeout)
            dtypes = self._learn_dtypes(model, version, meta)
        return dtypes

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, ArrayLike],
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the sync client's name, same meaning
        priority: int = 0,
        request_id: str = "",
    ) -> InferResult:
        """Run one inference. ``timeout`` bounds the whole call (queueing and retries included);
        list and scalar inputs take the model's declared dtypes, as with the sync client."""
        self._connect()
        budget, began = self._budget(timeout)
        dtypes = (
            await self._input_dtypes(model, version, budget)
            if needs_dtypes(inputs, model, version)
            else None
        )
        prepare = functools.partial(
            self._prepare_infer,
            model,
            inputs,
            version=version,
            outputs=outputs,
            priority=priority,
            request_id=request_id,
        )
        try:
            # Inside: a list number out of a stale cached dtype's range is refused here.
            call = prepare(dtypes=dtypes)
            left = self._left(budget, began)
            return call.finish(await self._call(self._infer, call.request, left))
        except InvalidInputError as exc:
            fresh = await self._fresh_dtypes(model, version, dtypes, exc, self._left(budget, began))
            if fresh is None:
                raise
        # The cached dtypes were stale (a new default version takes others): once more, with
        # the model's dtypes as the server describes it now.
        call = prepare(dtypes=fresh)
        left = self._left(budget, began)
        return call.finish(await self._call(self._infer, call.request, left))

    async def _fresh_dtypes(
        self,
        model: str,
        version: int | None,
        used: Mapping[str, Any] | None,
        refusal: Exception,
        timeout: float | None,  # noqa: ASYNC109 - the calling infer's budget
    ) -> dict[str, Any] | None:
        """As the sync client's: after a refusal of the datatype of inputs converted to the
        cached dtypes, the dtypes fetched once again, when they differ (None: the refusal
        stands)."""
        curable, fresh = self._stale_dtypes(model, version, used, refusal)
        if not curable:
            return None
        if fresh is None:
            try:
                fresh = await self._input_dtypes(model, version, timeout)
            except FerryError:
                return None
        return fresh if fresh != used else None

    async def model_metadata(
        self,
        model: str,
        *,
        version: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ModelMetadata:
        message = request(pb.GetModelMetadataRequest, model=model, version=version or 0)
        return parse_metadata(await self._call(self._connect().GetModelMetadata, message, timeout))

    async def list_models(
        self,
        model: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[ModelVersionStatus]:
        message = request(pb.ListModelsRequest, model=model)
        return parse_list_models(await self._call(self._connect().ListModels, message, timeout))

    async def statistics(
        self,
        model: str = "",
        *,
        version: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[ModelStatistics]:
        message = request(pb.GetModelStatisticsRequest, model=model, version=version or 0)
        return parse_statistics(
            await self._call(self._connect().GetModelStatistics, message, timeout)
        )

    async def ready(
        self,
        model: str = "",
        *,
        timeout: float | None = 5.0,  # noqa: ASYNC109
    ) -> bool:
        """True when the server (or ``model``) reports SERVING on the standard health service;
        False when it answers otherwise or cannot be reached."""
        self._connect()
        try:
            raw = await self._health(
                _health.encode_check_request(model),
                timeout=check_timeout(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError:
            return False
        except asyncio.CancelledError:
            # Closed during the check: ClientClosedError, as for every other call (it was a
            # bare asyncio.CancelledError); a cancellation of the task itself propagates.
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                self._check_open()
            raise
        return _health.is_serving(raw)

    def stream(
        self,
        model: str,
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> AsyncInferStream:
        """An ``AsyncInferStream`` to ``model``; the call starts on first use. ``timeout`` is the
        deadline of the whole stream; see ``InferenceClient.stream``."""
        # As the sync client does: a closed client said so only at the first submit().
        self._check_open()

        def open_call(**kwargs: Any) -> Any:
            self._connect()
            return self._infer_stream(**kwargs)

        stream = AsyncInferStream(
            open_call,
            model,
            version=version,
            outputs=outputs,
            priority=priority,
            timeout=timeout,
            metadata=stream_metadata(self._metadata, self.channel_config.receive_limit()),
            max_in_flight=max_in_flight,
            dtypes=lambda timeout: self._input_dtypes(model, version, timeout),
            fresh_dtypes=lambda used, refusal, timeout: self._fresh_dtypes(
                model, version, used, refusal, timeout
            ),
            max_message_bytes=self.channel_config.send_limit(),
            client_closed=lambda: ClientClosedError.of(self) if self._closed else None,
        )
        self._streams.add(stream)
        return stream

    async def infer_many(
        self,
        model: str,
        items: Iterable[InputItem] | AsyncIterable[InputItem],
        *,
        max_in_flight: int = 64,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the stream's deadline
    ) -> AsyncIterator[StreamResult]:
        """Run every item on one stream; see ``InferenceClient.infer_many``."""
        async with self.stream(
            model, version=version, outputs=outputs, timeout=timeout, max_in_flight=max_in_flight
        ) as stream:
            async for answer in stream.infer_many(items, max_in_flight=max_in_flight):
                yield answer

    async def close(self) -> None:
        """Close the channel; later calls raise ``ClientClosedError``. Closing twice is harmless.

        From any loop: the channel's own loop closes it when it runs in another thread (its calls
        in flight end with ``ClientClosedError``), and one whose loop has ended or idles is
        released here. Left alone, such a channel held its connection until garbage collection.
        A stream left open on a loop that idles ends with ``ClientClosedError`` when that loop
        runs again.
        """
        self._closed = True
        channel, loop = self._channel, self._loop
        self._stub = None
        if channel is None:
            return
        if loop is asyncio.get_running_loop():
            self._channel = None
            await channel.close()
            return
        if loop is not None and loop.is_running():
            closing = asyncio.run_coroutine_threadsafe(channel.close(), loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(closing), _CLOSE_ELSEWHERE_S)
                self._channel = None
                return
            except TimeoutError:  # that loop stopped (or is stuck) before it ran the close
                pass
        self._release_idle(ClientClosedError.of(self))

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _release(channel: Any) -> None:
    """Close a grpc.aio channel whose loop does not run: its connection and its core channel go
    now, as the channel's own ``__del__`` would release them (``close()`` is a coroutine of the
    channel's loop, which cannot run here)."""
    core = getattr(channel, "_channel", None)
    if core is not None and not core.closed():
        core.close()


def _retrieve(task: asyncio.Future[None]) -> None:
    """Consume the outcome of a write nobody awaits any more: a failed one ends the call, and
    the stream's reader reports that to every request still outstanding."""
    if not task.cancelled():
        task.exception()


class AsyncInferStream(StreamState):
    """The asyncio stream: ``await submit(...)``, ``async for ... in results()``.

    >>> async with client.stream("mlp") as stream:                  # doctest: +SKIP
    ...     async for rid, result in stream.infer_many(inputs, max_in_flight=32):
    ...         ...

    The call starts on first use, on the running loop. Not thread-safe (asyncio objects never are).
    """

    def __init__(self, method: Any, model: str, **options: Any) -> None:
        super().__init__(method, model, **options)
        self._call: aio.StreamStreamCall[Any, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abandoned: FerryError | None = None  # why the client released its channel
        self._reader: asyncio.Task[None] | None = None
        self._results: asyncio.Queue[StreamResult | Marker] = asyncio.Queue()
        self._slots = asyncio.Condition()
        self._blocked = 0  # submitters waiting for a free slot
        self._write_lock = asyncio.Lock()
        self._resending: set[asyncio.Future[None]] = set()  # held: the loop keeps weak refs
        self._headers_came = asyncio.Event()  # the call's first headers (or its end)

    def _start(self) -> aio.StreamStreamCall[Any, Any]:
        if self._call is None:
            self._call = self._method(timeout=self._timeout, metadata=self._metadata)
            self._loop = asyncio.get_running_loop()
            self._reader = self._loop.create_task(self._read(self._call))
        return self._call

    def _ended(self, error: FerryError) -> FerryError:
        return self._abandoned or super()._ended(error)

    def _check_loop(self) -> None:
        """Refuse a loop other than the call's: its reader and its write run on the loop of
        the first submit, so results() elsewhere waited for good (nothing there could wake
        it) and submit() raised a bare RuntimeError ("attached to a different loop"). A call
        that has ended may be read from anywhere: its answers wait in the queue."""
        if (
            self._loop is not None
            and not self._done
            and asyncio.get_running_loop() is not self._loop
        ):
            raise FerryError(
                "this stream's call runs on another event loop (the one of its first submit), "
                "and grpc.aio binds a call to one loop: use a stream on the loop that opened "
                "it, or open a new one with client.stream(model) on this loop"
            )

    def _open_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether this stream's call runs on ``loop`` and has not ended."""
        return self._call is not None and self._loop is loop and not self._done

    def _abandon(self, why: FerryError) -> None:
        """End the call because its client released the channel under it (on this stream's
        loop): its requests, and the submits after, fail with ``why``."""
        if self._call is not None and not self._done:
            self._abandoned = why
            self._call.cancel()

    async def _read(self, call: aio.StreamStreamCall[bytes, bytes]) -> None:
        error: FerryError | None = None
        try:
            try:
                self._noted(await call.initial_metadata())  # the call's end, at the latest
            finally:
                self._headers_came.set()
            while True:
                resp = await call.read()
                if resp is aio.EOF or not isinstance(resp, bytes):
                    break
                answered = self._answer(resp)
                if answered is None:
                    continue
                result, again = answered
                if again is not None:
                    settled = await self._settle(call, result, again)
                    if settled is None:
                        continue
                    result = settled
                self._results.put_nowait(result)
                if self._blocked:
                    async with self._slots:
                        self._slots.notify_all()
        except grpc.RpcError as exc:
            error = self._ended(from_rpc_error(exc))
        except asyncio.CancelledError:
            error = CancelledError("the stream was cancelled by the client")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # This reader itself was cancelled (its loop is ending): that propagates.
                self._finish(error)
                raise
            # The call was: closing the client cancels its calls, and grpc.aio raises that in
            # the reader as asyncio.CancelledError, which ended the reader as if cancelled, so
            # the stream's ``async with`` (and wait()) raised a bare CancelledError, as if the
            # caller's own task had been cancelled.
            error = self._ended(error)
        except FerryError as exc:  # an answer this client cannot read
            error = exc
            call.cancel()  # nobody reads it any more; the server's side would stay open
        except Exception as exc:
            error = FerryError(f"stream reader failed: {type(exc).__name__}: {exc}")
            call.cancel()
        if self._cancelled and error is None:
            error = cancelled_error()
        self._finish(error)
        async with self._slots:
            self._slots.notify_all()

    async def _settle(
        self, call: aio.StreamStreamCall[Any, Any], refused: StreamResult, again: Resend
    ) -> StreamResult | None:
        """As the sync stream's: a refusal of list inputs' datatype sent once more with the
        dtypes fetched again (None: on its way), or its answer. The reader awaits the one
        metadata call, so the requests refused after it find the cache refreshed; the write
        runs in a task of its own, as a reader waiting on flow control would stop reading."""
        rid, refusal = refused
        assert isinstance(refusal, FerryError)
        assert self._fresh_dtypes is not None
        fresh = await self._fresh_dtypes(again.used, refusal, None)
        outcome = self._again(rid, refusal, again, fresh)
        if not isinstance(outcome, bytes):
            return outcome
        item = (rid, outcome, again.deadline, again.timeout)
        sending = asyncio.ensure_future(self._send_again(call, item, refusal))
        self._resending.add(sending)
        sending.add_done_callback(self._resending.discard)
        return None

    async def _send_again(
        self,
        call: aio.StreamStreamCall[Any, Any],
        item: tuple[str, bytes, float | None, float | None],
        refusal: FerryError,
    ) -> None:
        """Write a refused request once more; if it cannot go (the stream was closed for
        writing meanwhile, or the call ended), its answer is the refusal, so results() does
        not wait for it."""
        rid = item[0]
        try:
            if self._closed:
                raise asyncio.InvalidStateError("closed for writing")
            await self._send(call, item, asyncio.Event())
        except Exception:  # whatever stopped the write: the refusal stands
            if rid in self._pending:
                del self._pending[rid]
                self._results.put_nowait((rid, refusal))

    def _finish(self, error: FerryError | None) -> None:
        for orphan in self._orphans(error):
            self._results.put_nowait(orphan)
        self._results.put_nowait(END)

    async def submit(
        self,
        inputs: Inputs,
        request_id: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the server-side budget, as in submit()
        priority: int | None = None,
        outputs: Sequence[str] | None = None,
    ) -> str:
        """Send one request and return its id; see :meth:`InferStream.submit`.

        Cancelling a submit (a timeout around it, a cancelled task) never disturbs the other
        requests on the stream: a request whose message had begun to go out is still answered
        in ``results()``, under its id; one still waiting for its turn is withdrawn."""
        self._check_loop()
        began = time.monotonic()
        dtypes = None
        if self._dtypes is not None and needs_dtypes(inputs, self.model, self.version):
            dtypes = await self._dtypes(left_of(timeout, began))
        build = functools.partial(
            self._build, inputs, request_id, timeout=timeout, priority=priority, outputs=outputs
        )
        try:
            rid, request, encode = build(dtypes=dtypes)
        except InvalidInputError as exc:
            # A list number out of the cached dtype's range: the model may declare another now.
            refresh = self._refresh(dtypes, exc, left_of(timeout, began))
            fresh = None if refresh is None else await refresh
            if fresh is None:
                raise
            dtypes = fresh
            rid, request, encode = build(dtypes=dtypes)
        self._check_open(rid)
        call = self._start()
        budget = None if timeout is None else float(timeout)
        deadline = None if budget is None else began + budget
        if self._awaits_headers(request, rid):
            wait = HEADERS_WAIT_S if deadline is None else deadline - time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(HEADERS_WAIT_S, wait))):
                    await self._headers_came.wait()
            over = over_server_limit(len(request), self._server_limit, rid, self._receive_limit)
            if over is not None:
                raise over
        keep = self._keep(
            inputs,
            request,
            dtypes,
            timeout=budget,
            priority=priority,
            outputs=outputs,
            deadline=deadline,
        )
        if len(self._pending) >= self.max_in_flight:
            self._blocked += 1
            try:
                async with self._slots:
                    free = self._slots.wait_for(
                        lambda: (
                            len(self._pending) < self.max_in_flight or self._done or self._cancelled
                        )
                    )
                    if deadline is None:
                        await free
                    else:  # the request's own budget bounds its wait for a slot
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                                await free
            finally:
                self._blocked -= 1
        self._check_open(rid)
        self._pending[rid] = (time.perf_counter(), encode)
        if keep is not None:
            self._resend[rid] = keep
        self._unread += 1
        if budget is not None and len(self._pending) > self.max_in_flight:
            self._results.put_nowait(self._expired(rid, budget, "for a free slot (max_in_flight)"))
            return rid
        # The write runs in a task of its own, shielded from the caller's cancellation: grpc.aio
        # cancels the whole call when a task awaiting ``write`` is cancelled, so a submit
        # abandoned under flow control (``asyncio.wait_for(stream.submit(...), t)``) failed
        # every other request on the stream with CancelledError.
        started = asyncio.Event()
        sending = asyncio.ensure_future(self._send(call, (rid, request, deadline, budget), started))
        try:
            await asyncio.shield(sending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if sending.done() and task is not None and not task.cancelling():
                # The write was cancelled, not the caller: the call was (the client closed
                # under it, or cancel()). That raised a bare asyncio.CancelledError, as if the
                # caller's own task had been cancelled.
                self._forget(rid)
                raise self._ended(self._call_cancelled()) from None
            if not started.is_set() and not sending.done():
                # Not a byte of it was written yet: withdraw it; nobody will see an answer.
                sending.cancel()
                self._forget(rid)
            # Otherwise the message is on its way: it is answered in results(), as any other.
            sending.add_done_callback(_retrieve)
            raise
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            # The call ended under us; the reader fails the request unless it already has.
            self._forget(rid)
            # ClientClosedError when the client closed under it: the reader may not have
            # recorded why yet, and this said "this stream has ended".
            if isinstance(exc, grpc.RpcError):
                raise self._ended(from_rpc_error(exc)) from None
            raise self._ended(self._terminal_error()) from None
        return rid

    def _call_cancelled(self) -> FerryError:
        """Why the call was cancelled under a write: the reader's record, once it has one."""
        if self._error is not None:
            return self._error
        return cancelled_error() if self._cancelled else CancelledError("the call was cancelled")

    async def _send(
        self,
        call: aio.StreamStreamCall[Any, Any],
        item: tuple[str, bytes, float | None, float | None],
        started: asyncio.Event,
    ) -> None:
        rid, request, deadline, budget = item
        async with self._write_lock:
            if deadline is not None and budget is not None:
                now = stamped(request, deadline, budget)
                if now is None:  # its budget ran out behind earlier writes: not sent
                    if rid in self._pending:
                        where = "behind the stream's earlier writes"
                        self._results.put_nowait(self._expired(rid, budget, where))
                        if self._blocked:
                            async with self._slots:
                                self._slots.notify_all()
                    return
                request = now
            started.set()
            await call.write(request)

    def _forget(self, rid: str) -> None:
        """A request that was never sent: no answer will come, so results() must not wait."""
        self._resend.pop(rid, None)
        if rid in self._pending:
            del self._pending[rid]
            self._unread -= 1

    async def results(self, *, until_closed: bool = False) -> AsyncIterator[StreamResult]:
        """Yield ``(id, InferResult | FerryError)`` as answers arrive; see
        :meth:`InferStream.results` for when it ends."""
        self._check_loop()
        while not self._should_stop(until_closed):
            item = await self._results.get()
            if item is END:
                self._results.put_nowait(END)
                return
            if isinstance(item, Marker):
                continue
            self._unread -= 1
            yield item

    async def infer_many(
        self, items: Iterable[InputItem] | AsyncIterable[InputItem], *, max_in_flight: int = 64
    ) -> AsyncIterator[StreamResult]:
        """Run every item, ``max_in_flight`` at a time; see :meth:`InferStream.infer_many`."""
        check_max_in_flight(max_in_flight)
        self._check_loop()
        source = aenumerate(items)
        outstanding = 0
        ids = Positions()

        async def send_next() -> bool:
            nxt = await anext(source, None)
            if nxt is None:
                return False
            rid, inputs = ids.item(*nxt)
            try:
                await self.submit(inputs, rid)
            except FerryError as exc:
                self._results.put_nowait(self._refused(rid, exc))
                self._unread += 1
            return True

        while outstanding < max_in_flight and await send_next():
            outstanding += 1
        while outstanding:
            item = await self._results.get()
            if item is END:
                self._results.put_nowait(END)
                raise self._terminal_error()
            if isinstance(item, Marker):
                continue
            self._unread -= 1
            outstanding -= 1
            yield ids.shown(item)
            if await send_next():
                outstanding += 1

    async def close(self) -> None:
        """Send no more requests; answers to those in flight still arrive."""
        if self._closed:
            return
        self._check_loop()
        self._closed = True
        if self._call is not None:
            async with self._write_lock:
                # If the call already ended, the reader has recorded why.
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
        self._results.put_nowait(WAKE)

    async def cancel(self) -> None:
        """End the call now: outstanding requests yield CancelledError, and every submit()
        that has not begun to write its request (one racing this in another task, or later)
        raises it; only a cancellation of the caller's own task raises asyncio's."""
        self._check_loop()
        self._cancelled = True
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._results.put_nowait(WAKE)
        if self._blocked:  # submits waiting for a slot raise at once
            async with self._slots:
                self._slots.notify_all()
        await self.wait()

    async def wait(self) -> None:
        """Wait for the call to end (after ``close()``)."""
        self._check_loop()
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
