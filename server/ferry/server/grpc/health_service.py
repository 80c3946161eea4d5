"""grpc.health.v1 for a listener: Check, and Watch streams that end when the server stops.

grpcio-health-checking's servicer kept every Watch stream open through a graceful shutdown: it
sent NOT_SERVING and went on waiting for a change that could no longer come. A Watch is what
gRPC's client-side health checking (a service config's ``healthCheckConfig``) and proxies such
as Envoy hold open on every connection, so with one such client each stop waited out the whole
``--grace-period`` and then cut the stream (UNAVAILABLE), however soon the calls in flight had
finished. Here a Watch ends (OK) once it has sent the final NOT_SERVING; one begun after that
answers the status and ends at once.

And its Watch wrote each change while holding the lock that ``set`` takes, so a watcher that
stopped reading (its flow-control window full) held every later ``set``, the replica's readiness
and the stop's NOT_SERVING included. Here a change only wakes the watchers of its name; each
writes on its own.

And Watch streams were unbounded: each holds a call, a coroutine and its connection's stream for
as long as the client keeps it, and 2,000 from one client were all held. A process keeps at most
``--max-health-watches`` open across its listeners (``WatchSlots``); one more is refused
RESOURCE_EXHAUSTED, and Check, which holds nothing, still answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# Settings.max_health_watches' default: a Watch per client connection (gRPC's client-side health
# checking, Envoy) for as many connections as an HTTP listener holds by default.
DEFAULT_MAX_WATCHES = 1024


class WatchSlots:
    """The Watch streams one process holds open, shared by every listener's servicer: the
    bound is on what the process holds, whichever port the streams came through."""

    def __init__(self, limit: int = DEFAULT_MAX_WATCHES) -> None:
        self.limit = limit
        self.open = 0


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The statuses a server sets, by health name (``""``: the whole server)."""

    def __init__(
        self,
        names: str = "'' (the server), a model name, or a service name such as "
        "inference.GRPCInferenceService",
        slots: WatchSlots | None = None,
    ) -> None:
        """``names``: what a Check of an unknown name is told to ask instead; ``slots``: the
        process's Watch bound (one of the servicer's own when not shared)."""
        self._names = names
        self._slots = slots if slots is not None else WatchSlots()
        self._status: dict[str, Any] = {"": health_pb2.HealthCheckResponse.SERVING}
        # Each open Watch's wake-up, by the name it watches; a name leaves with its last one.
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._ended = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no health status for {request.service[:200]!r}: ask {self._names}",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext
    ) -> None:
        slots = self._slots
        if slots.open >= slots.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{slots.open} health Watch streams are open in this server process, the most "
                f"--max-health-watches ({slots.limit}) allows: close one you no longer read, "
                "poll Check instead, or raise --max-health-watches",
            )
        slots.open += 1  # no await since the check: nothing else ran in between
        name = request.service
        wake = asyncio.Event()
        self._watchers.setdefault(name, set()).add(wake)
        try:
            last = None
            while True:
                wake.clear()  # a change while the write below waits sets it again
                # Read before the status: ended then, the status read next is the final one. A
                # stop during the write is seen on the next turn, which sends its NOT_SERVING.
                ended = self._ended
                status = self._status.get(name, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if ended:
                    return  # the last status was sent; nothing will change any more
                await wake.wait()
        finally:
            slots.open -= 1
            waiting = self._watchers.get(name)
            if waiting is not None:
                waiting.discard(wake)
                if not waiting:
                    del self._watchers[name]

    async def set(self, service: str, status: Any) -> None:
        """Set ``service``'s status and tell its watchers; ignored once the server stops."""
        if self._ended:
            return
        self._status[service] = status
        for wake in self._watchers.get(service, ()):
            wake.set()

    async def enter_graceful_shutdown(self) -> None:
        """Every name NOT_SERVING for good, and every Watch stream ends after saying so."""
        if self._ended:
            return
        self._ended = True
        for name in self._status:
            self._status[name] = NOT_SERVING
        for waiting in self._watchers.values():
            for wake in waiting:
                wake.set()
