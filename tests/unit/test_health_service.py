"""The health servicer's Watch against a stop that lands while a status is being written: the
stream must still send the final NOT_SERVING before it ends (no server, no timing)."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from ferry.server.grpc.health_service import HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HeldWrites:
    """A stream context whose first write waits until the test lets it finish."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.began = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        self.sent.append(message.status)
        if len(self.sent) == 1:
            self.began.set()
            await self.release.wait()


def test_a_stop_during_a_write_still_sends_not_serving_before_the_end() -> None:
    async def scenario() -> list[int]:
        health = HealthServicer()
        context = HeldWrites()
        watch = asyncio.create_task(
            health.Watch(health_pb2.HealthCheckRequest(service=""), context)  # type: ignore[arg-type]
        )
        await context.began.wait()  # the first write has begun
        await health.enter_graceful_shutdown()
        context.release.set()
        await asyncio.wait_for(watch, 30)  # ends: a bound for a broken servicer only
        return context.sent

    assert asyncio.run(scenario()) == [SERVING, NOT_SERVING]
