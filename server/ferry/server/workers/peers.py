"""The other worker processes, as seen from one: their control sockets in the run folder.

Async calls serve the event loop (ModelStatistics, repository changes); sync calls serve the
metrics thread, which must not touch the loop. A worker that is restarting or gone simply adds
nothing for that call: statistics are a sum of what answers, never an error for the caller.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from ferry.server.core.types import VersionStatistics
from ferry.server.workers import control

log = logging.getLogger(__name__)

SOCKET_GLOB = "worker-*.sock"
CALL_TIMEOUT = 5.0


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


class Peers:
    def __init__(self, run_dir: Path, own: Path) -> None:
        self.run_dir = run_dir
        self.own = own
        self._aio: dict[Path, aio.Channel] = {}
        self._sync: dict[Path, grpc.Channel] = {}

    def sockets(self) -> list[Path]:
        return sorted(p for p in self.run_dir.glob(SOCKET_GLOB) if p != self.own)

    # ---- event loop ----
    def _aio_channel(self, path: Path) -> aio.Channel:
        channel = self._aio.get(path)
        if channel is None:
            channel = self._aio[path] = aio.insecure_channel(f"unix:{path}")
        return channel

    async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
        rpc: aio.UnaryUnaryMultiCallable[bytes, bytes] = self._aio_channel(path).unary_unary(method)
        return control.decode(await rpc(control.encode(ask), timeout=seconds))

    async def statistics(self, model: str, version: int | None) -> list[VersionStatistics]:
        answers = await asyncio.gather(
            *(
                self.call(p, control.STATISTICS, {"model": model, "version": version}, CALL_TIMEOUT)
                for p in self.sockets()
            ),
            return_exceptions=True,
        )
        out: list[VersionStatistics] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                log.debug("a worker did not answer for statistics: %s", answer)
                continue
            out.extend(control.stats_from_json(d) for d in answer)
        return out

    def forget(self, path: Path) -> None:
        """Drop the cached channels to ``path`` (its worker was started again): the next call
        connects afresh instead of waiting out a backoff from the restart."""
        channel = self._aio.pop(path, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())
        sync = self._sync.pop(path, None)
        if sync is not None:
            sync.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._aio.values()))
        self._aio.clear()

    # ---- metrics thread ----
    def _sync_call(self, path: Path, method: str, ask: Any) -> Any:
        channel = self._sync.get(path)
        if channel is None:
            channel = self._sync[path] = grpc.insecure_channel(f"unix:{path}")
        rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        return control.decode(rpc(control.encode(ask), timeout=CALL_TIMEOUT))

    def _gather_sync(self, method: str, ask: Any) -> list[Any]:
        out = []
        for path in self.sockets():
            try:
                out.append(self._sync_call(path, method, ask))
            except grpc.RpcError as exc:
                log.debug("worker %s did not answer: %s", path.name, exc)
        return out

    def statistics_sync(self) -> list[VersionStatistics]:
        return [
            control.stats_from_json(d)
            for answer in self._gather_sync(control.STATISTICS, {"model": "", "version": None})
            for d in answer
        ]

    def requests_sync(self) -> list[Any]:
        return [row for answer in self._gather_sync(control.REQUESTS, {}) for row in answer]

    def close_sync(self) -> None:
        for channel in self._sync.values():
            channel.close()
        self._sync.clear()
