"""A real Ferry server on 127.0.0.1 with ephemeral ports, in a background thread with its own
event loop, for tests and benchmarks. Ready means ``start()`` returned: models are loaded and the
health status is set; nothing sleeps."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from ferry.server.grpc.app import FerryServer
from ferry.server.settings import Settings

T = TypeVar("T")


class ServerThread:
    # Repositories a started server of this process serves, with how many. A server holds its
    # state folder (one server per folder, see convert.service), so a test that starts a
    # second server on a repository another test server is using, with no state_dir of its
    # own, gets a private one: tests share module repositories, users run one server each.
    _serving: collections.Counter[Path] = collections.Counter()
    _serving_lock = threading.Lock()

    def __init__(self, repository: Path, **settings: Any) -> None:
        defaults: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "management_host": "127.0.0.1",
            "management_port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "http_port": 0,
            "management_http_port": 0,
            "grace_period": 5.0,
            # Tests name fresh temporary folders; the server's own default (refuse a missing
            # repository) is tested by itself.
            "create_repository": True,
            # A conversion process started ahead after each job would cost every test that
            # converts a torch import; the test of that feature turns it on.
            "warm_conversion_child": False,
        }
        defaults.update(settings)
        self.settings = Settings(repository=repository, **defaults)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="ferry-test"
        )
        self.app: FerryServer | None = None
        self._before_stop: list[Callable[[], None]] = []
        self._own_state: str | None = None  # a private state folder, removed at stop
        self._counted = False

    def before_stop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` first thing in ``stop()``: a test's execution gate must open before the
        server drains its queues, or the drain would wait on an execution that never ends."""
        self._before_stop.append(fn)

    def submit(self, coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> Future[T]:
        """Start a coroutine on the server's loop; the test waits on the future when it chooses."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop)

    def call(self, coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 120) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return self.submit(coro_fn).result(timeout)

    def start(self, configure: Callable[[FerryServer], None] | None = None) -> ServerThread:
        root = Path(self.settings.repository).resolve()
        with ServerThread._serving_lock:
            if ServerThread._serving[root] and not self.settings.state_dir:
                self._own_state = tempfile.mkdtemp(prefix="ferry-test-state-")
                self.settings = dataclasses.replace(self.settings, state_dir=self._own_state)
            ServerThread._serving[root] += 1
            self._counted = True
        self._thread.start()

        async def _start() -> FerryServer:
            app = FerryServer(self.settings)
            if configure is not None:
                configure(app)
            await app.start()
            return app

        self.app = self.call(_start)
        return self

    @property
    def target(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.inference_port}"

    @property
    def management_target(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.management_port}"

    @property
    def http_target(self) -> str:
        """host:port of the inference HTTP listener (tritonclient.http's url)."""
        assert self.app is not None
        return f"127.0.0.1:{self.app.http_port}"

    @property
    def management_http_target(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.management_http_port}"

    def stop(self, grace: float | None = 0.5) -> None:
        for fn in self._before_stop:
            fn()
        if self.app is not None:
            app = self.app
            self.call(lambda: app.stop(grace))
            self.app = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
        if self._counted:
            with ServerThread._serving_lock:
                ServerThread._serving[Path(self.settings.repository).resolve()] -= 1
            self._counted = False
        if self._own_state is not None:
            shutil.rmtree(self._own_state, ignore_errors=True)
            self._own_state = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ConversionServers:
    """Servers on one repository folder, each with a ConversionClient on its management
    listener, started as a test asks for them and all stopped by ``close()``: the body of the
    ``start`` fixtures of the conversion tests. ``child_command`` replaces the real conversion
    child (a fake one) for servers started with ``fake=True``."""

    def __init__(
        self, repository: Path, *, child_command: list[str] | None = None, timeout: float = 120
    ) -> None:
        self.repository = repository
        self.child_command = child_command
        self.timeout = timeout
        self.started: list[tuple[ServerThread, Any]] = []

    def start(self, *, fake: bool = True, **settings: Any) -> tuple[ServerThread, Any]:
        from ferry.client import ConversionClient

        self.repository.mkdir(parents=True, exist_ok=True)
        srv = ServerThread(self.repository, **settings).start()
        if fake and self.child_command is not None:
            assert srv.app is not None
            srv.app.conversion.runner.child_command = self.child_command
        client = ConversionClient(srv.management_target, timeout=self.timeout)
        self.started.append((srv, client))
        return srv, client

    def close(self) -> None:
        for srv, client in reversed(self.started):
            client.close()
            srv.stop()
