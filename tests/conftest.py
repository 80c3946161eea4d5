from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import StartServer, close_on_this_thread
from serverutil import ServerThread

from ferry.client import InferenceClient
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import identity_model, mlp_model, two_io_model, write_model
from ferry.server.grpc.app import FerryServer


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    """A repository with: mlp (64->256->256->10), two_io (FP32+INT64 in, two out),
    identity_fp32 with a fixed shape and no batch dim."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "mlp", mlp_model())
    write_model(repo, "two_io", two_io_model())
    write_model(repo, "fixed", identity_model("FP32", dims=(3,)))
    return repo.root


@pytest.fixture
def server(repo_path: Path) -> Iterator[ServerThread]:
    with ServerThread(repo_path) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[InferenceClient]:
    """An SDK client of ``server``; the timeout only guards against a hang."""
    with InferenceClient(server.target, timeout=30) as c:
        yield c


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start servers on other repositories or settings: ``start_server(repo, poll_interval=1)``;
    ``configure`` (a callable taking the FerryServer) runs before it starts, to install a spy or
    a gate. Every server started here is stopped (after opening its execution gates) at teardown."""
    started: list[ServerThread] = []

    def start(
        repository: Path, configure: Callable[[FerryServer], None] | None = None, **settings: Any
    ) -> ServerThread:
        srv = ServerThread(repository, **settings)
        started.append(srv)
        return srv.start(configure)

    yield start
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def triton_http_clients() -> Iterator[Callable[..., Any]]:
    """Makes tritonclient.http clients, closed and collected after the test on its own thread
    (helpers.close_on_this_thread)."""
    import tritonclient.http as th

    made: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        made.append(th.InferenceServerClient(*args, **kwargs))
        return made[-1]

    yield make
    close_on_this_thread(made)
