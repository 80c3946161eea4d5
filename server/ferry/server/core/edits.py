"""Management edits that run to their end even when their caller leaves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

# The registry's logger, as before the split: the name is in every log line (server.logs).
log = logging.getLogger("ferry.server.core.registry")

T = TypeVar("T")
_EDITS: set[asyncio.Task[Any]] = set()  # edits whose caller left: kept until they end


async def run_to_end(work: Coroutine[Any, Any, T]) -> T:
    """Run a management edit to its end even when its caller leaves (a client's deadline, a
    cancelled call): cancelled half-way, a SetRollout left its split written but never checked
    or restored, and a version it was loading LOADING for good, its session opened and lost."""
    task = asyncio.ensure_future(work)
    _EDITS.add(task)
    task.add_done_callback(_edit_ended)
    return await asyncio.shield(task)


def _edit_ended(task: asyncio.Task[Any]) -> None:
    _EDITS.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        # Its caller may have left: the outcome is logged, not lost as never retrieved.
        log.info("a management edit ended with %s: %s", type(exc).__name__, exc)
