"""The server's limit on one stream message, which it states when a stream opens.

gRPC's core enforces ``max_receive_message_length`` per call: a request over the server's
limit on a stream ended the whole stream RESOURCE_EXHAUSTED, and every other request on it was
lost with it (answered or not, no one could tell). No handler sees such a message, so the
server cannot refuse it alone; it states its limit instead, in the stream's first headers, and
the SDK refuses a request over it before sending it, as its own error, the stream carrying on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from ferry.client._errors import CLIENT_LIMIT, SERVER_LIMIT, LimitExceededError

# The header the server sends when a stream opens (server/ferry/server/grpc/inference.py).
LIMIT_HEADER = "ferry-max-message-bytes"
# The header a stream states the client's own limit on what it receives in: an answer over it
# ended the whole stream in the client's grpc core, every other request on it failing with it;
# the server refuses such an answer alone instead (server/ferry/server/grpc/inference.py).
RECEIVE_HEADER = "ferry-max-receive-bytes"
# The server's setting is at least this (settings.py): a smaller request never waits for it.
SMALLEST_SERVER_LIMIT = 4096
# How long a request over SMALLEST_SERVER_LIMIT waits for the stream's first headers before it
# goes unchecked. A server sends them as the stream opens (one round trip); a server from
# before them sends its headers only with its first answer, which a first request cannot wait
# for, so the wait is bounded.
HEADERS_WAIT_S = 2.0


def server_limit(metadata: Iterable[Any] | None) -> int | None:
    """The limit the server stated in ``metadata`` (its initial metadata), or None."""
    for key, value in metadata or ():
        if key == LIMIT_HEADER:
            try:
                limit = int(value)
            except (TypeError, ValueError):
                return None
            return limit if limit > 0 else None
    return None


def over_server_limit(
    size: int, limit: int | None, rid: str = "", receive: int | None = None
) -> LimitExceededError | None:
    """The error for a request of ``size`` bytes over the server's ``limit``, or one whose id
    (``rid``) no answer could repeat within that limit or the client's ``receive`` limit, else
    None.

    An answer repeats its request's id twice, so a request whose id is over half the limit can
    only be refused, and with an id near the limit the refusal could not carry the id either:
    the server sent it without one, which the SDK could match to no request, and that request
    waited for its answer until the stream ended (streams have no default deadline)."""
    bound, setting = limit, SERVER_LIMIT
    if receive is not None and (bound is None or receive < bound):
        bound, setting = receive, CLIENT_LIMIT
    echoed = 2 * len(rid.encode("utf-8", "surrogatepass"))
    if bound is not None and echoed > bound:
        return LimitExceededError(
            f"this request's id is {echoed // 2:,} bytes, and its answer repeats it twice: over "
            f"{setting}, {bound:,} bytes per message, so no answer could be sent; it was "
            "not sent, and the stream carries on; use a shorter id",
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            kind="LIMIT_EXCEEDED",
        )
    if limit is None or size <= limit:
        return None
    return LimitExceededError(
        f"this request is {size:,} bytes, over {SERVER_LIMIT}, {limit:,} bytes per message: "
        "it was not sent, and the stream carries on (sent, it would have ended the whole "
        "stream, every other request on it with it); send fewer rows per request, or raise "
        "the server's limit",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        kind="LIMIT_EXCEEDED",
    )


def receive_limit(metadata: Iterable[Any] | None) -> int | None:
    """The client's receive limit its stream states in ``metadata`` (``stream_metadata``)."""
    for key, value in metadata or ():
        if key == RECEIVE_HEADER:
            return int(value)
    return None


def stream_metadata(
    metadata: Sequence[tuple[str, str]] | None, receive_limit: int | None
) -> list[tuple[str, str]] | None:
    """The call's metadata, with the client's receive limit stated (``RECEIVE_HEADER``)."""
    if receive_limit is None:
        return list(metadata) if metadata is not None else None
    return [*(metadata or ()), (RECEIVE_HEADER, str(receive_limit))]
