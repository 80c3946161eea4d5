"""A stop tells the workers first: each says NOT_SERVING at once, before the first process's
stop hooks (a conversion's shutdown) run, since a probe lands on any worker of the port."""

from __future__ import annotations

from pathlib import Path

from helpers import make_repo
from serverutil import ServerThread

from ferry.server.examples import mlp_model


class _Fleet:
    """Records what the stop asked of the fleet, in order."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    def signal_stop(self) -> list[object]:
        self.order.append("workers signalled")
        return []

    async def stop(self, grace: float) -> None:
        self.order.append("workers waited for")


def test_the_workers_are_signalled_before_the_stop_hooks_run(tmp_path: Path) -> None:
    order: list[str] = []
    srv = ServerThread(make_repo(tmp_path / "repo", {"mlp": mlp_model()})).start()
    try:
        app = srv.app
        assert app is not None
        app.fleet = _Fleet(order)

        async def hook() -> None:
            order.append("stop hook")

        app.on_stop.append(hook)
    finally:
        srv.stop()
    assert order == ["workers signalled", "stop hook", "workers waited for"]
