"""Fixtures of the hardening tests (helpers in sechelpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sechelpers import Certs, ServerProcess, make_certs
from serverutil import ServerThread

from ferry.client import ConversionClient


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[type[ServerProcess]]:
    """``server_process(repo, *flags).start()``; every process started is stopped at teardown."""
    started: list[ServerProcess] = []
    counter = iter(range(1000))

    class Tracked(ServerProcess):
        def __init__(
            self,
            repository: Path,
            *args: str,
            management: bool = False,
            env: dict[str, str] | None = None,
        ) -> None:
            log = tmp_path / f"server-{next(counter)}.log"
            super().__init__(repository, log, *args, management=management, env=env)
            started.append(self)

    yield Tracked
    for proc in started:
        proc.stop()


@pytest.fixture
def conversion_server(tmp_path: Path) -> Iterator[tuple[ServerThread, ConversionClient]]:
    """A server with the real conversion child on tmp_path/repo, and a client of its
    management listener."""
    repo = tmp_path / "repo"
    repo.mkdir()
    with ServerThread(repo) as srv, ConversionClient(srv.management_target, timeout=120) as conv:
        yield srv, conv
