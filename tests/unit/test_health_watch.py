"""A Watch says NOT_SERVING before it ends, even when the stop comes while it writes."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from ferry.server.grpc.health_service import HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _SlowReader:
    """A Watch's context whose first write completes only when the test lets it: a client
    whose flow-control window is full while the server stops."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.writing = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, reply: health_pb2.HealthCheckResponse) -> None:
        self.sent.append(reply.status)
        if len(self.sent) == 1:
            self.writing.set()
            await self.release.wait()


def test_a_stop_during_a_write_is_still_said_before_the_watch_ends() -> None:
    async def scenario() -> list[Any]:
        health = HealthServicer()
        context = _SlowReader()
        watch = asyncio.create_task(
            health.Watch(health_pb2.HealthCheckRequest(service=""), context)  # type: ignore[arg-type]
        )
        await context.writing.wait()
        await health.enter_graceful_shutdown()
        context.release.set()
        await asyncio.wait_for(watch, 30)
        return context.sent

    assert asyncio.run(scenario()) == [SERVING, NOT_SERVING]
