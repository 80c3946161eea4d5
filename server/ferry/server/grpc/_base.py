"""Shared plumbing of the gRPC adapters: error translation and deadlines."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpc import aio

from ferry.server.grpc.status import status_of, trailing

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


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


def _expired(context: aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def call_deadline(context: aio.ServicerContext) -> float | None:
    """The call's gRPC deadline on the monotonic clock, or None."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining
