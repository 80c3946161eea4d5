"""The first process's liveness check of its workers (``WorkerFleet._check``) and what a change
that a worker did not apply does to it (``WorkerFleet.follow``), with the processes and control
sockets replaced by stand-ins so that silence and answers are the test's to choose."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from ferry.server.settings import Settings
from ferry.server.workers import control
from ferry.server.workers import fleet as fleet_module
from ferry.server.workers.fleet import WorkerFleet


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.killed = asyncio.Event()

    def kill(self) -> None:
        self.returncode = -9
        self.killed.set()


class _Silent(grpc.RpcError):
    pass


class _Peers:
    """Answers READY while ``answers`` lasts (None: forever), then stays silent; APPLY as told."""

    def __init__(self, tmp: Path, answers: int | None = None, apply_fails: bool = False) -> None:
        self.tmp = tmp
        self.answers = answers
        self.apply_fails = apply_fails
        self.pings = 0
        self.enough = asyncio.Event()

    async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
        if method == control.READY:
            self.pings += 1
            if self.pings >= 20:
                self.enough.set()
            if self.answers is None or self.pings <= self.answers:
                return {"ready": True}
            raise _Silent()
        if self.apply_fails:
            raise _Silent()
        return {"ok": True}

    def sockets(self) -> list[Path]:
        return [self.tmp / "worker-1.sock"]

    def forget(self, path: Path) -> None:
        pass


def _fleet(tmp_path: Path, peers: _Peers, timeout: float) -> tuple[WorkerFleet, _Proc]:
    fleet = WorkerFleet(Settings(worker_timeout=timeout), tmp_path, 2, peers, list)  # type: ignore[arg-type]
    proc = _Proc(1234)
    (worker,) = fleet._workers
    worker.proc = proc  # type: ignore[assignment]
    worker.answering = worker.joined = True  # on the ports: changes are followed there
    return fleet, proc


def test_a_worker_silent_for_the_timeout_is_killed(tmp_path: Path) -> None:
    async def run() -> None:
        peers = _Peers(tmp_path, answers=3)
        fleet, proc = _fleet(tmp_path, peers, 0.06)
        check = asyncio.create_task(fleet._check(fleet._workers[0]))
        await asyncio.wait_for(proc.killed.wait(), 10)
        assert peers.pings > 3  # it answered, then fell silent
        assert not fleet._workers[0].answering
        check.cancel()

    asyncio.run(run())


def test_a_worker_that_answers_is_never_killed(tmp_path: Path) -> None:
    async def run() -> None:
        peers = _Peers(tmp_path)
        fleet, proc = _fleet(tmp_path, peers, 0.03)
        check = asyncio.create_task(fleet._check(fleet._workers[0]))
        await asyncio.wait_for(peers.enough.wait(), 10)  # 20 checks, each answered
        assert not proc.killed.is_set()
        check.cancel()

    asyncio.run(run())


def test_a_worker_still_starting_is_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before its control socket first answers, READY_TIMEOUT bounds its start-up load: a
    large repository takes longer than --worker-timeout to load."""
    yielding = asyncio.sleep
    periods = 0
    done = asyncio.Event()

    async def period(seconds: float) -> None:  # the check's period, counted instead of waited
        nonlocal periods
        periods += 1
        if periods >= 50:
            done.set()
        await yielding(0)

    async def run() -> None:
        peers = _Peers(tmp_path, answers=0)
        fleet, proc = _fleet(tmp_path, peers, 0.03)
        fleet._workers[0].answering = False
        monkeypatch.setattr(fleet_module.asyncio, "sleep", period)
        check = asyncio.create_task(fleet._check(fleet._workers[0]))
        await asyncio.wait_for(done.wait(), 10)
        assert peers.pings == 0 and not proc.killed.is_set()
        check.cancel()

    asyncio.run(run())


@pytest.mark.parametrize("fails", [True, False])
def test_a_worker_that_does_not_apply_a_change_is_started_again(
    tmp_path: Path, fails: bool
) -> None:
    """Alive but without the change, it would serve what the repository no longer says (a
    model unloaded, an old default) until told again; started again, it reads the repository."""

    async def run() -> None:
        peers = _Peers(tmp_path, apply_fails=fails)
        fleet, proc = _fleet(tmp_path, peers, 30.0)
        await fleet.follow("unload", "seed")
        assert proc.killed.is_set() == fails

    asyncio.run(run())


@pytest.mark.parametrize(
    ("theirs", "killed"),
    [({}, True), ({"big": [2]}, True), ({"big": [1]}, False), ({"big": [1, 2]}, False)],
)
def test_a_worker_whose_own_load_failed_is_started_again(
    tmp_path: Path, theirs: dict[str, list[int]], killed: bool
) -> None:
    """The worker answered the load OK, but its own load failed (out of memory there, say): it
    served 1 connection in N without the model the management call loaded. Started again, it
    loads it from the repository; one that serves this process's versions is left alone."""

    class _Failed(_Peers):
        async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
            # "ok" either way: what it serves decides, not what it says
            return {"ok": True, "serving": theirs}

    async def run() -> None:
        peers = _Failed(tmp_path)
        fleet, proc = _fleet(tmp_path, peers, 30.0)
        fleet._serving = lambda model: {"big": [1]}
        await fleet.follow("load", "big")
        assert proc.killed.is_set() == killed

    asyncio.run(run())


@pytest.mark.parametrize(
    ("mine", "killed"), [({}, True), ({"big": [1]}, False)], ids=["fresh here", "earlier here"]
)
def test_a_worker_whose_own_reload_failed_is_started_again_unless_the_first_s_did_too(
    tmp_path: Path, mine: dict[str, list[int]], killed: bool
) -> None:
    """A worker whose reload of big version 1 failed serves its earlier load: the version is
    served, with the old weights, while this process serves the new ones. Counted as serving
    it, the worker answered 1 connection in N with the old weights. When this process serves
    its earlier load too (its reload failed as well), the two agree: nothing is killed."""

    class _Earlier(_Peers):
        async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
            return {"ok": True, "serving": {"big": [1]}, "earlier": {"big": [1]}}

    async def run() -> None:
        fleet, proc = _fleet(tmp_path, _Earlier(tmp_path), 30.0)
        fleet._serving = lambda model: {"big": [1]}
        fleet._earlier = lambda model: mine
        await fleet.follow("load", "big")
        assert proc.killed.is_set() == killed

    asyncio.run(run())


@pytest.mark.parametrize(
    ("theirs", "reloaded_here", "refreshed"),
    [("b", False, True), ("a", False, False), ("b", True, False)],
    ids=["other files", "the same files", "reloaded here meanwhile"],
)
def test_a_worker_that_loaded_other_files_than_this_process_brings_a_refresh(
    tmp_path: Path, theirs: str, reloaded_here: bool, refreshed: bool
) -> None:
    """Both serve big version 1, from files that changed on disk between the two loads: the
    version numbers agreed, and the two answered with other weights. This process, behind the
    folder, refreshes (and every worker with it), once; no worker is killed for it. Not when
    this process reloaded meanwhile: a newer change of its own, whose follow judges next."""
    files = [{"big": {"1": "a"}}]
    refreshes: list[int] = []

    class _Files(_Peers):
        async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
            if reloaded_here:
                files[0] = {"big": {"1": "c"}}
            return {"ok": True, "serving": {"big": [1]}, "files": {"big": {"1": theirs}}}

    async def run() -> None:
        fleet, proc = _fleet(tmp_path, _Files(tmp_path), 30.0)

        async def refresh() -> None:
            refreshes.append(1)
            await fleet.follow("refresh", "")  # judged again: no second refresh from it

        fleet._refresh = refresh
        fleet._serving = lambda model: {"big": [1]}
        fleet._files = lambda model: files[0]
        await fleet.follow("load", "big")
        if fleet._refreshing is not None:
            await fleet._refreshing
        assert not proc.killed.is_set()
        assert fleet._refreshing is None

    asyncio.run(run())
    assert refreshes == ([1] if refreshed else [])


def test_the_refreshes_the_fleet_asks_for_itself_are_spaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that keeps changing (a copy still running, a log written into a version folder)
    had every refresh's own follow find other files again, and the fleet reloaded the version
    back to back for as long as it changed; one process reloads it once a poll. A second
    refresh waits for REFRESH_GAP after the first began."""
    monkeypatch.setattr(fleet_module, "REFRESH_GAP", 3600.0)
    refreshes: list[int] = []

    class _Other(_Peers):
        async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
            return {"ok": True, "serving": {"big": [1]}, "files": {"big": {"1": "theirs"}}}

    async def run() -> None:
        fleet, proc = _fleet(tmp_path, _Other(tmp_path), 30.0)

        async def refresh() -> None:
            refreshes.append(1)

        fleet._refresh = refresh
        fleet._serving = lambda model: {"big": [1]}
        fleet._files = lambda model: {"big": {"1": "mine"}}
        await fleet.follow("load", "big")
        assert fleet._refreshing is not None
        await fleet._refreshing  # the first goes at once
        await fleet.follow("load", "big")  # other files again
        second = fleet._refreshing
        assert second is not None
        # Bounded: proves that the second refresh does not run now (it waits the gap).
        done, _ = await asyncio.wait({second}, timeout=0.5)
        assert not done and refreshes == [1]
        second.cancel()
        assert not proc.killed.is_set()

    asyncio.run(run())


def test_one_missed_check_after_a_stall_of_the_first_process_kills_nothing(
    tmp_path: Path,
) -> None:
    """The first process's own event loop held up past the timeout (its clock jumps) makes
    one check fail although the worker is fine: silence needs several misses in a row."""

    class _Stall(_Peers):
        async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
            self.pings += 1
            if self.pings >= 20:
                self.enough.set()
            if self.pings % 5 == 0:  # every fifth check: the clock jumps past the timeout
                now[0] += 100.0
                raise _Silent()
            return {"ready": True}

    now = [0.0]

    async def run() -> None:
        peers = _Stall(tmp_path)
        fleet, proc = _fleet(tmp_path, peers, 0.03)
        fleet._clock = lambda: now[0]
        check = asyncio.create_task(fleet._check(fleet._workers[0]))
        await asyncio.wait_for(peers.enough.wait(), 10)
        assert not proc.killed.is_set()
        check.cancel()

    asyncio.run(run())


@pytest.mark.parametrize(("load_seconds", "starts"), [(0.0, False), (200.0, True)])
def test_a_worker_may_take_as_long_to_start_as_the_first_process_took_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_seconds: float, starts: bool
) -> None:
    """A repository that took the first process 200 s to load takes a worker loading beside
    another about as long or longer; with a fixed 300 s bound, one that took longer was killed
    and started again for ever. Here the worker answers ready at 500 s on the test's clock:
    within 300 + 2 x 200 s, not within 300 s alone."""
    now = [0.0]

    async def ready(sock: Path) -> bool | None:
        return True if now[0] >= 500.0 else None

    async def tick(seconds: float) -> None:  # the probe's pause, counted on the test's clock
        now[0] += 1.0

    async def run() -> None:
        fleet = WorkerFleet(
            Settings(), tmp_path, 2, _Peers(tmp_path), list, load_seconds=load_seconds
        )  # type: ignore[arg-type]
        fleet._clock = lambda: now[0]
        (worker,) = fleet._workers
        worker.proc = _Proc(1234)  # type: ignore[assignment]
        monkeypatch.setattr(fleet_module, "_ready", ready)
        monkeypatch.setattr(fleet_module.asyncio, "sleep", tick)
        if starts:
            await fleet._wait_ready(worker, tmp_path / "worker-1.sock")
            assert now[0] == 500.0
        else:
            with pytest.raises(RuntimeError, match="not ready within 300 s"):
                await fleet._wait_ready(worker, tmp_path / "worker-1.sock")

    asyncio.run(run())


def test_a_change_does_not_wait_for_a_worker_still_starting(tmp_path: Path) -> None:
    """A worker whose control socket listens but that has not answered its first readiness
    check (stopped there, or stuck) is not watched by the liveness check yet: a change sent
    to it waited the whole 600 s, and the management call with it. Its catch-up brings it to
    the state the change left once it answers."""

    class _Stuck(_Peers):
        async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
            if method == control.APPLY:
                await asyncio.Event().wait()  # never answers
            return await super().call(path, method, ask, seconds)

    async def run() -> None:
        fleet, proc = _fleet(tmp_path, _Stuck(tmp_path), 30.0)
        fleet._workers[0].answering = fleet._workers[0].joined = False
        await asyncio.wait_for(fleet.follow("load", "seed"), 10)
        assert not proc.killed.is_set()

    asyncio.run(run())


def test_a_version_this_process_dropped_while_a_change_was_applied_kills_no_worker(
    tmp_path: Path,
) -> None:
    """A poll (or refresh) found big version 1 served here; before the workers applied it, a
    LoadModel here replaced it with version 2, published meanwhile. The worker's refresh read
    the folder and served version 2: judged on what this process served before, it lacked
    version 1 and was killed, its in-flight requests with it. It is judged on what this
    process still serves."""
    serving = {"big": [1]}

    class _Newer(_Peers):
        async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
            serving["big"] = [2]  # the load here, while the worker applied the poll
            return {"ok": True, "serving": {"big": [2]}}

    async def run() -> None:
        peers = _Newer(tmp_path)
        fleet, proc = _fleet(tmp_path, peers, 30.0)
        fleet._serving = lambda model: {k: list(v) for k, v in serving.items()}
        await fleet.follow("poll", "")
        assert not proc.killed.is_set()

    asyncio.run(run())


class _Exited:
    """A worker process that has exited: ``wait`` answers at once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode = -9

    async def wait(self) -> int:
        return self.returncode

    def kill(self) -> None:
        pass


class _Retiring(_Peers):
    def retire(self, path: Path) -> None:
        pass


def test_starts_that_fail_slowly_back_off_and_each_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload failed in the first process (it serves its earlier load): a worker started
    again loads the repository, is refused JOIN, and is killed. A start that took longer than
    HEALTHY_AFTER to fail (a large repository) reset the backoff to 0.5 s, so the fleet
    reloaded the whole repository back to back for as long as the files stayed broken, and
    each attempt logged twice (the failure, then the exit of the process killed for it). A
    start that took longer than the backoff to fail was tried again at once, too: the fleet
    waits at least as long as the failed start took."""
    now = [1000.0]
    fleet = WorkerFleet(Settings(), tmp_path, 2, _Retiring(tmp_path), list)  # type: ignore[arg-type]
    fleet._clock = lambda: now[0]
    (worker,) = fleet._workers
    worker.proc = _Exited(1)  # type: ignore[assignment]
    worker.joined_at = now[0]
    now[0] += 10 * fleet_module.HEALTHY_AFTER  # it served long, then died
    delays: list[float] = []

    async def sleep(seconds: float) -> None:  # the backoff, recorded instead of waited
        delays.append(seconds)
        if len(delays) == 5:
            fleet._stopping = True

    took = [1.5 * fleet_module.HEALTHY_AFTER, 0.1, 0.1, 0.1]  # each start, till it failed

    async def spawn(w: Any) -> None:
        w.proc = _Exited(len(delays) + 1)
        w.joined_at = None
        # The repository loads (for 90 s the first time), then JOIN refuses it.
        seconds = took.pop(0)
        w.started = time.monotonic() - seconds
        now[0] += seconds
        raise fleet_module.WorkerStartError("worker 1 does not serve m version 1")

    monkeypatch.setattr(fleet_module.asyncio, "sleep", sleep)
    monkeypatch.setattr(fleet, "_spawn", spawn)
    with caplog.at_level(logging.ERROR, logger=fleet_module.__name__):
        asyncio.run(asyncio.wait_for(fleet._watch(worker), 10))
    # The backoff goes on growing, and waits at least as long as the failed start took.
    assert delays == [0.5, 1.5 * fleet_module.HEALTHY_AFTER, 2.0, 5.0, 10.0]
    lines = [r.getMessage() for r in caplog.records if r.name == fleet_module.__name__]
    assert len(lines) == 5 and "exited with -9" in lines[0], lines
    for n, line in enumerate(lines[1:], 1):
        assert line.startswith("worker 1 did not start again: worker 1 does not serve m"), line
        assert line.endswith(f"(failure {n} in a row)"), line


class _Timed(_Peers):
    """Records how long each APPLY may take."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.bounds: list[float] = []

    async def call(self, path: Path, method: str, ask: Any, seconds: float) -> Any:
        if method == control.APPLY:
            self.bounds.append(seconds)
        return await super().call(path, method, ask, seconds)


def test_a_change_waits_on_a_worker_as_long_as_the_slowest_load_here(tmp_path: Path) -> None:
    """A management call waited up to 600 s on a worker stuck in a load; it waits the floor
    plus twice the first process's start-up load or its longest load of one version since
    (a large model loaded after the start), at most APPLY_TIMEOUT."""
    slowest = [0.0]
    peers = _Timed(tmp_path)
    fleet = WorkerFleet(
        Settings(),
        tmp_path,
        2,
        peers,  # type: ignore[arg-type]
        list,
        load_seconds=1.0,
        longest_load=lambda: slowest[0],
    )
    (worker,) = fleet._workers
    worker.proc = _Proc(1234)  # type: ignore[assignment]
    worker.answering = worker.joined = True

    async def run() -> None:
        await fleet.follow("load", "m")
        slowest[0] = 100.0  # LoadModel of a large model took that long here
        await fleet.follow("load", "big")
        slowest[0] = 10_000.0
        await fleet.follow("refresh", "")

    asyncio.run(run())
    floor = fleet_module.FOLLOW_FLOOR
    assert peers.bounds == [floor + 2.0, floor + 200.0, fleet_module.APPLY_TIMEOUT]
