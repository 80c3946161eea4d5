"""Shared plumbing of the gRPC adapters: the server's method dispatch, error translation and
deadlines."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from grpc import aio

from ferry.server.errors import LimitExceeded
from ferry.server.grpc.status import status_of, trailing

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def new_server(options: list[tuple[str, int]], interceptors: list[Any]) -> aio.Server:
    """A grpc.aio server that dispatches every method through its generic handlers.

    grpc.aio (1.85) keeps one pending request per *registered* method and, for every call it
    accepts, runs ``asyncio.wait`` over all of them on the event loop: with the ~30 methods of
    ferry.v1, the Open Inference Protocol, health and reflection that is ~30 callbacks added and
    removed per call. Measured (bench/unary_gap.py, tiny MLP, C++ closed loop, c=64): Ferry's
    event loop spent 268 -> 246 us per request, throughput +9%, with the methods generic only;
    keeping just the four inference methods registered gained less. So the generated
    ``add_*Servicer_to_server`` functions (health, reflection, ours) register through the
    generic handlers alone, which resolve a method with a dict lookup per service."""
    server = aio.server(options=options, interceptors=interceptors)
    server.add_registered_method_handlers = _generic_only  # type: ignore[method-assign,assignment]
    return server


class PeerGoneFilter(logging.Filter):
    """grpc.aio logs an ERROR with a traceback ("ExecuteBatchError raised in core by servicer
    method") when a streaming handler's response cannot be written because the client already
    cancelled or closed the call: a client's business, which anyone could repeat to fill the
    log. Such records are kept only where DEBUG is enabled for Ferry's gRPC adapters."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ != "ExecuteBatchError":
            return True
        if not logging.getLogger(__name__).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_peer_gone() -> None:
    """Install PeerGoneFilter on grpc's Cython logger once (at server start, never at import)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, PeerGoneFilter) for f in grpc_log.filters):
        grpc_log.addFilter(PeerGoneFilter())


def _generic_only(service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
    """The generated code registers each service twice; its generic registration stands."""


def translate_errors(fn: F) -> F:
    """Turn any exception escaping a unary handler into a status from the one table."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            code, message, kind = status_of(exc)
            if context.cancelled() or _expired(context):
                # The caller is gone (its deadline passed, or it cancelled): no one to answer,
                # and grpc would fail the send and log a traceback per call under overload.
                # A deadline that passed a moment ago may not have reached cancelled() yet.
                raise asyncio.CancelledError from None
            context.set_trailing_metadata(trailing(kind))
            await context.abort(code, message)

    return wrapper  # type: ignore[return-value]


async def end_stream(context: aio.ServicerContext, exc: Exception) -> None:
    """End a streaming call with ``exc``'s status from the one table (a stream ended by the
    server's stop: UNAVAILABLE), not grpc's UNKNOWN for an exception escaping a handler."""
    code, message, kind = status_of(exc)
    context.set_trailing_metadata(trailing(kind))
    await context.abort(code, message)


def _expired(context: aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def call_deadline(context: aio.ServicerContext) -> float | None:
    """The call's gRPC deadline on the monotonic clock, or None: no later than the client's
    own (see ``client_remaining``)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + client_remaining(remaining)


# gRPC's C core (the Python, C++, Ruby... clients, tritonclient's included) first rounds a call's
# deadline up to a whole millisecond, then sends what is left of it in the grpc-timeout header
# rounded up again, to three significant figures: a unit of 1 ms below 1 s, 10 ms below 10 s,
# 100 ms below 100 s, 1 s below 1,000 s, and so on.
_ROUNDED_MS = 0.001


def client_remaining(remaining: float) -> float:
    """Seconds the client may still be waiting, at most, when its call has ``remaining``
    seconds by its grpc-timeout header: that header is rounded up, so the call's deadline here
    was later than its client's (an SDK call with a 5 s timeout arrived with 5.009 s remaining,
    10 s with 10.1 s, 150 s with 151 s), and the server queued, admitted and ran work for a
    client that had already given up. A client that sends its timeout exactly (grpc-go) loses
    at most 1% of it, and 1 ms below a second: the server's deadline must not be the later."""
    if not math.isfinite(remaining) or remaining <= 0.0:
        return remaining
    unit = 10.0 ** (math.floor(math.log10(remaining)) - 2) if remaining >= 1.0 else 0.001
    return remaining - unit - _ROUNDED_MS


def sendable(
    response: bytes,
    limit: int | None,
    echo: str = "",
    copies: int = 1,
    setting: str = "max_message_bytes",
) -> bytes:
    """``response`` if gRPC will send it: one over ``grpc.max_send_message_length`` failed its
    whole call in grpc's core, after the model had run, with grpc's own text ("Sent message
    larger than max"); on a stream that ended the stream, failing every other request still on
    it. Refused here, it is this request's own error, which names the limit and what to do.
    ``limit`` None: not bounded here (the listener sets no send limit). ``echo``: the text of
    the request the response repeats (its id), ``copies`` times, which is then what to
    shorten when the response would fit without it. ``setting``: what sets ``limit``, to
    raise."""
    if limit is not None and len(response) > limit:
        echoed = copies * len(echo.encode())
        if len(response) - echoed <= limit:
            raise echo_too_long(echoed, limit, setting=setting)
        raise LimitExceeded(
            f"the response is {len(response):,} bytes, over the limit of {limit:,} per message "
            f"({setting}): the model ran, but its outputs cannot be sent back in one "
            "message; request fewer rows or fewer outputs per request, or raise the limit"
        )
    return response


def echo_too_long(
    echoed: int, limit: int, what: str = "id", setting: str = "max_message_bytes"
) -> LimitExceeded:
    """An answer over the send limit because it repeats what the request sent (``what``: its
    id, and on an Open Inference Protocol stream's error its model name and version too)."""
    return LimitExceeded(
        f"this request's answer cannot be sent: it repeats the request's {what}, {echoed:,} "
        f"bytes, which puts it over the limit of {limit:,} bytes per message "
        f"({setting}); send a shorter {what}"
    )


def fits(message: Any, limit: int) -> bool:
    """Whether a response built as a protobuf message is within the send limit: a stream's
    error answer repeats the request's id, so a request near the limit made one that grpc
    refused to send, ending the whole stream ("Sent message larger than max")."""
    return bool(message.ByteSize() <= limit)
