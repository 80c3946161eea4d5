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

``InferStream`` (here) runs a background thread that reads the gRPC response iterator;
``AsyncInferStream`` (in ``_async``, over grpc.aio) runs a reader task on the caller's loop. Both
share ``StreamState``: the bookkeeping of ids, slots and endings, with no IO.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import grpc
import numpy as np

from ferry.client._errors import (
    CancelledError,
    DeadlineExceededError,
    FerryError,
    InvalidArgumentError,
    InvalidInputError,
    LimitExceededError,
    from_rpc_error,
    message_size_error,
)
from ferry.client._requests import (
    ArrayLike,
    as_array_fast,
    check_timeout,
    is_array,
    is_bytes_view,
    needs_dtypes,
    new_request_id,
    refuses_datatype,
)
from ferry.client._stream_limit import (
    HEADERS_WAIT_S,
    SMALLEST_SERVER_LIMIT,
    over_server_limit,
    receive_limit,
    server_limit,
)
from ferry.client._types import InferResult, Timings
from ferry.client._wire import (
    decode_stream_response,
    encode_infer_request,
    request_inputs,
    with_timeout,
)

StreamResult = tuple[str, InferResult | FerryError]
Inputs = Mapping[str, ArrayLike]
InputItem = Inputs | tuple[str, Inputs]

DEFAULT_MAX_IN_FLIGHT = 1024
# A request that waited less than this before it was written goes with its budget as built: the
# server's deadline cannot tell the difference apart, and stamping what is left costs a copy.
RESTAMP_AFTER = 0.001


class Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


END: Final = Marker("END")  # the call is over: nothing more will arrive
WAKE: Final = Marker("WAKE")  # close() was called: re-check whether to stop waiting


def item_of(index: int, item: InputItem) -> tuple[str, Inputs]:
    """An ``infer_many`` item: inputs (id = its position) or ``(id, inputs)``."""
    if isinstance(item, tuple):
        if len(item) != 2:  # unpacking raised a bare "too many values to unpack"
            raise InvalidInputError(
                f"infer_many item {index} is a tuple of {len(item)}: give inputs, or an "
                "(id, inputs) pair"
            )
        rid, inputs = item
        if not isinstance(rid, str):
            # str(rid) went on the wire and came back as the answer's id, so ``(5, x)`` was
            # answered under "5" and a lookup by 5 missed it; an id is a str, as in submit().
            raise InvalidInputError(
                f"infer_many item {index}'s id is {type(rid).__name__} {rid!r}: an id is a str "
                f"(it is the request's id on the wire and comes back as given); pass "
                f"({str(rid)!r}, inputs)"
            )
        return rid, inputs
    return str(index), item


class Positions:
    """An ``infer_many`` call's ids. An item without an id of its own is yielded under its
    position ("0", "1", ...), but sent under a fresh id that ends in it: sent as the bare
    position, item 0 of every call had the same id, and a server's split, which picks a
    request's version from its id (sticky, docs/rollout.md), sent every call's first item to
    one version (one-item calls: all of them to one side of a 50/50 split)."""

    def __init__(self) -> None:
        self._prefix = f"{new_request_id()}-"

    def item(self, index: int, item: InputItem) -> tuple[str, Inputs]:
        """The id ``item`` is sent under, and its inputs."""
        rid, inputs = item_of(index, item)
        return (rid if isinstance(item, tuple) else self._prefix + rid), inputs

    def shown(self, answer: StreamResult) -> StreamResult:
        """``answer`` under the id its caller knows: its position, or its own id."""
        rid, result = answer
        if not rid.startswith(self._prefix):
            return answer
        position = rid[len(self._prefix) :]
        if isinstance(result, InferResult):
            result.id = position
        return position, result


@dataclass(frozen=True, slots=True)
class Resend:
    """What a request with list inputs needs to go once more, should the server refuse the
    dtypes they were converted to (the cached ones, stale after a new default version)."""

    request: bytes  # as first built: its array inputs go again from these bytes, as they were
    lists: dict[str, Any]  # the other inputs, copied: the caller may refill its lists
    names: tuple[str, ...]  # every input, in the order submitted
    used: Mapping[str, Any]  # the dtypes the lists were converted to
    timeout: float | None
    priority: int | None
    outputs: Sequence[str] | None
    deadline: float | None  # monotonic, from the first submit: a resend has what is left

    def inputs(self) -> dict[str, Any]:
        """The inputs as submitted: the lists as copied, the arrays read back (zero-copy) from
        the request's own bytes, which hold them exactly as sent whatever the dtypes."""
        arrays = request_inputs(self.request)
        return {n: self.lists[n] if n in self.lists else arrays[n] for n in self.names}


# Values a list may hold that nobody can change: kept as they are, checked by type alone, since
# a list of a million numbers is walked element by element.
_IMMUTABLE = frozenset({int, float, complex, bool, str, bytes, type(None)})


def snapshot(inputs: Inputs) -> dict[str, Any]:
    """The inputs other than arrays, as they are now. A request sent again must carry what was
    submitted, and a caller may reuse its lists for the next request as soon as submit()
    returns. Arrays are not copied: the request's bytes hold them already (``Resend``), and a
    second copy of a large image doubled the memory of every request in flight."""
    return {name: _frozen(value) for name, value in inputs.items() if not is_array(value)}


def _frozen(value: Any) -> Any:
    if isinstance(value, list | tuple):  # at most 64 deep: the request was encoded already
        return [v if type(v) in _IMMUTABLE else _frozen(v) for v in value]
    if is_array(value):  # an array inside a list
        return as_array_fast(value).copy()
    if isinstance(value, bytearray) or is_bytes_view(value):
        return bytes(value)
    if isinstance(value, memoryview):  # of numbers (an array's), as numpy reads it: kept so
        return np.array(value)
    return value  # numbers (numpy's too), str, bytes: immutable


class StreamState:
    """State and request building shared by the two flavours; no IO here."""

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
        dtypes: Callable[[float | None], Any] | None = None,
        fresh_dtypes: Callable[[Mapping[str, Any], FerryError, float | None], Any] | None = None,
        max_message_bytes: int | None = None,
        client_closed: Callable[[], FerryError | None] | None = None,
    ) -> None:
        """``method``: the gRPC stream-stream callable; ``timeout``: the whole call's deadline;
        ``dtypes(timeout)``: returns (or, async, awaits) the model's input dtypes for list
        inputs, a metadata call bounded by ``timeout`` (None: the client's) where not cached;
        ``fresh_dtypes(used, refusal, timeout)``: after the server refused list inputs
        converted to ``used``, returns (or awaits) the model's dtypes as it describes them
        now, or None when they cannot cure the refusal (the client's ``_fresh_dtypes``);
        ``max_message_bytes``: the largest request the channel sends (None: no limit);
        ``client_closed()``: the client's ClientClosedError once it is closed, else None."""
        check_max_in_flight(max_in_flight)
        self._method = method
        self._timeout = check_timeout(timeout)
        self._metadata = metadata
        self._dtypes = dtypes
        self._fresh_dtypes = fresh_dtypes
        self._max_message_bytes = max_message_bytes
        self._client_closed = client_closed
        self.model = model
        self.version = version
        self.outputs = outputs
        self.priority = priority
        self.max_in_flight = max_in_flight
        self._pending: dict[str, tuple[float, float]] = {}  # id -> (sent at, encode seconds)
        self._resend: dict[str, Resend] = {}  # pending ids with list inputs, not sent again yet
        self._unread = 0  # submitted, not yet yielded by results()
        self._closed = False
        self._cancelled = False  # cancel() was called
        self._done = False
        self._error: FerryError | None = None
        # The server's limit per message, from the stream's first headers (``_stream_limit``);
        # ``_headers``: they came (or the call ended without them).
        self._server_limit: int | None = None
        self._headers = False
        self._receive_limit = receive_limit(metadata)  # what the client's channel receives

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
        limit = self._max_message_bytes
        if limit is not None and len(request) > limit:
            # gRPC would refuse the message by ending the whole call, failing every other
            # request in flight with this one's error: refuse it alone, before it is sent.
            raise _too_large(len(request), limit)
        over = over_server_limit(len(request), self._server_limit, rid, self._receive_limit)
        if over is not None:
            raise over
        return rid, request, time.perf_counter() - t0

    def _noted(self, metadata: Any) -> None:
        """The stream's first headers came (None: the call ended without them)."""
        self._server_limit = server_limit(metadata)
        self._headers = True

    def _awaits_headers(self, request: bytes, rid: str) -> bool:
        """Whether ``request`` must wait for the server's limit before it is sent: a smaller
        one, with an id any answer can repeat twice, fits any server's."""
        if self._headers or self._done:
            return False
        echoed = 2 * len(rid.encode("utf-8", "surrogatepass"))
        return len(request) > SMALLEST_SERVER_LIMIT or echoed > SMALLEST_SERVER_LIMIT

    def _check_open(self, rid: str) -> None:
        if self._done:
            raise self._terminal_error()
        if self._cancelled:
            # Whether the call has ended yet or not: a submit racing cancel() got "this stream
            # is closed", "this stream has ended" or CancelledError depending on the turn.
            raise cancelled_error()
        if self._closed:
            raise FerryError("this stream is closed: open a new one with client.stream(model)")
        if rid in self._pending:
            raise InvalidInputError(f"request id {rid!r} is already in flight on this stream")

    def _terminal_error(self) -> FerryError:
        if self._error is not None:
            return self._error
        if self._cancelled:
            return cancelled_error()
        return FerryError("this stream has ended: open a new one with client.stream(model)")

    def _answer(self, raw: bytes) -> tuple[StreamResult, Resend | None] | None:
        """Match an answer (the bytes received) to its request; None for an id we never sent.
        With a Resend, the answer is a refusal of list inputs' datatype and the request stays
        pending: the reader sends it again (``_again``) or settles it with the refusal."""
        t0 = time.perf_counter()
        rid, result = decode_stream_response(raw)
        again = self._resend.pop(rid, None)  # its ids are pending ones
        if again is not None and refuses_datatype(result, again.used):
            return (rid, result), again
        entry = self._pending.pop(rid, None)
        if entry is None:
            return None
        sent, encode = entry
        if isinstance(result, InferResult):
            result.timings = Timings(encode=encode, rpc=t0 - sent, decode=time.perf_counter() - t0)
        return (rid, result), None

    def _refresh(
        self, used: Mapping[str, Any] | None, refusal: InvalidInputError, timeout: float | None
    ) -> Any:
        """``fresh_dtypes(used, refusal, timeout)`` for a request whose list inputs took
        ``used``; None (no call) for one that took none. The async stream awaits it."""
        if used is None or self._fresh_dtypes is None:
            return None
        return self._fresh_dtypes(used, refusal, timeout)

    def _keep(
        self, inputs: Inputs, request: bytes, dtypes: Mapping[str, Any] | None, **how: Any
    ) -> Resend | None:
        """What sending a request again needs, for one whose list inputs took ``dtypes``."""
        if dtypes is None or self._fresh_dtypes is None:
            return None
        return Resend(request, snapshot(inputs), tuple(inputs), dtypes, **how)

    def _again(
        self, rid: str, refusal: FerryError, again: Resend, fresh: Mapping[str, Any] | None
    ) -> bytes | StreamResult:
        """A refused request built once more with ``fresh`` dtypes, to send under its id; or,
        settled, its answer: the refusal when the dtypes are unchanged (None) or the stream is
        closed for writing (nothing more can be sent on it); the error building it raised (a
        number out of the new dtype's range). Sent again at most once: its Resend is gone, so a
        second refusal is its answer. Only the reader calls this, between answers: the request
        is still pending, and the call has not ended (the reader ends it after its last one)."""
        if fresh is None or self._closed:
            self._pending.pop(rid, None)
            return rid, refusal
        try:
            _, request, _ = self._build(
                again.inputs(),
                rid,
                timeout=again.timeout,
                priority=again.priority,
                outputs=again.outputs,
                dtypes=fresh,
            )
        except FerryError as exc:
            self._pending.pop(rid, None)
            return rid, exc
        return request

    def _orphans(self, error: FerryError | None) -> list[StreamResult]:
        """Fail what is still outstanding when the call ends, each with the call's error."""
        self._done = True
        self._error = error
        err = error or FerryError("the server ended the stream before answering this request")
        orphans: list[StreamResult] = [(rid, err) for rid in self._pending]
        self._pending.clear()
        self._resend.clear()
        return orphans

    def _ended(self, error: FerryError) -> FerryError:
        """The error that ended the call, or ClientClosedError when the client was closed
        under it: the requests in flight said "CANCELLED: Channel closed!", as if someone had
        cancelled them, where every unary call says the client was closed. After cancel(),
        the cancellation's own error, the same in both flavours (the sync one said grpc's
        "Locally cancelled by application!")."""
        closed = self._client_closed() if self._client_closed is not None else None
        if closed is None and self._cancelled and isinstance(error, CancelledError):
            return cancelled_error()
        return closed or error

    def _refused(self, rid: str, error: FerryError) -> StreamResult:
        """An ``infer_many`` item that ``submit`` refused, as that item's answer: a request the
        client refuses to send (a number its input's type cannot hold, over the client's
        message limit) raised out of infer_many and cancelled the stream, losing every answer
        in flight, where the same mistake caught by the server was its item's answer. The
        stream's own end (or close) is no item's: it is raised."""
        if self._done or self._closed:
            raise error
        return rid, error

    def _should_stop(self, until_closed: bool) -> bool:
        return self._unread == 0 and (not until_closed or self._closed or self._done)

    def _expired(self, rid: str, timeout: float, where: str) -> StreamResult:
        """A request whose budget ran out before it could be written: it is not sent (the
        server would have run it for nobody, or refused it), and ``results()`` yields it with
        the error the server gives a request whose deadline passed."""
        self._pending.pop(rid, None)
        self._resend.pop(rid, None)
        return rid, DeadlineExceededError(
            f"request {rid!r} was not sent: its timeout of {timeout:g} s passed while it "
            f"waited {where}; the server is behind this stream (submit fewer at once, or give "
            "a longer timeout)"
        )


def cancelled_error() -> CancelledError:
    """What every request and submit of a stream after its ``cancel()`` gets."""
    return CancelledError(
        "the stream was cancelled by the client (cancel() was called, or its `with` block "
        "ended with an exception): open a new one with client.stream(model)"
    )


def stamped(request: bytes, deadline: float, timeout: float) -> bytes | None:
    """The request as it goes now, ``timeout`` seconds after its submit began and due at
    ``deadline`` (monotonic): None once that has passed, otherwise with what is left of its
    budget. A submit's timeout counts from the submit: time spent waiting for a free slot
    (``max_in_flight``) or behind the stream's earlier writes is the caller's time too, and a
    server given the whole budget at the end of that wait ran requests whose callers had given
    up, first in first out, while fresh ones waited behind them."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    if timeout - left < RESTAMP_AFTER:
        return request
    return with_timeout(request, left)


def left_of(timeout: float | None, began: float) -> float | None:
    """What is left of a submit's ``timeout`` (checked: it bounds the metadata call a list
    input needs, which took the client's default, so submit(..., timeout=0.5) waited 10 s,
    or for ever with timeout=None on the client); at least a microsecond, so that a spent
    budget reaches gRPC as a deadline already past, never as "no deadline"."""
    budget = check_timeout(timeout)
    return None if budget is None else max(budget - (time.monotonic() - began), 1e-6)


def check_max_in_flight(value: object) -> None:
    """An int >= 1: None gave a bare TypeError from a comparison, True and 1.5 went through."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"max_in_flight must be an int >= 1, got {value!r}")
    if value < 1:
        raise InvalidArgumentError(f"max_in_flight must be an int >= 1, got {value}")


def _too_large(size: int, limit: int) -> LimitExceededError:
    """The error gRPC gives a message over the channel's send limit, for one request."""
    error = message_size_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"CLIENT: Sent message larger than max ({size} vs. {limit})",
    )
    assert error is not None
    return error


class InferStream(StreamState):
    """A synchronous stream of inference requests to one model; see the module docstring.

    >>> with client.stream("mlp") as stream:                        # doctest: +SKIP
    ...     ids = [stream.submit({"input": x}) for x in batches]
    ...     for rid, result in stream.results():
    ...         ...

    ``submit`` blocks while ``max_in_flight`` requests are unanswered: that bounds the requests
    in flight, not the answers. Answers arrive on a background thread and wait in memory until
    ``results()`` yields them, so a caller that submits without reading holds every answer, as
    the pattern above means to. No bound on them can be enforced without breaking that pattern:
    blocking ``submit`` (or the reader) past N unread answers deadlocks it once more than N are
    submitted, and raising refuses it. To keep memory flat over a long run, read ``results()``
    as you submit (``until_closed=True`` in another thread) or use ``infer_many``, which holds
    at most ``max_in_flight`` requests and answers. Thread-safe: one thread may submit while
    another reads results.
    """

    def __init__(self, method: Any, model: str, **options: Any) -> None:
        super().__init__(method, model, **options)
        self._cond = threading.Condition()
        # (id, message, deadline, timeout): stamped with what is left as grpc takes it.
        self._requests: queue.SimpleQueue[tuple[str, bytes, float | None, float | None] | None]
        self._requests = queue.SimpleQueue()
        self._results: queue.SimpleQueue[StreamResult | Marker] = queue.SimpleQueue()
        self._call = method(
            self._request_iterator(), timeout=self._timeout, metadata=self._metadata
        )
        self._reader = threading.Thread(
            target=self._read, name=f"ferry-stream-{model}", daemon=True
        )
        self._reader.start()

    def _request_iterator(self) -> Iterator[bytes]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            rid, request, deadline, budget = item
            if deadline is not None and budget is not None:
                now = stamped(request, deadline, budget)
                if now is None:
                    with self._cond:
                        expired = (
                            self._expired(rid, budget, "behind the stream's earlier writes")
                            if rid in self._pending
                            else None  # the call ended: the reader failed it already
                        )
                        self._cond.notify_all()
                    if expired is not None:
                        self._results.put(expired)
                    continue
                request = now
            yield request

    def _read(self) -> None:
        error: FerryError | None = None
        try:
            headers = self._call.initial_metadata()  # the call's end, at the latest
            with self._cond:
                self._noted(headers)
                self._cond.notify_all()
            for resp in self._call:
                with self._cond:
                    answered = self._answer(resp)
                    self._cond.notify_all()
                if answered is None:
                    continue
                result, again = answered
                if again is not None:
                    settled = self._settle(result, again)
                    if settled is None:
                        continue
                    result = settled
                self._results.put(result)
        except grpc.RpcError as exc:
            error = self._ended(from_rpc_error(exc))
        except FerryError as exc:  # an answer this client cannot read
            error = exc
        except Exception as exc:  # a bug decoding an answer must not hang the readers
            error = FerryError(f"stream reader failed: {type(exc).__name__}: {exc}")
        if error is not None:
            # Nobody reads this call any more: end it, or the call, the thread feeding it and
            # the server's side of the stream stay open.
            self._call.cancel()
        with self._cond:
            self._headers = True
            orphans = self._orphans(error)
            # Nothing more can be sent: gRPC's thread that feeds the call, blocked for the next
            # request, returns (without close() it waited for good, one thread per stream).
            self._requests.put(None)
            self._cond.notify_all()
        for orphan in orphans:
            self._results.put(orphan)
        self._results.put(END)

    def _settle(self, refused: StreamResult, again: Resend) -> StreamResult | None:
        """A refusal of list inputs' datatype: the request sent once more with the model's
        dtypes fetched again (None: it is on its way), or its answer. The fetch blocks this
        reader for one metadata call, made once per change of dtypes: the requests refused
        after it find the cache refreshed already."""
        rid, refusal = refused
        assert isinstance(refusal, FerryError)
        assert self._fresh_dtypes is not None
        fresh = self._fresh_dtypes(again.used, refusal, None)
        with self._cond:
            outcome = self._again(rid, refusal, again, fresh)
            if isinstance(outcome, bytes):
                # Under the lock, as close() is: a request queued behind its None is never sent.
                self._requests.put((rid, outcome, again.deadline, again.timeout))
                return None
            self._cond.notify_all()
        return outcome

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
        InvalidInputError for an id already in flight, LimitExceededError for a request over the
        client's ``max_message_bytes`` or the server's limit (which the stream states as it
        opens; a request over 4 KiB waits for it), or with an id over half of either, which no
        answer could repeat (the stream carries on), and the stream's error once it has ended.
        """
        began = time.monotonic()
        dtypes = (
            self._dtypes(left_of(timeout, began))
            if self._dtypes is not None and needs_dtypes(inputs, self.model, self.version)
            else None
        )
        build = functools.partial(
            self._build, inputs, request_id, timeout=timeout, priority=priority, outputs=outputs
        )
        try:
            rid, request, encode = build(dtypes=dtypes)
        except InvalidInputError as exc:
            # A list number out of the cached dtype's range: the model may declare another now.
            fresh = self._refresh(dtypes, exc, left_of(timeout, began))
            if fresh is None:
                raise
            dtypes = fresh
            rid, request, encode = build(dtypes=dtypes)
        budget = None if timeout is None else float(timeout)
        deadline = None if budget is None else began + budget
        if self._awaits_headers(request, rid):
            with self._cond:
                wait = HEADERS_WAIT_S if deadline is None else deadline - time.monotonic()
                self._cond.wait_for(lambda: self._headers or self._done, min(HEADERS_WAIT_S, wait))
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
        expired: StreamResult | None = None
        with self._cond:
            self._check_open(rid)
            while (
                len(self._pending) >= self.max_in_flight and not self._done and not self._cancelled
            ):
                if deadline is None:
                    self._cond.wait()
                elif (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                else:
                    break
            self._check_open(rid)
            self._pending[rid] = (time.perf_counter(), encode)
            if keep is not None:
                self._resend[rid] = keep
            self._unread += 1
            if budget is not None and len(self._pending) > self.max_in_flight:
                expired = self._expired(rid, budget, "for a free slot (max_in_flight)")
            else:
                self._requests.put((rid, request, deadline, budget))
        if expired is not None:
            self._results.put(expired)
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
            if item is END:
                self._results.put(END)  # later calls must not block either
                return
            if isinstance(item, Marker):
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
        check_max_in_flight(max_in_flight)
        source = enumerate(items)
        outstanding = 0
        ids = Positions()

        def send_next() -> bool:
            nxt = next(source, None)
            if nxt is None:
                return False
            rid, inputs = ids.item(*nxt)
            try:
                self.submit(inputs, rid)
            except FerryError as exc:
                refused = self._refused(rid, exc)
                with self._cond:
                    self._unread += 1
                self._results.put(refused)
            return True

        while outstanding < max_in_flight and send_next():
            outstanding += 1
        while outstanding:
            item = self._results.get()
            if item is END:
                self._results.put(END)
                raise self._terminal_error()
            if isinstance(item, Marker):
                continue
            with self._cond:
                self._unread -= 1
            outstanding -= 1
            yield ids.shown(item)
            if send_next():
                outstanding += 1

    def close(self) -> None:
        """Send no more requests; answers to those in flight still arrive."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._requests.put(None)
        self._results.put(WAKE)

    def cancel(self) -> None:
        """End the call now: outstanding requests yield CancelledError, and every submit()
        that has not sent its request yet (one racing this in another thread, or later)
        raises it."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()  # a submit waiting for a slot raises at once
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


async def aenumerate(
    items: Iterable[InputItem] | AsyncIterable[InputItem],
) -> AsyncIterator[tuple[int, InputItem]]:
    """``enumerate`` over a sync or async iterable, for the async ``infer_many``."""
    index = 0
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield index, item
            index += 1
    else:
        for item in items:
            yield index, item
            index += 1
