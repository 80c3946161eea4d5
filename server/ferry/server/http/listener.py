"""An HTTP/1.1 listener for the Open Inference Protocol's REST routes, on the server's event loop.

aiohttp's low-level server (``aiohttp.web.Server``) is the HTTP stack: it runs on the asyncio loop
the gRPC servers and the batchers already share, so an infer request reaches ``DataPlane`` with no
thread hop; its request parser is C (llhttp); and it is widely used and maintained. Its router and
middleware are not used: ``OipRoutes`` splits the path itself, which is cheaper per request.

What the gRPC listeners enforce, this one does too, before any route runs: the same bearer
tokens (``Authorization: Bearer <token>``, checked by the same ``ListenerGuard``; health probes
open unless ``health_requires_token``), the same certificates (TLS and mutual TLS), and a body
limit (``max_message_bytes``) checked against ``Content-Length`` before a byte of the body is
read, then while the body streams in (chunked or compressed uploads), so a body over the limit
is never held in memory. ``Expect: 100-continue`` is answered only once the size is known to fit.

No connection is held by a client that stops sending: a request's line and headers must arrive
within HEADER_TIMEOUT, its body must keep arriving (BODY_IDLE) at BODY_MIN_RATE on average, and
a connection idle between requests is closed after KEEPALIVE. Nor by one that stops reading: an answer it takes no byte of
for SEND_IDLE seconds is dropped with its connection. Nor can open connections take every
descriptor: past MAX_CONNECTIONS (--http-max-connections) one more is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from ferry.server.addresses import bind_failure, host_port
from ferry.server.errors import ErrorKind, InvalidArgument
from ferry.server.grpc.auth import DENIED, MISSING, TWICE, ListenerGuard
from ferry.server.http.encodings import ENCODINGS, BodyError, decoder
from ferry.server.http.errors import ERROR_HEADER, HttpError, error_body, error_of, raw_answer
from ferry.server.http.expect import expects_continue
from ferry.server.http.oip import HEADER_LENGTH, JSON, OipRoutes, is_health
from ferry.server.min_rate import MinRate
from ferry.server.security import ListenerTLS, encrypted_key

T = TypeVar("T")

log = logging.getLogger(__name__)

# Seconds a refused body is still read and dropped before the connection closes, so the client
# reads the refusal instead of a reset; the body is never kept.
LINGER = 2.0
# Seconds a request body may go without a byte arriving before it is refused (408) and its
# connection closed. Without it a client that sends part of a body and stops held the part in
# memory for as long as it kept the connection open: a few connections, each stalled just under
# max_message_bytes, held gigabytes.
BODY_IDLE = 30.0
# Bytes a second a request body must average once BODY_IDLE has passed: a body may take
# BODY_IDLE plus one second per BODY_MIN_RATE bytes. BODY_IDLE alone judged pauses, so a client
# sending a byte every 29 seconds (slowloris) kept its connection and its handler for as long
# as its Content-Length lasted (a 64 MB body: decades). Apache's mod_reqtimeout has the same
# rule by default (body=20,MinRate=500); 500 bytes/s is a 4 kbit/s link, so a real upload is
# never cut off by it.
BODY_MIN_RATE = 500.0
# Seconds an idle keep-alive connection waits for its next request before it is closed.
# aiohttp's default, 3,630 s, kept every connection a client opened and forgot for an hour, each
# holding a descriptor and a request handler, so they piled up. 75 s is nginx's default: longer
# than the idle timeout of the proxies usually in front of a server (an AWS load balancer's and
# nginx's upstream keepalive_timeout, both 60 s), so the proxy drops an idle connection first and
# never sends a request on one this side is closing, which it would answer 502 (uvicorn's 5 s
# races them). A proxy that keeps its upstream connections longer (Google Cloud's load balancer,
# 600 s) still meets the race: set --http-keepalive-timeout above the proxy's there.
KEEPALIVE = 75.0
# Seconds a request's line and headers may take to arrive: from the head's first byte, or for a
# connection's first request from the connection opening (so one that sends nothing is closed
# too). aiohttp bounds a head only by its keep-alive timeout, counted from the previous answer
# (an hour by default): a client that sent part of a head, or a byte of one now and then, held
# its connection that long, a few thousand such connections holding the server's descriptors;
# and a head begun just before the keep-alive deadline was cut off without an answer. nginx
# allows 60 s (client_header_timeout), Apache 20 to 40 s (mod_reqtimeout); uvicorn and Triton
# set no bound. A head is a few hundred bytes a client writes at once: 30 s is past TCP's first
# retransmissions (1 + 2 + 4 + 8 s), and the bound BODY_IDLE puts on a body's pauses.
HEADER_TIMEOUT = 30.0
# Seconds an answer may wait in the send buffer without the client taking a byte of it. The
# whole answer is queued at once (an infer answer may be as large as max_message_bytes) and
# nothing else bounds that wait: 20 connections that asked for 8 MB answers and never read held
# 330 MB of the server's memory for as long as they stayed open. Progress, not speed, is judged
# (a slow link reading a large answer keeps it), as BODY_IDLE judges a body's.
SEND_IDLE = 30.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Characters of the HTTP parser's complaint kept in an answer (it quotes the offending line).
MAX_PARSE_MESSAGE = 300
# Bytes of a request line (414 past it), of one header line (431), and headers a request may
# have (431 past them). The two line limits differ so that the parser's LineTooLong, which
# names only the limit it hit, says which line it was; both were answered 400, which told a
# client nothing it could act on.
MAX_REQUEST_LINE = 8190
MAX_HEADER_LINE = 8192
MAX_HEADERS = 128
# Connections one HTTP listener holds open (--http-max-connections). Nothing bounded them but
# the open-file limit: a client that opened thousands and kept each alive (a request every
# KEEPALIVE seconds) took every descriptor, and then the gRPC listeners could not accept, model
# loads could not open their files, and asyncio logged each failed accept. The cap is also at
# most a quarter of the open-file limit (1,024 by default on many systems), which leaves the
# other listeners and the models room.
MAX_CONNECTIONS = 1024
# Refused connections waiting for their client to read the 503 and hang up (at most LINGER
# seconds each). Past it one more is closed at once: a refusal must cost less than a connection.
REFUSING = 64
# Body encodings decoded here (``encodings``). Any other would be read as if it were plain (a
# body sent as "foo" parsed as JSON), so it is refused with what to send instead.
DECODED = frozenset({"", "identity", *ENCODINGS})
# The answer to an inference whose client shut its side of the connection (``_abandonable``).
HALF_CLOSED = (
    "the inference was cancelled: the client shut its side of the connection before the "
    "answer, which reads as a client that went away; keep the connection open until it is read"
)
# The answer (505) to a request in an HTTP version other than 1.0 and 1.1.
VERSION_REFUSED = (
    "this listener speaks HTTP/1.1 and HTTP/1.0, not {}: send the request in HTTP/1.1 (for "
    "HTTP/2, use the gRPC listener's Open Inference Protocol service)"
)
# The answer (400) to a request target with a fragment (``#...``).
FRAGMENT = (
    "the request target carries a fragment ('#...'), which RFC 9112 does not allow: a client "
    "strips it before sending; send the URL without the '#' and what follows it"
)
# Headers that mean one thing: sent twice, which one counts would be a guess.
ONCE = ("Content-Encoding", HEADER_LENGTH)
# A client's malformed HTTP, its broken body or its disconnect is its business: aiohttp logged
# each with a traceback at ERROR, before any token check, so anyone who could connect could fill
# the log. They are logged at DEBUG; anything else aiohttp reports stays an error.
CLIENT_FAULTS: tuple[type[BaseException], ...] = (
    HttpProcessingError,
    web.RequestPayloadError,
    ConnectionError,
)


class _ServerLog(logging.LoggerAdapter):
    """The logger aiohttp's request handler reports to (``aiohttp.server``'s stand-in)."""

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, CLIENT_FAULTS):
            self.debug("%s: %s", str(msg) % args if args else msg, _one_line(exc))
            return
        self.error(msg, *args, **kwargs)


async def _abandonable(
    answer: Awaitable[T], connection: object, body: BaseException | None = None
) -> T:
    """An inference that ends when its client goes away: a request queued for a model is not
    run, nor does it hold its place, once nobody can read its answer (as a cancelled gRPC call).
    aiohttp leaves a handler running after its connection is lost, so a client that gave up
    (a timeout, then a retry) had every abandoned request run all the same. Only inference:
    a repository load the client stopped waiting for still completes.

    A client that shuts its side of the connection looks the same on the wire as one that
    closed it and left (a FIN either way), so its inference ends too, as nginx and Go's
    net/http read it; but where the client still reads (a half-close), it is told why (400
    CANCELLED) rather than left without an answer. ``body``: what cut the request's body
    short, when something did (``eof_received``): a body the half-close left incomplete is
    said as such, as it is when the half-close comes while it is read; it was told only that
    the inference was cancelled, though what to fix is the body (a Content-Length over what
    was sent)."""
    if not isinstance(connection, _Connection):
        return await answer
    if connection.half_closed:
        if asyncio.iscoroutine(answer):
            answer.close()
        if isinstance(body, HttpProcessingError):
            raise InvalidArgument(f"the request body could not be read: {body.message}")
        raise HttpError(400, HALF_CLOSED, ErrorKind.CANCELLED)
    task = asyncio.ensure_future(answer)
    connection.inference = task
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this handler itself is cancelled (the server is stopping)
        if connection.half_closed:
            raise HttpError(400, HALF_CLOSED, ErrorKind.CANCELLED) from None
        raise ConnectionResetError(
            "Connection lost: the client went away before its inference was answered"
        ) from None
    finally:
        connection.inference = None


def _parse_refusal(exc: BaseException | None, message: str | None) -> tuple[int, ErrorKind, str]:
    """(status, kind, message) for a request the HTTP parser refused: 414 a request line over
    its limit, 431 a header line or too many headers (RFC 9110, RFC 6585), 400 anything else,
    with the parser's reason."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if str(limit) == str(MAX_REQUEST_LINE):
            return (
                414,
                ErrorKind.LIMIT_EXCEEDED,
                f"the request target (the URL) is over {MAX_REQUEST_LINE} bytes: shorten it",
            )
        return (
            431,
            ErrorKind.LIMIT_EXCEEDED,
            f"a header is over {MAX_HEADER_LINE} bytes (name and value): send it shorter",
        )
    text = message or ""
    if "Invalid HTTP version" in text or "PRI/Upgrade" in text:  # HTTP/1.2, HTTP/2's preface
        return 505, ErrorKind.UNIMPLEMENTED, VERSION_REFUSED.format("that version")
    if isinstance(exc, HttpProcessingError) and exc.message == "Too many headers received":
        return (
            431,
            ErrorKind.LIMIT_EXCEEDED,
            f"the request has over {MAX_HEADERS} headers: send fewer",
        )
    why = " ".join((message or "").split())[:MAX_PARSE_MESSAGE] or "HTTP 400"
    return 400, ErrorKind.INVALID_ARGUMENT, f"the request is not valid HTTP/1.1: {why}"


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


class _Connection(RequestHandler):
    """aiohttp's connection handler, with a bound on how long a request's head may take.

    aiohttp parses a request only once its head is whole, and bounds nothing until then but the
    keep-alive wait; this handler arms a timer when a head begins (the connection opening, or
    the first byte after the previous request's body) and disarms it when aiohttp has parsed a
    message. A head may begin while the previous request is still being answered (pipelining):
    its time runs from its first byte all the same, and if it runs out while that answer is
    being written, the 408 follows the answer (``finish_response``) rather than cutting into it.
    Before, such a head was bounded only by the keep-alive wait, which starts after the answer
    and may be set far longer (--http-keepalive-timeout), and was closed without an answer.

    aiohttp offers no hook for this, so it reads the handler's own state (``_waiter``: waiting
    for a request; ``_messages``: parsed, not yet answered; ``_request_count``: messages parsed;
    ``_keepalive_handle``); the head tests in tests/compat/test_http_bounds.py fail if an
    aiohttp release changes it."""

    __slots__ = (
        "_connections",
        "_head_bytes",
        "_head_late",
        "_head_timer",
        "_last",
        "_recent",
        "_send_left",
        "_send_timer",
        "half_closed",
        "inference",
        "on_open",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        connections: set[_Connection],
        **kw: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kw)
        self._connections = connections  # the listener's open connections, this one once open
        self._head_timer: asyncio.TimerHandle | None = None
        # Bytes of the head under way; None where a chunk held both the end of one message and
        # the start of the next, and where one ends llhttp does not say.
        self._head_bytes: int | None = 0
        # The head's time ran out while an earlier request was being answered.
        self._head_late = False
        # The last message parsed and its body: bytes that come once that body is whole begin
        # the next head.
        self._last: tuple[Any, Any] | None = None
        self._recent = b""  # the last 3 bytes received: where a message's empty line ends
        self.half_closed = False  # the client shut its write side (``eof_received``)
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_left = 0  # bytes waiting to be sent when the send timer was armed
        # The inference this connection's request is waiting for (``abandonable``), cancelled
        # when the connection is lost.
        self.inference: asyncio.Future[Any] | None = None
        # Called once the connection is open (over TLS: its handshake done).
        self.on_open: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.on_open is not None:
            self.on_open()
            self.on_open = None
        self._connections.add(self)
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.discard(self)
        self._disarm_head()
        self._disarm_send()
        if self.inference is not None:
            self.inference.cancel()
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio reads True: keep open
        """The client shut its side (a half-close: an HTTP/1.0-style client, or a load balancer,
        sends a request, shuts its write side, then reads the answer). aiohttp's handler let
        asyncio close the connection at once, so a request it had just received, whole, was
        never answered. Now a request received (or being answered) is answered first, then
        the connection is closed; a body cut short by the half-close is refused (400) rather
        than waited for; an inference is cancelled, and says so (``_abandonable``); with no
        request under way the connection is closed as before."""
        transport = self.transport
        if transport is None or self._force_close or self._close:
            return False
        waiting = self._waiter is not None and not self._waiter.done()
        if (waiting and not self._messages) or transport.get_extra_info("sslcontext"):
            # Idle between requests; or over TLS, where asyncio closes on EOF all the same.
            return False
        body = self._body_under_way()
        self._disarm_head()  # a head begun after the request can no longer arrive whole
        self._head_late = False
        self.half_closed = True
        if not self._messages:  # the request under way is the last: close once it is answered
            self.close()
        if body is not None:
            log.debug(
                "the client shut its side of the connection after %d bytes of a body",
                body.total_bytes,
            )
            body.set_exception(
                HttpProcessingError(
                    message=f"the client shut its side of the connection after {body.total_bytes}"
                    " bytes of the body: send the whole body before shutting down writing"
                )
            )
            body.feed_eof()  # nothing more comes: aiohttp need not linger to read the rest
        elif self.inference is not None:  # see ``_abandonable``
            self.inference.cancel()
        return True

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (a malformed line or header, a
        Content-Length beside Transfer-Encoding, a line over 8 KiB), in the body every other
        error has: it was plain text, which tritonclient could not read (it reads ``error``
        from a JSON body) and which named no error kind."""
        super().handle_error(request, status, exc, message)  # logs it; raises if an answer began
        # A request the parser refused is answered for aiohttp's stand-in request, HTTP/1.0:
        # its status line said "HTTP/1.0" (and so no "Connection: close") to HTTP/1.1 clients.
        _answer_in_http11(request)
        if status >= 500:  # a bug in a handler: its details stay in the log
            kind, text = ErrorKind.INTERNAL, "internal error: see the server's log"
        else:
            status, kind, text = _parse_refusal(exc, message)
        response = web.Response(
            status=status,
            body=error_body(text, kind),
            headers={"Content-Type": JSON, ERROR_HEADER: kind.value},
        )
        response.force_close()
        return response

    def pause_writing(self) -> None:
        """The send buffer is over its high-water mark: the client must take bytes of it."""
        super().pause_writing()
        self._arm_send()

    def resume_writing(self) -> None:
        self._disarm_send()
        super().resume_writing()

    def _arm_send(self) -> None:
        self._disarm_send()
        transport = self.transport
        self._send_left = transport.get_write_buffer_size() if transport is not None else 0
        self._send_timer = self._loop.call_later(SEND_IDLE, self._send_expired)

    def _disarm_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_expired(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        left = transport.get_write_buffer_size()
        if left < self._send_left:  # the client is reading, however slowly
            self._arm_send()
            return
        log.debug(
            "closed a connection that took no byte of its answer for %g seconds (%d bytes left)",
            SEND_IDLE,
            left,
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a reset: the kernel would otherwise keep trying to send it too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()  # what is buffered cannot be sent: drop it with the connection

    def data_received(self, data: bytes) -> None:
        closing = self._force_close or self._close
        body = self._body_under_way()
        if data and not closing and body is None:
            # The previous request's body is whole (answered or not): these bytes begin a head.
            if self._head_timer is None:
                self._arm_head()
            if self._head_bytes is not None:
                self._head_bytes += len(data)
        parsed = self._request_count
        before = body.total_bytes if body is not None else 0
        recent, self._recent = self._recent, (self._recent + data[-3:])[-3:]
        super().data_received(data)
        if self._request_count != parsed:  # a whole head (or one aiohttp refuses with 400)
            self._disarm_head()
            self._head_late = False  # it came late, but whole: it is answered, not refused
            if self._messages:
                self._last = self._messages[-1]
                refused = getattr(self._last[0], "exc", None)  # aiohttp's _ErrInfo
                if body is not None and isinstance(refused, HttpProcessingError):
                    # The body under way is malformed (a chunk size that is not hex, a chunk
                    # not ended by CRLF). aiohttp queues its refusal as a next request and
                    # leaves the body waiting, so the handler reading it waited BODY_IDLE and
                    # answered 408 "arrived too slowly"; it now fails at once with the reason.
                    body.set_exception(refused)
        elif body is None:
            return
        if not data or closing or self._head_timer is not None or self._body_under_way():
            return
        extra = self._after_last(data, recent, self._request_count != parsed, before)
        if extra != 0:
            self._arm_head()
            self._head_bytes = extra

    def _after_last(self, data: bytes, recent: bytes, parsed_here: bool, before: int) -> int | None:
        """Bytes of ``data`` after the end of the last message, which ended in it (None: some,
        how many unknown). llhttp does not say where a message ends, so it is found from what a
        message ends with; where that cannot tell (the bytes after it end as it does), 0: the
        keep-alive bound, not this one, closes the connection."""
        message, payload = self._last or (None, None)
        if payload is not None and not getattr(message, "chunked", True):
            length = payload.total_bytes
            if not parsed_here:  # the body began in an earlier chunk: exact
                return len(data) - (length - before)
            if length:  # its head ended here: with a line feed right before the body
                return 0 if data[-length - 1 : -length] == b"\n" else None
        # No body, or a chunked one: either ends with an empty line, the last 3 bytes say.
        ended = (recent + data[-3:])[-3:]
        return 0 if ended.endswith(b"\n\n") or ended == b"\n\r\n" else None

    def _body_under_way(self) -> Any:
        """The last parsed message's body while it is still arriving; None once it is whole."""
        payload = self._last[1] if self._last is not None else None
        return payload if payload is not None and not payload.is_eof() else None

    async def finish_response(self, request: Any, resp: Any, start_time: float | None) -> Any:
        last = self.half_closed and not self._messages  # nothing can follow it: close once sent
        if last:
            resp.force_close()  # says so (Connection: close) where its head is not yet sent
        result = await super().finish_response(request, resp, start_time)
        if last:
            self.close()
        if self._head_late and not self._messages:  # the 408 after the last answer owed
            self._head_late = False
            self._refuse_head()
        return result

    def _process_keepalive(self) -> None:
        if self._head_timer is not None or self._head_late:
            # A head is arriving: HEADER_TIMEOUT bounds it. Closing it as idle would drop a
            # request the client has begun to send, without an answer.
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def _arm_head(self) -> None:
        self._disarm_head()
        self._head_bytes = 0
        self._head_timer = self._loop.call_later(HEADER_TIMEOUT, self._head_expired)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._waiter is None or self._waiter.done():
            # An earlier request is still being answered: the 408 follows its answer.
            self._head_late = True
            return
        self._refuse_head()

    def _refuse_head(self) -> None:
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._head_bytes != 0:
            # Answered where an answer can still be read: the client learns why, as with a body
            # that stops arriving. A connection that sent nothing is closed without a word.
            came = f" ({self._head_bytes} bytes came)" if self._head_bytes is not None else ""
            message = (
                f"the request's line and headers did not arrive within {HEADER_TIMEOUT:g} "
                f"seconds{came}; send them without pausing"
            )
            transport.write(raw_answer(408, message, ErrorKind.DEADLINE_EXCEEDED))
        log.debug(
            "closed a connection whose request head did not arrive (%s bytes came)",
            self._head_bytes,
        )
        self.force_close()  # the write buffer is flushed before the socket closes


class _Refusal(asyncio.Protocol):
    """A connection past the listener's cap: answered 503 at once, before its request is read,
    then closed. Its write side is shut after the answer and what the client sends is dropped
    until it hangs up (at most LINGER seconds): closing with its request unread would send a
    reset, which may reach the client before the answer and lose it."""

    def __init__(self, refusals: set[_Refusal], limit: int) -> None:
        self._refusals = refusals
        self._limit = limit
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        message = (
            f"this HTTP listener has its {self._limit} connections open "
            "(--http-max-connections): send the request on a connection already open, or "
            "retry later"
        )
        transport.write(raw_answer(503, message, ErrorKind.UNAVAILABLE, {"Retry-After": "1"}))
        if len(self._refusals) >= REFUSING or not transport.can_write_eof():
            transport.close()  # sends what is written, then closes
            return
        self._refusals.add(self)
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        """The request is not read: the answer does not depend on it."""

    def eof_received(self) -> bool:
        return False  # the client has read the answer and hung up: close

    def connection_lost(self, exc: BaseException | None) -> None:
        self._refusals.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def connection_cap(wanted: int) -> int:
    """The connections a listener holds: ``wanted``, and at most a quarter of the process's
    open-file limit, so one listener's connections never take the descriptors the others
    need (the cap is per listener, and each needs a few for itself and its models)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 4))


class HttpListener:
    def __init__(
        self,
        routes: OipRoutes,
        guard: ListenerGuard,
        *,
        max_body_bytes: int,
        open_health: bool,
        keepalive: float | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        # Seconds an idle connection is kept (--http-keepalive-timeout; KEEPALIVE by default).
        self._keepalive = KEEPALIVE if keepalive is None else keepalive
        self._max_connections = max_connections
        self._connections: set[_Connection] = set()
        self._refusals: set[_Refusal] = set()
        # TLS connections whose handshake is under way: they hold a descriptor too, but their
        # protocol hears nothing until the handshake is done, nor of one that fails.
        self._handshaking = 0
        self._routes = routes
        self._guard = guard
        self._check_token = guard.requires_token
        self._open_health = open_health
        self._limit = max_body_bytes
        self._server: web.Server | None = None
        self._listening: asyncio.base_events.Server | None = None

    async def start(
        self, host: str, port: int, context: ssl.SSLContext | None, *, reuse_port: bool = False
    ) -> int:
        """Bind and listen; returns the bound port (``port`` 0 picks a free one). ``reuse_port``:
        the worker processes of one server share it (SO_REUSEPORT)."""
        sock = _listen_socket(host, port, reuse_port)
        server = self._server = web.Server(self._handle)
        logger = _ServerLog(logging.getLogger("ferry.server.http.aiohttp"), {})
        loop = asyncio.get_running_loop()
        cap = connection_cap(self._max_connections)
        if cap < self._max_connections:
            log.info(
                "the HTTP listener on %s holds at most %d connections: a quarter of the "
                "open-file limit (ulimit -n), under --http-max-connections %d",
                host_port(host, sock.getsockname()[1]),
                cap,
                self._max_connections,
            )

        def connection() -> asyncio.Protocol:
            if len(self._connections) + self._handshaking >= cap:
                return _Refusal(self._refusals, cap)
            made = _Connection(
                server,
                loop=loop,
                connections=self._connections,
                access_log=None,
                keepalive_timeout=self._keepalive,
                lingering_time=LINGER,
                auto_decompress=False,  # ours checks that a compressed body is whole
                max_line_size=MAX_REQUEST_LINE,
                max_field_size=MAX_HEADER_LINE,
                max_headers=MAX_HEADERS,
                logger=logger,
            )
            if context is not None:
                self._count_handshake(made, loop)
            return made

        try:
            self._listening = await loop.create_server(
                connection,
                sock=sock,
                ssl=context,
                # A TLS connection's head is timed once its handshake is done; the handshake
                # has the same bound (asyncio's own is 60 s), so one that never starts it is
                # closed as soon as a plain connection that sends nothing.
                ssl_handshake_timeout=HEADER_TIMEOUT if context is not None else None,
            )
        except BaseException:
            sock.close()
            raise
        return int(sock.getsockname()[1])

    def _count_handshake(self, made: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Count a TLS connection from its accept: until its handshake is done (``on_open``),
        or for at most the handshake's bound, past which asyncio has closed it if it failed
        (nothing says when it does). Counted only once open, a flood of connections that
        never finished a handshake, each held HEADER_TIMEOUT, escaped the cap."""
        self._handshaking += 1

        def done() -> None:
            if made.on_open is done:
                made.on_open = None
                timer.cancel()
                self._handshaking -= 1

        made.on_open = done
        timer = loop.call_later(HEADER_TIMEOUT + 1, done)

    async def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight requests ``grace`` seconds, then close connections."""
        if self._listening is not None:
            self._listening.close()
        for refusal in list(self._refusals):
            refusal.close()
        if self._server is not None:
            # Close idle keep-alive connections now (aiohttp >= 3.10 has pre_shutdown); busy
            # ones finish their request within the grace period, then close.
            pre_shutdown = getattr(self._server, "pre_shutdown", None)
            if pre_shutdown is not None:
                pre_shutdown()
            await self._server.shutdown(grace)
        if self._listening is not None:
            await self._listening.wait_closed()
            self._listening = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.version.major != 1:
            return _version_refused(request)
        path = _path_of(request)
        try:
            if "#" in request.raw_path:
                # It was routed as part of the path (404 "no endpoint") or of the query (served).
                raise InvalidArgument(FRAGMENT)
            _check_host(request)
            _check_transfer_codings(request.headers.getall("Transfer-Encoding", []))
            expects_continue(request.headers.getall("Expect", []))
            if self._check_token and not (self._open_health and is_health(path)):
                self._authorize(request.headers.getall("Authorization", []))
            answer = self._routes.handle(
                request.method, path, request.headers, lambda: self._read(request)
            )
            if request.method == "POST" and path.endswith("/infer"):
                status, body, headers = await _abandonable(
                    answer, request.protocol, request.content.exception()
                )
            else:
                status, body, headers = await answer
        except ConnectionError:
            raise
        except Exception as exc:
            status, message, kind, extra = error_of(exc)
            headers = {"Content-Type": JSON, ERROR_HEADER: kind.value, **extra}
            body = error_body(message, kind)
            if status in (408, 413) or request.content.exception() is not None:
                # The rest of the body is not worth a connection, or (a malformed body) where
                # it ends is unknown.
                response = web.Response(status=status, body=body, headers=headers)
                response.force_close()
                return response
        response = web.Response(status=status, body=body, headers=headers)
        if request.version < HttpVersion11 and "Transfer-Encoding" in request.headers:
            # RFC 9112 6.1: HTTP/1.0 has no Transfer-Encoding, so such a message's framing is
            # faulty (a proxy in front may have read it otherwise): answered, then the
            # connection closed. With "Connection: keep-alive" it stayed open, and what
            # followed the chunks was served as the next request.
            response.force_close()
        return response

    def _authorize(self, values: list[str]) -> None:
        verdict = self._guard.verdict_of(values)
        if verdict is None:
            return
        name = self._guard.name
        if verdict == TWICE:
            raise HttpError(
                401,
                f"the {name} listener got {len(values)} Authorization headers: send one "
                "'Authorization: Bearer <token>'",
                ErrorKind.UNAUTHENTICATED,
                {"WWW-Authenticate": 'Bearer error="invalid_request"'},
            )
        if verdict == DENIED:
            raise HttpError(
                403,
                f"this token may not call the {name} listener: use the {name} token",
                ErrorKind.PERMISSION_DENIED,
            )
        if verdict == MISSING:
            message = (
                f"the {name} listener requires a token: send the header "
                "'Authorization: Bearer <token>'"
            )
            challenge = "Bearer"
        else:
            message = f"invalid token for the {name} listener"
            challenge = 'Bearer error="invalid_token"'
        raise HttpError(401, message, ErrorKind.UNAUTHENTICATED, {"WWW-Authenticate": challenge})

    async def _read(self, request: web.BaseRequest) -> bytes:
        for name in ONCE:
            if len(request.headers.getall(name, ())) > 1:
                raise InvalidArgument(f"the header {name} is sent more than once: send it once")
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in DECODED:
            raise HttpError(
                415,
                f"Content-Encoding {encoding[:40]!r} is not supported: send the body "
                f"uncompressed or as {', '.join(sorted(DECODED - {'', 'identity'}))}",
                ErrorKind.INVALID_ARGUMENT,
            )
        length = request.content_length
        binary = HEADER_LENGTH in request.headers  # already the binary form: no advice to use it
        if length is not None and length > self._limit:
            raise self._too_large(f"its Content-Length is {length} bytes", binary)
        # RFC 9110 10.1.1: an HTTP/1.0 request's expectation is ignored. An HTTP/1.0 client
        # knows no interim answer: it took the 100 for the answer and lost the real one.
        expect = expects_continue(request.headers.getall("Expect", []))
        content = request.content
        # RFC 9110 10.1.1: not once the body has begun to arrive (or is empty), as it has from
        # a client that sends it without waiting. tritonclient (geventhttpclient) does, reads no interim
        # answer, and so took the 100 for its answer ("empty response") and the real one for
        # the answer to its next request, every call after on that connection off by one.
        if (
            expect
            and request.version >= (1, 1)
            and not content.total_bytes
            and not content.is_eof()
        ):
            await request.writer.write(CONTINUE)
        decode = decoder(encoding)
        chunks: list[bytes] = []
        total = 0
        bound = MinRate(BODY_IDLE, BODY_MIN_RATE)
        arrived = 0  # bytes on the wire (a compressed body's decode to more)
        try:
            async with asyncio.timeout(None) as stall:
                while True:
                    stall.reschedule(bound.deadline(arrived))
                    chunk = await content.readany()
                    if not chunk:
                        break
                    arrived += len(chunk)
                    if decode is not None:
                        chunk = decode.feed(chunk, self._limit - total)
                    total += len(chunk)
                    if total > self._limit:
                        what = "decoded" if decode is not None else "arrived"
                        raise self._too_large(f"more than {self._limit} bytes {what}", binary)
                    chunks.append(chunk)
            if decode is not None:
                decode.finish()
        except (HttpProcessingError, web.RequestPayloadError) as exc:  # bad chunking
            why = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
            why = " ".join(str(why).split())[:MAX_PARSE_MESSAGE]  # str() adds "400, message:"
            raise InvalidArgument(f"the request body could not be read: {why}") from None
        except BodyError as exc:
            raise InvalidArgument(f"the request body could not be read: {exc}") from None
        except TimeoutError:
            if bound.by_rate:
                why = f"arrived too slowly: {bound.too_slow(arrived, 'a body')}"
            else:
                why = f"stopped arriving: no byte for {BODY_IDLE:g} seconds after {total} bytes"
            raise HttpError(
                408,
                f"the request body {why}; send the whole body without pausing",
                ErrorKind.DEADLINE_EXCEEDED,
            ) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, why: str, binary: bool) -> HttpError:
        """``binary``: the body already uses the binary tensor extension, so the only remedies
        are smaller batches or a higher limit (a tritonclient user sends binary by default)."""
        remedy = "send" if binary else "send tensors as binary data (about 3x smaller than JSON) or"
        return HttpError(
            413,
            f"the request body is over the limit of {self._limit} bytes (max_message_bytes): "
            f"{why}; {remedy} in smaller batches, or raise the limit (--max-message-bytes)",
            ErrorKind.LIMIT_EXCEEDED,
        )


def _answer_in_http11(request: web.BaseRequest) -> None:
    """Makes the answer to ``request`` say HTTP/1.1 whatever version it came in: aiohttp writes
    an answer's status line (and chooses its Connection header) in the request's version, read
    from ``_version`` and cached by ``version`` (a reify). tests/compat/test_http_wire.py fails
    if an aiohttp release changes either."""
    request._version = HttpVersion11
    request._cache.pop("version", None)


def _check_host(request: web.BaseRequest) -> None:
    """400 (RFC 9112 3.2, a MUST) for an HTTP/1.1 request with no Host header and for any with
    more than one: which host was meant is unknown. Recent aiohttp parsers (3.14) refuse both;
    older releases Ferry allows (aiohttp>=3.9) served them. HTTP/1.0 needs none."""
    hosts = request.headers.getall("Host", [])
    if len(hosts) > 1:
        raise InvalidArgument(f"the request has {len(hosts)} Host headers: send one")
    if not hosts and request.version >= HttpVersion11:
        raise InvalidArgument(
            "an HTTP/1.1 request must carry a Host header (RFC 9112): send 'Host: <host>[:<port>]'"
        )


def _check_transfer_codings(values: list[str]) -> None:
    """501 (RFC 9112 6.1: a transfer coding the server does not understand) for any coding
    but chunked. The parser frames the chunks and drops the codings before them, so a body
    sent ``Transfer-Encoding: gzip, chunked`` was read still compressed ("not valid JSON:
    can't decode byte 0x8b", blaming a body that was right), and one under a coding nobody
    knows (``foo, chunked``) was run as if it were plain."""
    for value in values:
        for member in value.split(","):
            coding = member.strip().lower()
            if coding and coding != "chunked":
                raise HttpError(
                    501,
                    f"Transfer-Encoding {member.strip()[:40]!r} is not supported: send the "
                    "body with Content-Length or 'Transfer-Encoding: chunked' alone; to "
                    f"compress it, use Content-Encoding ({', '.join(sorted(ENCODINGS))})",
                    ErrorKind.UNIMPLEMENTED,
                )


def _version_refused(request: web.BaseRequest) -> web.StreamResponse:
    """505 to a request line the parser takes that is not HTTP/1 (``HTTP/2.0``, ``HTTP/0.9``),
    in HTTP/1.1 and closing the connection. Such requests were served, answered in their own
    version's words ("HTTP/2.0 200 OK") in HTTP/1 framing, which no client of either reads."""
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    _answer_in_http11(request)
    kind = ErrorKind.UNIMPLEMENTED
    response = web.Response(
        status=505,
        body=error_body(VERSION_REFUSED.format(version), kind),
        headers={"Content-Type": JSON, ERROR_HEADER: kind.value},
    )
    response.force_close()
    return response


def _path_of(request: web.BaseRequest) -> str:
    """The request target's path, still percent-encoded. A target in absolute form
    (``GET http://host/v2/health/live``, what a client sends through a forward proxy, and what
    RFC 9112 says a server must accept) is read as its path: it was answered 404, its whole
    URL taken for the path."""
    raw = request.raw_path
    if not raw.startswith("/") and raw[:8].lower().startswith(("http://", "https://")):
        return request.rel_url.raw_path or "/"
    return raw.partition("?")[0]


def _listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bound here rather than by aiohttp, so a busy port fails with one line naming it, as the
    gRPC listeners do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = host_port(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise bind_failure(address, host, exc) from None
    return sock


def ssl_context(tls: ListenerTLS | None) -> ssl.SSLContext | None:
    """The listener's certificates as an SSL context (None: plaintext). With a client CA every
    client must present a certificate it signed: the handshake fails before any request."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=encrypted_key)
        if tls.client_ca_file:
            context.load_verify_locations(cafile=tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise OSError(
            f"cannot load the TLS files {tls.cert_file!r}, {tls.key_file!r}"
            f"{', ' + repr(tls.client_ca_file) if tls.client_ca_file else ''}: {exc}"
        ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context
