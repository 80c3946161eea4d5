"""The other worker processes, as seen from one: their control sockets in the run folder.

Async calls serve the event loop (ModelStatistics, repository changes); sync calls serve the
metrics thread, which must not touch the loop. Statistics are a sum, never an error for the
caller: a worker that does not answer in time adds what it answered last (its counters as they
were then), so one slow read does not make the sum drop and come back (a scrape then showed
traffic that was never sent); one that has never answered, or was started again, adds nothing
until it answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from ferry.server.core.types import VersionStatistics
from ferry.server.workers import control

log = logging.getLogger(__name__)

SOCKET_GLOB = "worker-*.sock"
CALL_TIMEOUT = 5.0
# A scrape asks every worker twice (statistics, requests): under Prometheus' default 10 s
# scrape timeout even when one worker is stuck.
SCRAPE_CALL_TIMEOUT = 2.0
MAX_KEPT = 4096  # last answers kept (per socket and question)


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


class Peers:
    def __init__(self, run_dir: Path, own: Path) -> None:
        self.run_dir = run_dir
        self.own = own
        self._aio: dict[Path, aio.Channel] = {}
        self._sync: dict[Path, grpc.Channel] = {}
        # (socket, method, question) -> the last answer: what a worker that does not answer in
        # time adds instead (module docstring)
        self._last: dict[tuple[Path, str, str], Any] = {}
        self._last_lock = threading.Lock()  # the loop and the metrics thread both use it

    def _answered(self, path: Path, method: str, ask: Any, answer: Any) -> Any:
        """Record ``answer`` (or, for an exception, fall back on the last one; None if none)."""
        key = (path, method, json.dumps(ask, sort_keys=True))
        with self._last_lock:
            if isinstance(answer, BaseException):
                log.debug("worker %s did not answer %s: %s", path.name, method, answer)
                return self._last.get(key)
            self._last.pop(key, None)  # re-inserted last: the oldest question goes first
            self._last[key] = answer
            while len(self._last) > MAX_KEPT:  # questions name models: bounded all the same
                del self._last[next(iter(self._last))]
            return answer

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
        ask = {"model": model, "version": version}
        paths = self.sockets()
        answers = await asyncio.gather(
            *(self.call(p, control.STATISTICS, ask, CALL_TIMEOUT) for p in paths),
            return_exceptions=True,
        )
        out: list[VersionStatistics] = []
        for path, answer in zip(paths, answers, strict=True):
            kept = self._answered(path, control.STATISTICS, ask, answer)
            out.extend(control.stats_from_json(d) for d in kept or ())
        return out

    def forget(self, path: Path) -> None:
        """Drop the cached channels to ``path`` (its worker was started again): the next call
        connects afresh instead of waiting out a backoff from the restart. Its last answers go
        too: the new process counts from zero."""
        with self._last_lock:
            for key in [k for k in self._last if k[0] == path]:
                del self._last[key]
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
        return control.decode(rpc(control.encode(ask), timeout=SCRAPE_CALL_TIMEOUT))

    def _gather_sync(self, method: str, ask: Any) -> list[Any]:
        out = []
        for path in self.sockets():
            try:
                answer: Any = self._sync_call(path, method, ask)
            except grpc.RpcError as exc:
                answer = exc
            kept = self._answered(path, method, ask, answer)
            if kept is not None:
                out.append(kept)
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
