"""A worker that starts (or starts again) while the repository changes: a change made after it
read the repository and before its control socket listened reached only the workers already
listening, answered OK, and never reached it. Once ready, a worker re-reads the repository and
then applies the explicit loads and unloads made since it was started, so it starts from the
state the management calls left."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from ferry.server.settings import Settings
from ferry.server.workers import control
from ferry.server.workers import fleet as fleet_module


class _Peers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def call(self, path: Path, method: str, ask: dict[str, Any], seconds: float) -> Any:
        self.calls.append((path.name, method, ask))
        return {"ok": True, "joined": True}


class _Proc:
    pid = 4242
    returncode = None


async def _no_exec(*args: Any, **kwargs: Any) -> _Proc:
    return _Proc()


def _fleet(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    peers: Any,
    unloaded: Callable[[], list[str]] = lambda: [],
    *,
    spawned: Callable[..., Awaitable[_Proc]] = _no_exec,
    serving: Callable[[str], dict[str, list[int]]] | None = None,
) -> fleet_module.WorkerFleet:
    """A fleet whose workers are started by `spawned` and are ready at once."""

    async def ready(worker: Any, sock: Path) -> None:
        return None

    monkeypatch.setattr(fleet_module.asyncio, "create_subprocess_exec", spawned)
    fleet = fleet_module.WorkerFleet(Settings(), tmp_path, 2, peers, unloaded, serving=serving)
    monkeypatch.setattr(fleet, "_wait_ready", ready)
    return fleet


def test_a_ready_worker_rereads_the_repository_then_applies_the_unloads_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It starts without the models unloaded on request then (FERRY_WORKER_UNLOADED); once
    ready, one loaded again since is loaded there and one unloaded since is unloaded."""
    unloaded = ["again", "kept"]
    envs: list[dict[str, str]] = []

    async def spawned(*args: Any, **kwargs: Any) -> _Proc:
        envs.append(kwargs["env"])
        unloaded[:] = ["kept", "later"]  # changed while it started
        return _Proc()

    peers = _Peers()
    fleet = _fleet(tmp_path, monkeypatch, peers, lambda: list(unloaded), spawned=spawned)
    asyncio.run(fleet._spawn(fleet._workers[0]))
    assert json.loads(Path(envs[0][fleet_module.ENV_UNLOADED]).read_text()) == ["again", "kept"]
    assert peers.calls == [
        ("worker-1.sock", control.APPLY, {"op": "refresh", "model": "", "failed": [], "kept": []}),
        (
            "worker-1.sock",
            control.APPLY,
            {"op": "load", "model": "again", "failed": [], "kept": []},
        ),
        (
            "worker-1.sock",
            control.APPLY,
            {"op": "unload", "model": "later", "failed": [], "kept": []},
        ),
        (
            "worker-1.sock",
            control.JOIN,
            {"serving": {}, "failed": [], "kept": [], "files": {}, "rollouts": {}},
        ),
    ]


def test_a_worker_starts_again_whatever_the_number_of_models_unloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,500 long names unloaded on request travelled in one environment string, over Linux's
    128 KiB for one: the exec of every worker started again failed (E2BIG), for good. A real
    process with the worker's environment reads the whole list back."""
    names = [f"model-{i:05d}-" + "x" * 110 for i in range(1500)]
    read_back: list[list[str]] = []
    real_exec = asyncio.create_subprocess_exec
    child = "import json; from ferry.server.workers import fleet; print(json.dumps(fleet.unloaded_by_parent()))"

    async def spawned(*args: Any, **kwargs: Any) -> _Proc:
        proc = await real_exec(
            sys.executable, "-c", child, env=kwargs["env"], stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        read_back.append(json.loads(out))
        return _Proc()

    fleet = _fleet(tmp_path, monkeypatch, _Peers(), lambda: names, spawned=spawned)
    asyncio.run(fleet._spawn(fleet._workers[0]))
    assert read_back == [names]


def test_a_worker_that_lacks_a_version_is_not_joined_unless_a_change_to_it_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOIN names what this process serves; a worker that does not serve it all is not let
    onto the inference ports (its start fails). A model this process has changed and not yet
    followed is left out: the worker has not been told, and the follow checks it after."""
    answers: list[dict[str, Any]] = []

    class _Lacking(_Peers):
        async def call(self, path: Path, method: str, ask: dict[str, Any], seconds: float) -> Any:
            await super().call(path, method, ask, seconds)
            if method == control.JOIN:
                answers.append(ask)
                return {"joined": not ask["serving"], "lacks": "a version 1 (out of memory)"}
            return {"ok": True}

    fleet = _fleet(tmp_path, monkeypatch, _Lacking(), serving=lambda m: {"a": [1]})
    with pytest.raises(fleet_module.WorkerStartError, match=r"does not serve a version 1"):
        asyncio.run(fleet._spawn(fleet._workers[0]))
    fleet._pending["a"] += 1  # a load of "a" made here, its follow waiting for the lock
    asyncio.run(fleet._spawn(fleet._workers[0]))
    # Refused, it re-read the repository and was asked once more, then refused again.
    assert [a["serving"] for a in answers] == [{"a": [1]}, {"a": [1]}, {}]


def test_a_worker_refused_once_rereads_the_repository_and_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version this process loaded (its poll, say) after the worker's catch-up read the
    folder is not the worker's failure: it re-reads the repository and joins, not restarted."""
    joins = [False, True]

    class _Late(_Peers):
        async def call(self, path: Path, method: str, ask: dict[str, Any], seconds: float) -> Any:
            await super().call(path, method, ask, seconds)
            if method == control.JOIN:
                return {"joined": joins.pop(0), "lacks": "a version 2 (not loaded)"}
            return {"ok": True}

    peers = _Late()
    fleet = _fleet(tmp_path, monkeypatch, peers, serving=lambda m: {"a": [2]})
    asyncio.run(fleet._spawn(fleet._workers[0]))
    assert [(method, ask.get("op")) for _, method, ask in peers.calls] == [
        (control.APPLY, "refresh"),
        (control.JOIN, None),
        (control.APPLY, "refresh"),
        (control.JOIN, None),
    ]


def test_a_worker_that_dies_while_it_catches_up_is_a_start_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed (out of memory, say) while it re-read the repository, a worker's catch-up raised
    the control call's RpcError: at the fleet's start ``ferry serve`` ended with a traceback.
    It is a WorkerStartError, the one line that names the worker."""

    class _Dies(_Peers):
        async def call(self, path: Path, method: str, ask: dict[str, Any], seconds: float) -> Any:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone"
            )

    fleet = _fleet(tmp_path, monkeypatch, _Dies())
    with pytest.raises(fleet_module.WorkerStartError, match=r"^worker 1 did not catch up .*UNAV"):
        asyncio.run(fleet._spawn(fleet._workers[0]))


def test_a_change_made_while_a_worker_catches_up_does_not_wait_and_is_caught_up_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up held the lock every change takes: a management call waited for a starting
    worker's loads (600 s for one stuck there). The change is not sent to a worker that has
    not joined; it catches up again, and joins once no change came in meanwhile."""
    held = asyncio.Event()
    release = asyncio.Event()

    class _Slow(_Peers):
        async def call(self, path: Path, method: str, ask: dict[str, Any], seconds: float) -> Any:
            await super().call(path, method, ask, seconds)
            if method == control.APPLY and len(self.calls) == 1:
                held.set()
                await release.wait()  # the first catch-up's refresh: a slow load
            return {"ok": True, "joined": True}

        def sockets(self) -> list[Path]:
            return [tmp_path / "worker-1.sock"]

    peers = _Slow()

    async def run() -> None:
        fleet = _fleet(tmp_path, monkeypatch, peers)
        spawn = asyncio.create_task(fleet._spawn(fleet._workers[0]))
        await asyncio.wait_for(held.wait(), 10)
        await asyncio.wait_for(fleet.follow("unload", "seed"), 10)  # not held by it
        release.set()
        await asyncio.wait_for(spawn, 10)
        assert fleet._workers[0].joined

    asyncio.run(run())
    # Not told of the change (it had not joined): it re-read the repository once more.
    assert [(method, ask.get("op")) for _, method, ask in peers.calls] == [
        (control.APPLY, "refresh"),
        (control.APPLY, "refresh"),
        (control.JOIN, None),
    ]


def test_a_worker_changed_under_at_every_catch_up_catches_up_under_the_lock_and_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll every half second, each followed while the worker re-read the repository, could
    keep it catching up for ever: after CATCH_UP_ROUNDS its last catch-up holds the lock."""
    fleet: fleet_module.WorkerFleet

    class _Busy(_Peers):
        async def call(self, path: Path, method: str, ask: dict[str, Any], seconds: float) -> Any:
            await super().call(path, method, ask, seconds)
            if method == control.APPLY and not fleet._changes.locked():
                fleet._changed += 1  # a change followed meanwhile
            return {"ok": True, "joined": True}

    peers = _Busy()
    fleet = _fleet(tmp_path, monkeypatch, peers)
    asyncio.run(fleet._spawn(fleet._workers[0]))
    rounds = fleet_module.CATCH_UP_ROUNDS + 1
    assert [m for _, m, _ in peers.calls] == [control.APPLY] * rounds + [control.JOIN]
