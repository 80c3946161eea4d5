"""``ferry serve --workers N``: the first process starts N-1 more inference workers and keeps them.

Each worker is a whole serving process (its own event loop, batchers and onnxruntime sessions)
started by exec, so no gRPC state crosses a fork. All of them listen on the same inference ports
with SO_REUSEPORT: the kernel spreads connections over them. The first process (this one) also
owns the management listeners, conversion and metrics; what changes the repository there is
applied by every worker before the management call returns (``follow``). A worker that dies is
started again (with backoff) while the others serve; on SIGTERM all of them drain together.

Why the first process serves too, instead of a supervisor that serves nothing: the management
path needs a full core anyway (publish opens the model before it becomes visible; load reports
what loaded), so the one that answers management is the reference the others follow, and N
workers cost N processes, not N+1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import select
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from ferry.server.settings import Settings
from ferry.server.workers import control, judging
from ferry.server.workers.peers import Peers, socket_path

log = logging.getLogger(__name__)

# Seconds a worker may take to load its models before it counts as failed, plus, for each
# worker, what the first process's own start-up load took (WorkerFleet.ready_within).
READY_TIMEOUT = 300.0
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_AFTER = 60.0  # a worker that lived this long starts the backoff afresh when it dies
APPLY_TIMEOUT = 600.0  # seconds a worker may take to apply one change (a large model's load)
# What a management call waits on one joined worker to apply its change (WorkerFleet.
# follow_within): this, plus twice what the first process's own start-up load (or its longest
# load of one version since) took, at most APPLY_TIMEOUT: the worker loads the same files on
# the same cores.
FOLLOW_FLOOR = 60.0
# The least time between two refreshes the fleet asks for itself (_refresh_soon).
REFRESH_GAP = 5.0
# Catch-ups a starting worker makes outside the lock before its last, under it (_settle).
CATCH_UP_ROUNDS = 3
CHECK_EVERY = 5.0  # seconds between liveness checks, at most (--worker-timeout / 3 below it)
MISSES = 3  # liveness checks in a row a worker must fail, besides being silent for the timeout
ENV_SOCKET = "FERRY_WORKER_SOCKET"
ENV_PARENT = "FERRY_WORKER_PARENT"
# The models an explicit unload took out: a worker started again does not load them. The path
# of a JSON list in the run folder, not the list: one environment string holds at most 128 KiB
# (Linux's MAX_ARG_STRLEN), and with some 1,000 long names unloaded the exec of every worker
# started again failed (E2BIG), so the fleet ran a worker short for good.
ENV_UNLOADED = "FERRY_WORKER_UNLOADED_FILE"


class WorkerStartError(RuntimeError):
    """A worker exited, or was not ready in time, while it started: at the fleet's start this
    ends ``ferry serve`` with that one line (and what did start is stopped); later, the worker
    is started again."""


def worker_flags(settings: Settings, *, port: int, http_port: int) -> list[str]:
    """The first process's settings as flags, with what a worker does differently: the ports
    already bound (so that port 0 resolves once), and no management, conversion or metrics."""
    overrides = {
        "port": port,
        "http_port": http_port,
        "management_port": -1,
        "management_http_port": -1,
        "metrics_port": -1,
        "create_repository": False,
    }
    flags: list[str] = []
    for f in fields(Settings):
        if not f.metadata.get("flag", True):
            continue  # secrets travel in the environment, which workers inherit
        value = overrides.get(f.name, getattr(settings, f.name))
        name = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + name[2:])
        else:
            flags += [name, str(value)]
    return flags


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        # When it joined the inference ports (None: not since it was started): only a worker
        # that served HEALTHY_AFTER starts the backoff afresh when it dies.
        self.joined_at: float | None = None
        self.failures = 0
        # Why its last start failed ("" if it did not): said once, in the line that starts it
        # again, rather than again as the exit of the process the fleet killed for it.
        self.start_error = ""
        self.start_took = 0.0  # seconds that failed start took
        # Its control socket answered since it was (re)started: from then on it is expected to
        # answer the liveness check (before, ready_within bounds its start-up load).
        self.answering = False
        # JOIN answered yes since it was (re)started: changes are followed there from then on;
        # before, its catch-up brings it to them (WorkerFleet._settle).
        self.joined = False


class WorkerFleet:
    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        count: int,
        peers: Peers,
        unloaded: Callable[[], list[str]],
        *,
        ready: Callable[[], bool] = lambda: True,
        load_seconds: float = 0.0,
        longest_load: Callable[[], float] = lambda: 0.0,
        refresh: Callable[[], Awaitable[object]] | None = None,
        serving: Callable[[str], dict[str, list[int]]] | None = None,
        earlier: Callable[[str], dict[str, list[int]]] = lambda model: {},
        files: Callable[[str], dict[str, dict[str, Any]]] = lambda model: {},
        failed: Callable[[], list[Any]] = list,
        kept: Callable[[], list[Any]] = list,
        rollouts: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.count = count
        self.peers = peers
        self._unloaded = unloaded  # the explicit unloads now: a (re)started worker repeats them
        # Is this (first) process ready? A worker is not asked to be more ready than the one
        # it follows: with every model unloaded on request, neither is, and waiting for it
        # killed and restarted the worker every READY_TIMEOUT.
        self._self_ready = ready
        # Brings this process, and every worker through ``follow``, to the repository's state
        # (an explicit refresh): run before a dead worker is started again, which loads that
        # state from the folder.
        self._refresh = refresh
        # model ("": every one) -> the versions this process serves (control.serving): after
        # a change, a worker must serve at least those (follow).
        self._serving = serving
        # model -> the versions of those this process serves from an earlier load, its reload
        # having failed (control.earlier): a worker must serve the others from their files
        # now, not from its own earlier load (follow).
        self._earlier = earlier
        # model -> version -> the signature of the files this process loaded it from
        # (control.files): a worker that loaded other files serves other weights (follow,
        # JOIN).
        self._files = files
        # The versions whose load failed in this process (Registry.failed_loads), sent with
        # every change and JOIN: a worker fails them too, so that no version is served by
        # some processes and refused by others (its load succeeded where the first's did not).
        self._failed = failed
        # The versions this process keeps serving past its version policy (a newer one did
        # not load): a worker started again serves them too, or it lacks them for good.
        self._kept = kept
        # The rollouts this process serves in place of their files (a broken edit): a worker
        # started again has no earlier one to keep, and serves them too (JOIN).
        self._rollouts = rollouts
        self._workers = [_Worker(i) for i in range(1, count)]
        self._flags: list[str] = []
        self._stopping = False
        self._signalled: list[asyncio.subprocess.Process] = []  # signal_stop's
        self._monitors: list[asyncio.Task[None]] = []
        self._refreshing: asyncio.Task[None] | None = None  # _refresh_soon's
        self._refreshed_at = -math.inf  # monotonic: when _refresh_soon's last refresh began
        self._changes = asyncio.Lock()  # follow() and a started worker's JOIN, one at a time
        self._changed = 0  # follow() calls that took the lock: a catch-up meanwhile is redone
        # model ("": every one) -> follow() calls for it not yet done: this process changed it,
        # and a worker joining now has not been told yet.
        self._pending: Counter[str] = Counter()
        # Workers that exited and were started again: their counters start from zero, and the
        # sums keep what the dead process last reported (peers.retire); /metrics counts them.
        self.restarts = 0
        self._clock = time.monotonic  # the liveness check's and start-up's (a test's own)
        self.load_seconds = load_seconds
        # The longest open of one version this process made so far (the change being followed
        # included: this process applies it first): a model loaded after the start may take
        # far longer than the start-up load did (follow_within).
        self._longest_load = longest_load

    @property
    def ready_within(self) -> float:
        """How long a worker may take to start: READY_TIMEOUT, plus the first process's own
        start-up load once for each process loading beside it (they share the cores and the
        disk). With a fixed 300 s, a repository that took the first process longer than that
        to load could never start a worker: each was killed at 300 s and started again, a full
        load every time, for ever. A worker binds the inference ports only once loaded, so a
        slow one takes no traffic meanwhile."""
        return READY_TIMEOUT + self.count * self.load_seconds

    @property
    def follow_within(self) -> float:
        """How long a management call waits on one joined worker to apply its change (and on
        a starting worker's catch-up held under the changes' lock): a worker stuck in a load
        (a hung read of a network mount, say, in a thread: its loop still answers the
        liveness check) or stopped with --worker-timeout 0 held every management call for
        APPLY_TIMEOUT. Past it the worker is killed and started again, and its catch-up,
        which no management call waits on, brings it to the repository's state."""
        slowest = max(self.load_seconds, self._longest_load())
        return min(APPLY_TIMEOUT, FOLLOW_FLOOR + 2 * slowest)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc is not None]

    async def start(self, port: int, http_port: int) -> None:
        """Start every worker and wait until each is ready (its models loaded)."""
        self._flags = worker_flags(self.settings, port=port, http_port=http_port)
        await asyncio.gather(*(self._spawn(w) for w in self._workers))
        self._monitors = [asyncio.create_task(self._watch(w)) for w in self._workers]
        if self.settings.worker_timeout > 0:
            self._monitors += [asyncio.create_task(self._check(w)) for w in self._workers]

    async def _spawn(self, worker: _Worker) -> None:
        sock = socket_path(self.run_dir, worker.index)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        unloaded = self._unloaded()
        worker.answering = worker.joined = False
        worker.joined_at = None
        listed = self.run_dir / f"worker-{worker.index}.unloaded.json"
        await asyncio.to_thread(listed.write_text, json.dumps(unloaded), "utf-8")
        env = {
            **os.environ,
            ENV_SOCKET: str(sock),
            ENV_PARENT: str(os.getpid()),
            ENV_UNLOADED: str(listed),
        }
        worker.started = self._clock()
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ferry.server", *self._flags, env=env
        )
        await self._wait_ready(worker, sock)
        worker.answering = True
        await self._settle(worker, sock, unloaded)
        log.info("worker %d ready (pid %d)", worker.index, worker.proc.pid)

    async def _settle(self, worker: _Worker, sock: Path, unloaded: list[str]) -> None:
        """Catch up, then JOIN once no change was followed meanwhile.

        Caught up once it answers: a change made while it started (after it read the
        repository, before its control socket listened) reached only the workers already
        listening, and was lost for this one. The catch-up runs outside the lock that
        ``follow`` takes, which skips a worker that has not joined: under it, every management
        call waited for the catch-up's loads, up to APPLY_TIMEOUT for a worker stuck there
        (with --worker-timeout 0 nothing kills it, and a slow load answers the liveness check
        anyway). A change followed meanwhile (``_changed``) may have missed this worker's
        re-read, so it catches up again; only JOIN, which is quick, runs under the lock, and a
        change after it reaches the worker through ``follow``. After CATCH_UP_ROUNDS changed
        under it, the last round runs under the lock, as every round did before: a poll every
        half second cannot keep a worker off the ports for good."""
        refused: str | None = None
        for round_ in range(CATCH_UP_ROUNDS + 1):
            last = round_ == CATCH_UP_ROUNDS
            seen = self._changed
            if not last:
                unloaded = await self._catch_up(worker, sock, unloaded)
            async with self._changes:
                if last:
                    unloaded = await self._catch_up(worker, sock, unloaded, held=True)
                elif self._changed != seen:
                    continue  # a change was followed while it caught up: again
                # It binds the inference ports only if it serves what this process serves:
                # its own load can fail (out of memory in that process, a file it could not
                # read), and it joined without the model, so 1 connection in N was refused it.
                # Not joined, it ends the fleet's start, or is killed and started again with
                # backoff (_watch). A model whose change this process made and has yet to
                # follow is left to that follow's own check: the worker has not been told yet.
                lacks = await self._join(worker, sock)
                # Under the lock: a change followed once it is released reaches this worker.
                worker.joined = lacks is None
                if worker.joined:
                    worker.joined_at = self._clock()
            if lacks is None:
                return
            if refused is not None or last:
                break
            # Refused once, it re-reads the repository and is asked again: a version this
            # process's own refresh (a poll, say) loaded after the worker's catch-up read the
            # folder is not a failure of the worker's, and each such race cost a restart and
            # its backoff. A load of its own that failed is tried once more in that process.
            refused = lacks
        raise WorkerStartError(
            f"worker {worker.index} does not serve {lacks}, which the first process serves"
        )

    async def _catch_up(
        self, worker: _Worker, sock: Path, unloaded: list[str], *, held: bool = False
    ) -> list[str]:
        """The repository re-read, then the explicit loads and unloads made since ``unloaded``;
        returns the unloads it now has. A worker that dies or stops answering meanwhile is a
        WorkerStartError, as one that dies before it is ready: it was an RpcError, which
        ended ``ferry serve`` at the fleet's start with a traceback instead of the one line
        that names the worker."""
        # Under the changes' lock (``held``) every management call waits for it: bounded as
        # a change a joined worker follows is, all of it together.
        deadline = self._clock() + (self.follow_within if held else math.inf)

        def within(seconds: float) -> float:
            return max(0.001, min(seconds, deadline - self._clock()))

        try:
            await self.peers.call(
                sock, control.APPLY, self._ask("refresh", ""), within(APPLY_TIMEOUT)
            )
            # It started without the models unloaded on request then (ENV_UNLOADED), which
            # its refresh keeps out: one loaded again since is loaded, one unloaded since goes.
            now = set(self._unloaded())
            for name in sorted(set(unloaded) - now):
                await self.peers.call(
                    sock, control.APPLY, self._ask("load", name), within(APPLY_TIMEOUT)
                )
            for name in sorted(now - set(unloaded)):
                await self.peers.call(sock, control.APPLY, self._ask("unload", name), within(60.0))
            return sorted(now)
        except grpc.RpcError as exc:
            raise WorkerStartError(
                f"worker {worker.index} did not catch up with the repository: {exc.code().name}"
            ) from None

    async def _join(self, worker: _Worker, sock: Path) -> str | None:
        """JOIN, with what this process serves (lock held): None once joined, else what the
        worker lacks."""
        mine: dict[str, list[int]] = {}
        if self._serving is not None and "" not in self._pending:
            mine = {n: v for n, v in self._serving("").items() if n not in self._pending}
        try:
            ask = {
                "serving": mine,
                "failed": self._failed(),
                "kept": self._kept(),
                "files": self._files(""),
                "rollouts": self._rollouts(),
            }
            answer = await self.peers.call(sock, control.JOIN, ask, 60.0)
        except grpc.RpcError as exc:
            raise WorkerStartError(
                f"worker {worker.index} did not join the inference ports: {exc.code().name}"
            ) from None
        return None if answer.get("joined") else str(answer.get("lacks"))

    async def _wait_ready(self, worker: _Worker, sock: Path) -> None:
        within = self.ready_within
        deadline = self._clock() + within
        assert worker.proc is not None
        while self._clock() < deadline:
            if worker.proc.returncode is not None:
                raise WorkerStartError(
                    f"worker {worker.index} exited with {worker.proc.returncode} while starting"
                )
            answer = await _ready(sock)
            if answer is not None and (answer or not self._self_ready()):
                self.peers.forget(sock)  # a channel made while it restarted may be backing off
                return
            await asyncio.sleep(0.05)
        raise WorkerStartError(
            f"worker {worker.index} was not ready within {within:.0f} s ({READY_TIMEOUT:.0f} s "
            f"and {self.count} x the {self.load_seconds:.0f} s the first process took to load)"
        )

    async def _watch(self, worker: _Worker) -> None:
        """Start a dead worker again, with backoff, until the fleet stops."""
        while not self._stopping:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self._stopping:
                return
            # Its counts stay in every sum from now on, while it starts again (peers.retire).
            sock = socket_path(self.run_dir, worker.index)
            self.peers.retire(sock)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()  # no change is sent to it until it listens again
            # Served on the ports for HEALTHY_AFTER: not a start that failed. Counted from its
            # start, a start that took longer than that to fail (a large repository loaded,
            # then refused JOIN: a reload failed in the first process) reset the backoff to
            # 0.5 s, and the fleet reloaded the whole repository back to back, for good.
            joined_at = worker.joined_at
            served = self._clock() - joined_at if joined_at is not None else 0.0
            self.restarts += 1
            worker.failures = 0 if served > HEALTHY_AFTER else worker.failures + 1
            delay = BACKOFF[min(worker.failures, len(BACKOFF) - 1)]
            why, worker.start_error = worker.start_error, ""
            if why:
                # At least as long as the failed start took: a repository that loads for two
                # minutes and is then refused JOIN (files broken until someone fixes them)
                # was loaded again after 30 s, a process loading nearly all the time beside
                # the ones serving. Starts take at most half the time this way.
                delay = max(delay, worker.start_took)
            if why:  # one line an attempt: the kill that followed is the fleet's own
                log.error(
                    "worker %d did not start again: %s; trying again in %.1f s (failure %d "
                    "in a row)",
                    worker.index,
                    why,
                    delay,
                    worker.failures,
                )
            else:
                log.error(
                    "worker %d (pid %d) exited with %s; starting it again in %.1f s",
                    worker.index,
                    worker.proc.pid,
                    code,
                    delay,
                )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._converge(worker)
            if self._stopping:
                return
            began = self._clock()
            try:
                await self._spawn(worker)
            except Exception as exc:
                worker.start_error = str(exc) or type(exc).__name__
                worker.start_took = self._clock() - began
                if worker.proc is not None and worker.proc.returncode is None:
                    worker.proc.kill()

    async def _converge(self, worker: _Worker) -> None:
        """Refresh every process before ``worker`` starts again. It loads what the folder says
        now, and the others serve what it said at the last refresh: a version published by hand
        since (with no --poll-interval) was served by the worker started again alone, so
        requests that name no version got either version depending on their connection. A
        failed refresh is logged and the worker starts all the same."""
        if self._refresh is None:
            return
        try:
            await self._refresh()
        except Exception as exc:
            log.error("refresh before worker %d starts again failed: %s", worker.index, exc)

    async def _check(self, worker: _Worker) -> None:
        """Kill a worker that stops answering its control socket for ``--worker-timeout``
        seconds (gunicorn's worker timeout; a Kubernetes liveness probe sees only the pod, and
        through the shared port it reaches a stuck worker once in N tries). Stopped (SIGSTOP),
        deadlocked or spinning in native code, it kept its share of new connections waiting
        and every management call waiting up to APPLY_TIMEOUT. Its event loop answers while
        it loads a model (loads run in threads), so a slow load is not taken for a hang.
        ``_watch`` starts it again, and its catch-up brings it to the repository's state."""
        timeout = self.settings.worker_timeout
        every = min(CHECK_EVERY, timeout / 3)
        sock = socket_path(self.run_dir, worker.index)
        answered: tuple[int, float] | None = None  # (pid, when it last answered)
        missed = 0
        while not self._stopping:
            await asyncio.sleep(every)
            proc = worker.proc
            if proc is None or proc.returncode is not None or not worker.answering:
                answered, missed = None, 0
                continue
            if answered is None or answered[0] != proc.pid:
                answered, missed = (proc.pid, self._clock()), 0
            try:
                await self.peers.call(sock, control.READY, {}, every)
            except grpc.RpcError:
                # Silent for the timeout, over several checks in a row: one check that failed
                # because this process's own loop was held up is not the worker's silence.
                missed += 1
                silent = self._clock() - answered[1]
                if (
                    missed >= MISSES
                    and silent >= timeout
                    and proc.returncode is None
                    and not self._stopping
                ):
                    self._kill(worker, f"did not answer for {silent:.0f} s (--worker-timeout)")
                continue
            answered, missed = (proc.pid, self._clock()), 0

    def _kill(self, worker: _Worker, why: str) -> None:
        """SIGKILL a worker that cannot be trusted to serve the repository's state; its
        monitor (``_watch``) starts it again from that state."""
        proc = worker.proc
        if proc is None or proc.returncode is not None:
            return
        log.error("worker %d (pid %d) %s: killed, to be started again", worker.index, proc.pid, why)
        worker.answering = False
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    async def follow(self, op: str, model: str) -> None:
        """Apply a repository change on every other worker; returns when all have, or when a
        worker that did not was killed (it starts again from the repository's state). Not
        applied: the call failed, or the worker answered but does not serve a version this
        process serves after the change (its own load failed: out of memory, a file it could
        not read), so 1 connection in N was refused a model the management call loaded."""
        # Now, before any await: this process's state right after the change it follows.
        ask = self._ask(op, model)
        mine = self._serving(model) if self._serving is not None else None
        earlier = self._earlier(model)
        files = self._files(model)
        self._pending[model] += 1  # a worker joining meanwhile is not judged on it (_spawn)
        try:
            async with self._changes:
                # Not a worker still starting (not joined yet): before its first readiness
                # answer the liveness check does not watch it, and after it its catch-up may
                # hang on a load, so one stopped or stuck there held the change, and the
                # management call, for APPLY_TIMEOUT. Told of this change, it catches up
                # again before it joins (_settle).
                self._changed += 1
                paths = [p for p in self.peers.sockets() if self._starting(p) is None]
                asked = {p: self._worker_at(p) for p in paths}
                within = self.follow_within
                answers = await asyncio.gather(
                    *(self.peers.call(p, control.APPLY, ask, within) for p in paths),
                    return_exceptions=True,
                )
        finally:
            self._pending[model] -= 1
            if not self._pending[model]:
                del self._pending[model]
        # Judged on what this process served then and serves still: a version it dropped
        # meanwhile (a LoadModel that replaced it while the workers applied a poll) is no
        # worker's failure, and killing one for lacking it dropped its in-flight requests.
        mine = judging.still(mine, self._serving(model) if self._serving is not None else None)
        # Served from the files on disk here, then and now: a worker that serves one of them
        # from its earlier load (its own reload failed) answers with other weights.
        fresh = judging.without(judging.without(mine, earlier), self._earlier(model))
        # The files of each, loaded here before the change was sent and not reloaded since: a
        # worker's other files are not a newer change of this process's still on its way.
        same = judging.same_files(files, self._files(model))
        # Served here from an earlier load, then and now (this process's reload failed).
        behind = judging.still(earlier, self._earlier(model))
        for path, answer in zip(paths, answers, strict=True):
            why: object = answer
            if isinstance(answer, aio.AioRpcError):
                why = (
                    f"no answer within {within:.0f} s (stuck in a load, or stopped)"
                    if answer.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                    else f"{answer.code().name}: {answer.details()}"
                )
            if not isinstance(answer, BaseException):
                lacks = judging.lacks(mine, answer, fresh)
                other = judging.other_files(answer, fresh, same) if not lacks else ""
                if not lacks and not other:
                    # Its reload read files that this process's could not (half copied then):
                    # this process, behind the folder, tries them again.
                    other = judging.newer_files(answer, behind, same)
                if not lacks and not other:
                    # Likewise a version that failed to load here: the worker serves it alone.
                    now = self._serving(model) if self._serving is not None else None
                    other = judging.loaded_what_failed(now, answer, self._failed())
                if other:
                    # It serves every version, some from files that changed on disk after this
                    # process loaded them: this process is the one behind the folder. A refresh
                    # brings it (and every worker) to the files there, with no worker killed
                    # and its in-flight requests dropped for a poll that raced a copy.
                    log.warning(
                        "worker %s serves %s; refreshing this process to the files on disk",
                        path.name,
                        other,
                    )
                    self._refresh_soon()
                if not lacks:
                    continue
                why = f"it does not serve {lacks}: {answer.get('message') or 'no reason given'}"
            log.warning("worker %s did not apply %s %s: %s", path.name, op, model, why)
            worker, pid = asked[path]
            # Still the process that was asked, alive, and past its start: it serves what the
            # repository no longer says (a version unloaded, a model not loaded) until told.
            if (
                worker is not None
                and worker.proc is not None
                and worker.proc.pid == pid
                and worker.answering
                and not self._stopping
            ):
                self._kill(worker, f"did not apply {op} {model or 'of the repository'}")

    def _refresh_soon(self) -> None:
        """Refresh this process (and, through ``follow``, every worker) once more, after the
        change being followed: not inside it, which holds the refresh lock. One at a time: a
        refresh asked for while one is pending adds nothing. At most one per REFRESH_GAP: a
        file that keeps changing (a copy still running, a log written into a version folder)
        made every such refresh's own follow find other files again, and the fleet reloaded
        the version back to back for as long as the file changed, where one process reloads
        it once a poll."""
        if self._refresh is None or self._refreshing is not None or self._stopping:
            return
        refresh = self._refresh
        wait = self._refreshed_at + REFRESH_GAP - time.monotonic()

        async def run() -> None:
            try:
                if wait > 0:
                    await asyncio.sleep(wait)  # spacing refreshes, not synchronising
                self._refreshed_at = time.monotonic()
                await refresh()
            except Exception as exc:
                log.error("refresh to the files on disk failed: %s", exc)
            finally:
                self._refreshing = None

        self._refreshing = asyncio.get_running_loop().create_task(run())

    def _ask(self, op: str, model: str) -> dict[str, Any]:
        """A change for a worker to apply, with what failed to load and what is kept serving
        here now."""
        return {"op": op, "model": model, "failed": self._failed(), "kept": self._kept()}

    def _starting(self, path: Path) -> _Worker | None:
        """The worker at ``path`` if it has yet to join since it was (re)started."""
        worker, _ = self._worker_at(path)
        return worker if worker is not None and not worker.joined else None

    def _worker_at(self, path: Path) -> tuple[_Worker | None, int]:
        for w in self._workers:
            if socket_path(self.run_dir, w.index) == path and w.proc is not None:
                return w, w.proc.pid
        return None, 0

    def signal_stop(self) -> list[asyncio.subprocess.Process]:
        """SIGTERM every worker now (once): each says NOT_SERVING at once and drains. Sent as
        soon as the first process stops, not after its stop hooks (a conversion's shutdown):
        a probe or a load balancer's health check lands on any worker of the shared port, and
        the workers said SERVING until then."""
        if not self._stopping:
            self._stopping = True
            for task in [*self._monitors, *([self._refreshing] if self._refreshing else [])]:
                task.cancel()
            self._signalled = [
                w.proc for w in self._workers if w.proc and w.proc.returncode is None
            ]
            with contextlib.suppress(OSError):  # they leave the run folder to this process
                (self.run_dir / STOPPING).touch()
            for proc in self._signalled:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        return self._signalled

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each drains within ``grace``), then kill what is left."""
        running = self.signal_stop()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(p.wait() for p in running)), timeout=grace + 5.0
            )
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    log.warning("worker pid %d did not stop in time: killed", proc.pid)
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in running))
        await self.peers.close()


async def _ready(sock: Path) -> bool | None:
    """One readiness probe on a fresh channel: a cached one that failed while the worker was
    starting would wait out gRPC's reconnect backoff (seconds) before trying again. None: no
    answer yet (a worker listens there once its start-up load is done)."""
    if not await asyncio.to_thread(os.path.exists, sock):
        return None
    async with aio.insecure_channel(f"unix:{sock}") as channel:
        probe: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(control.READY)
        try:
            raw = await probe(control.encode({}), timeout=2.0)
        except grpc.RpcError:
            return None
    return bool(control.decode(raw).get("ready"))


def unloaded_by_parent() -> list[str]:
    """In a worker: the models the first process had unloaded on request when it started it
    (the list in the file ENV_UNLOADED names)."""
    path = os.environ.get(ENV_UNLOADED)
    if not path:
        return []
    try:
        names = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


STOPPING = "stopping"  # in the run folder: the first process is stopping its workers itself
PARENT_EXIT_WAIT = 2.0  # seconds a worker stopped by someone else waits to see the first go


def parent_gone(run_dir: Path) -> bool:
    """In a worker that is stopping: did the first process that started it die (SIGKILL: it
    removed nothing, so the worker removes the run folder)? Not when the first process is
    stopping it (``STOPPING``). Otherwise it is told of that death (PR_SET_PDEATHSIG) when the
    thread that started it exits, possibly before the whole process has: wait for that, a
    moment; a worker an operator stopped alone is started again by a first process that stays."""
    parent = os.environ.get(ENV_PARENT)
    if not parent or (run_dir / STOPPING).exists():
        return False
    if os.getppid() != int(parent):
        return True
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:  # not Linux: no death signal either (die_with_parent)
        return False
    try:
        pidfd = pidfd_open(int(parent))
    except OSError:  # gone already
        return True
    try:
        # poll, not select: select refuses a descriptor above 1,023, which a server whose
        # open-file limit was raised (open_files) hands out once it holds many connections.
        waiter = select.poll()
        waiter.register(pidfd, select.POLLIN)
        readable = waiter.poll(PARENT_EXIT_WAIT * 1000)
    finally:
        os.close(pidfd)
    return bool(readable)


def die_with_parent() -> None:
    """A worker goes when the first process goes, even if it was SIGKILLed (Linux)."""
    parent = os.environ.get(ENV_PARENT)
    if not parent:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
