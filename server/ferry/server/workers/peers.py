"""The other worker processes, as seen from one: their control sockets in the run folder.

Async calls serve the event loop (ModelStatistics, repository changes); sync calls serve the
metrics thread, which must not touch the loop. Statistics are a sum, never an error for the
caller, and a sum never drops because a worker is slow or was started again:

* a worker that does not answer in time adds what it answered last (its counters as they were
  then), so one slow read does not make the sum drop and come back (a scrape then showed
  traffic that was never sent);
* a worker that died and was started again counts from zero. What its previous process last
  reported is kept (*retired*) and added to every later sum, so a counter summed over workers
  stays monotonic and Prometheus' ``rate()`` does not read a reset (a sum fell from 200 to 118
  after a ``kill -9``). The first worker, which restarts the others and asks every one of them
  at each scrape, keeps them (each answer names the process that gave it, so a new process is
  told from the old one) and adds them to its answers to the other workers, so the sum holds
  whichever worker is asked. A retired version's counts stay while the first worker serves
  that same loaded version, and go with it, as a version's own counters do; the request
  counters, since the process started, stay.

The first worker also keeps every other worker's latest shadow comparison (``shadows``), which
it adds to its own for the rollout rules, GetRollout and /metrics (core.shadow_sum). Those are
retired the same way: a dead worker's last answered figures stay in the sum while the first
worker's comparison of that model has the same key, so the sum a rule judges never goes back.
What the dead process compared after its last answer (at most one pull period's share) is lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from ferry.server.core.dataplane import (
    ShadowStatistics,
    add_up_shadows,
    add_up_splits,
    merge,
    shadow_from_row,
    sum_request_rows,
)
from ferry.server.core.types import VersionStatistics
from ferry.server.workers import control

log = logging.getLogger(__name__)

SOCKET_GLOB = "worker-*.sock"
CALL_TIMEOUT = 5.0
# A scrape asks every worker twice (statistics, requests): under Prometheus' default 10 s
# scrape timeout even when one worker is stuck.
SCRAPE_CALL_TIMEOUT = 2.0
# A pull of shadow figures holds GetRollout, and a promotion waits for it.
SHADOW_CALL_TIMEOUT = 2.0
MAX_KEPT = 4096  # last answers kept (per socket and question)
MAX_GONE = 256  # processes whose counts the first worker retired, named in its answers


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


# () -> this process's loaded object for a model version, or None: a retired count belongs to
# one load of a version and leaves with it
Served = Callable[[str, int], object | None]


class Peers:
    def __init__(
        self, run_dir: Path, own: Path, served: Served | None = None, *, keeps_retired: bool = True
    ) -> None:
        self.run_dir = run_dir
        self.own = own
        self._keeps_retired = keeps_retired  # the first worker's (module docstring)
        self._served: Served = served or (lambda model, version: None)
        self._aio: dict[Path, aio.Channel] = {}
        self._sync: dict[Path, grpc.Channel] = {}
        # (socket, method, question) -> the last answer's rows: what a worker that does not
        # answer in time adds instead (module docstring)
        self._last: dict[tuple[Path, str, str], Any] = {}
        self._last_lock = threading.Lock()  # the loop and the metrics thread both use it
        # socket -> the process that answered there last, and its latest rows per version
        self._process: dict[Path, str] = {}
        self._latest_stats: dict[Path, dict[tuple[str, int], dict[str, Any]]] = {}
        self._latest_requests: dict[Path, list[Any]] = {}
        # what processes that are gone last reported (module docstring), per load: /metrics
        # tells a load that ended by its name (metrics_carry), so two dead processes' loads of a
        # version are kept apart, not added up under a new name
        self._retired_stats: dict[
            tuple[str, int, str], tuple[VersionStatistics, weakref.ref[Any]]
        ] = {}
        self._retired_requests: dict[tuple[str, int], list[Any]] = {}
        # socket -> that worker's latest shadow comparisons; (model, key) -> what dead
        # workers last answered of that comparison, added up (the first worker's)
        self._latest_shadows: dict[Path, list[ShadowStatistics]] = {}
        self._retired_shadows: dict[tuple[str, str], ShadowStatistics] = {}
        # socket -> that worker's counts of the splits a max_error_rate rules; what dead
        # workers last answered of them, added up (core.split_sum rows; the first worker's)
        self._latest_splits: dict[Path, list[Any]] = {}
        self._retired_splits: list[Any] = []
        # Processes whose last counts are retired (the first worker's): named in its answers,
        # so that another worker stops adding what it last read of one of them itself.
        self._gone: deque[str] = deque(maxlen=MAX_GONE)
        # (socket, method) -> (process, seq) of the answer recorded last: an older one that
        # arrives after it (two scrapes at once) is used for its caller but not recorded
        self._recorded: dict[tuple[Path, str], tuple[str, int]] = {}

    def _answered(self, path: Path, method: str, ask: Any, answer: Any) -> Any:
        """``answer``'s rows recorded (or, for an exception, the last rows; None if none)."""
        key = (path, method, json.dumps(ask, sort_keys=True))
        with self._last_lock:
            if isinstance(answer, BaseException):
                log.debug("worker %s did not answer %s: %s", path.name, method, answer)
                return self._last.get(key)
            process, rows, retired = _unwrap(answer)
            seq = answer.get("seq")
            last = self._recorded.get((path, method))
            if isinstance(seq, int) and last is not None and last[0] == process and seq <= last[1]:
                return rows + retired  # older than what is recorded: this caller's only
            if process is not None and process in self._gone:
                # Answered before it died, read after its counts were retired (a gather waits
                # for the slowest worker): recorded again, they were counted twice.
                return self._last.get(key)
            if process is not None and self._process.get(path, process) != process:
                self._retire(path)  # started again since it last answered
            gone = set(answer.get("gone", ()))
            for other in [p for p, proc in self._process.items() if proc in gone]:
                # The first worker now adds what that (dead) process last reported: this
                # worker's own last read of it would count it twice.
                self._retire(other)
            if process is not None:
                self._process[path] = process
                if isinstance(seq, int):
                    self._recorded[(path, method)] = (process, seq)
            if method == control.STATISTICS:
                self._note_stats(path, ask, rows)
            elif method == control.REQUESTS:
                self._latest_requests[path] = rows
            elif method == control.SHADOWS:
                self._note_shadows(path, rows)
                split = answer.get("split")
                self._latest_splits[path] = list(split) if isinstance(split, list) else []
            kept = rows + retired  # the first worker's answer adds what it keeps of the dead
            self._last.pop(key, None)  # re-inserted last: the oldest question goes first
            self._last[key] = kept
            while len(self._last) > MAX_KEPT:  # questions name models: bounded all the same
                del self._last[next(iter(self._last))]
            return kept

    def _note_stats(self, path: Path, ask: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """The latest row of each version the process at ``path`` serves: what the question
        covered is replaced, so a version it unloaded since is not retired (lock held)."""
        model, version = ask.get("model") or "", ask.get("version")
        latest = self._latest_stats.setdefault(path, {})
        for key in [
            k for k in latest if (not model or k[0] == model) and (not version or k[1] == version)
        ]:
            del latest[key]
        for row in rows:
            latest[(str(row["name"]), int(row["version"]))] = row

    def _retire(self, path: Path) -> None:
        """Keep what the process at ``path`` last reported; its answers go (lock held)."""
        for key in [k for k in self._last if k[0] == path]:
            del self._last[key]
        process = self._process.pop(path, None)
        self._retire_shadows(path)
        if not self._keeps_retired:  # the first worker keeps them, and answers with them
            self._latest_stats.pop(path, None)
            self._latest_requests.pop(path, None)
            return
        for (model, version), row in self._latest_stats.pop(path, {}).items():
            loaded = self._served(model, version)
            if loaded is None:  # not served here: its counts would leave with it anyway
                continue
            old = dataclasses.replace(control.stats_from_json(row), queue_depth=0)
            retired = (model, version, old.load)
            kept = self._retired_stats.get(retired)
            if kept is not None and kept[1]() is loaded:
                (old,) = merge([kept[0], old])
            self._retired_stats[retired] = (old, weakref.ref(loaded))
        dead = self._latest_requests.pop(path, [])
        kept_rows = sum_request_rows([*self._retired_requests.values(), *dead])
        self._retired_requests = {(row[0], row[1]): row for row in kept_rows}
        if process is not None:
            self._gone.append(process)

    def _note_shadows(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """The comparisons the process at ``path`` holds now (lock held). An answer that does
        not read leaves the last one: a sum never drops for it."""
        try:
            self._latest_shadows[path] = [shadow_from_row(row) for row in rows]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("worker %s answered shadow figures that do not read: %s", path.name, exc)

    def _retire_shadows(self, path: Path) -> None:
        """Keep the last comparisons of the process at ``path``, which exited (lock held)."""
        dead = self._latest_shadows.pop(path, [])
        dead_splits = self._latest_splits.pop(path, [])
        if not self._keeps_retired:
            return
        self._retired_splits = add_up_splits([*self._retired_splits, *dead_splits])
        for last in dead:
            stats = dataclasses.replace(last, in_flight=0)  # a dead process runs nothing
            key = (stats.model, stats.key)
            kept = self._retired_shadows.get(key)
            self._retired_shadows[key] = stats if kept is None else add_up_shadows(kept, [stats])

    def shadow_rows(self) -> list[ShadowStatistics]:
        """Every other worker's latest shadow comparisons and the retired ones, as last read:
        no call. Each is replaced, never changed, so the caller may read them unlocked."""
        with self._last_lock:
            live = [s for rows in self._latest_shadows.values() for s in rows]
            return live + list(self._retired_shadows.values())

    def split_rows(self) -> list[Any]:
        """Every other worker's latest split counts and the retired ones, as last read: no
        call."""
        with self._last_lock:
            return [r for rows in self._latest_splits.values() for r in rows] + list(
                self._retired_splits
            )

    def prune_retired_splits(self, current: dict[str, str]) -> None:
        """Drop retired split counts whose key is not ``current``'s (model -> the key of the
        split in force in this first worker): counts of a split replaced never add again."""
        with self._last_lock:
            self._retired_splits = [
                r
                for r in self._retired_splits
                if isinstance(r, list) and len(r) == 3 and current.get(r[0]) == r[1]
            ]

    def prune_retired_shadows(self, current: dict[str, str]) -> None:
        """Drop retired comparisons that are not ``current`` (model -> the key this first
        worker's own comparison has now): a comparison replaced is never summed again."""
        with self._last_lock:
            for model, key in list(self._retired_shadows):
                if current.get(model) != key:
                    del self._retired_shadows[(model, key)]

    async def shadows(self) -> bool:
        """Ask every other worker for its shadow comparisons now (``shadow_rows`` has them).
        False when one did not answer: its figures are as last read, which a promotion must
        not be decided on (workers.shadow_pull)."""
        paths = self.sockets()
        answers = await asyncio.gather(
            *(self.call(p, control.SHADOWS, {}, SHADOW_CALL_TIMEOUT) for p in paths),
            return_exceptions=True,
        )
        for path, answer in zip(paths, answers, strict=True):
            self._answered(path, control.SHADOWS, {}, answer)
        return not any(isinstance(answer, BaseException) for answer in answers)

    def gone(self) -> list[str]:
        """The processes whose last counts this (first) worker keeps as retired."""
        with self._last_lock:
            return list(self._gone)

    def retired_requests(self) -> list[Any]:
        with self._last_lock:
            return [
                [m, v, dict(c), list(b), s] for m, v, c, b, s in self._retired_requests.values()
            ]

    def retired_statistics(
        self, model: str = "", version: int | None = None
    ) -> list[VersionStatistics]:
        """What this (first) worker keeps of dead workers' statistics, for its sums and its
        answers: the versions still loaded as they were, optionally one model's."""
        out = []
        with self._last_lock:
            for key, (stats, loaded) in list(self._retired_stats.items()):
                name, v, _ = key
                if loaded() is None or loaded() is not self._served(name, v):
                    del self._retired_stats[key]  # unloaded or loaded again since
                elif (not model or name == model) and (not version or v == version):
                    out.append(stats)
        return out

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
        return out + self.retired_statistics(model, version)

    def retire(self, path: Path) -> None:
        """The worker at ``path`` exited: what it last reported is kept (retired) from now on,
        not only once a new process answers there. Its socket is unlinked and made anew while
        the new process starts (seconds, with its models loading), and meanwhile the sum lost
        the dead process's counts, so a scrape read a counter reset that then came back."""
        with self._last_lock:
            self._retire(path)

    def forget(self, path: Path) -> None:
        """Drop the cached channels to ``path`` (its worker was started again): the next call
        connects afresh instead of waiting out a backoff from the restart. What the previous
        process reported was retired when it exited (``retire``); the new one counts from
        zero, and what it answered already is its own, not retired again."""
        channel = self._aio.pop(path, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())
        with self._last_lock:
            sync = self._sync.pop(path, None)
        if sync is not None:
            sync.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._aio.values()))
        self._aio.clear()

    # ---- metrics thread ----
    def _sync_call(self, path: Path, method: str, ask: Any) -> grpc.Future:
        # Under the lock: two scrapes at once (threads of the metrics listener) each made a
        # channel to a new socket, and the one not kept was never closed.
        with self._last_lock:
            channel = self._sync.get(path)
            if channel is None:
                channel = self._sync[path] = grpc.insecure_channel(f"unix:{path}")
        rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        return rpc.future(control.encode(ask), timeout=SCRAPE_CALL_TIMEOUT)

    def _gather_sync(self, method: str, ask: Any) -> list[Any]:
        """Every worker asked at once, as the event loop's ``statistics`` does: one after the
        other, each stuck worker (stopped, swapping) added SCRAPE_CALL_TIMEOUT, and with three
        of them a scrape ran past Prometheus' 10 s default, so it got no metrics at all."""
        paths = self.sockets()
        calls = [self._sync_call(path, method, ask) for path in paths]
        out = []
        for path, call in zip(paths, calls, strict=True):
            try:
                answer: Any = control.decode(call.result())
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
        ] + self.retired_statistics()

    def requests_sync(self) -> list[Any]:
        rows = [row for answer in self._gather_sync(control.REQUESTS, {}) for row in answer]
        return rows + self.retired_requests()

    def close_sync(self) -> None:
        for channel in self._sync.values():
            channel.close()
        self._sync.clear()


def _unwrap(answer: dict[str, Any]) -> tuple[str | None, list[Any], list[Any]]:
    """(process, rows, retired rows) of a control answer (control.ControlService)."""
    process = str(answer.get("process", "")) or None
    return process, list(answer.get("rows", ())), list(answer.get("retired", ()))
