"""Shared test helpers: building repositories, reference runs, bounded waits and execution gates.

Nothing here sleeps to synchronise. ``wait_for`` polls a condition with a hard bound (a failure
says what never happened), and ``ExecutionGate`` holds a model's executions on the server's worker
thread until the test releases them, so "requests queued behind a busy instance" is a state the
test establishes, not a timing it hopes for.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from serverutil import ServerThread

from ferry.client import InferenceClient, ModelStatistics
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import write_model

# The ``start_server`` fixture: start_server(repository, **settings) -> a started ServerThread.
StartServer = Callable[..., ServerThread]

# Upper bound on any wait for a condition; only reached when the condition is broken.
WAIT_S = 20.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` if it does not within ``timeout``.

    A bounded wait for a condition (Event.wait with a short timeout between polls), never a fixed
    sleep followed by an assertion."""
    pause = threading.Event()
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.005)


def make_repo(root: Path, models: Mapping[str, onnx.ModelProto | list[onnx.ModelProto]]) -> Path:
    """A repository with each model published as version 1 (or versions 1..N for a list)."""
    repo = ModelRepository(root)
    for name, model in models.items():
        versions = model if isinstance(model, list) else [model]
        for i, m in enumerate(versions, start=1):
            write_model(repo, name, m, version=i)
    return repo.root


def write_config(repo_root: Path, name: str, config: Mapping[str, Any]) -> Path:
    path = repo_root / name / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def reference(model_file: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What onnxruntime itself returns for ``feeds``: the oracle for served outputs.

    String tensors go in and come out of onnxruntime's Python binding as ``str`` (a ``bytes``
    element would be fed as its repr), while BYTES on the wire are ``bytes``: convert at both ends
    so the oracle speaks the wire's types."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ort_feeds = {k: _map_objects(v, lambda e: e.decode("utf-8")) for k, v in feeds.items()}
    outputs = session.run(names, ort_feeds)
    return {
        name: _map_objects(out, lambda e: e.encode("utf-8"))
        for name, out in zip(names, outputs, strict=True)
    }


def _map_objects(arr: np.ndarray, fn: Callable[[Any], Any]) -> np.ndarray:
    if arr.dtype != object:
        return arr
    out = np.empty(arr.shape, dtype=object)
    out.reshape(-1)[:] = [fn(e) for e in arr.reshape(-1)]
    return out


def stats(client: InferenceClient, model: str, version: int = 1) -> ModelStatistics:
    (s,) = client.statistics(model, version=version)
    return s


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode("utf-8"))


def until_closed(sock: socket.socket) -> bytes:
    """Everything a raw connection receives until the server closes it (bounded by the
    socket's own timeout): for answers no HTTP client library would read, or requests none
    would send."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class ExecutionGate:
    """Holds every execution of one loaded model version inside its worker thread until
    ``release()``: the session's ``run`` is replaced on that LoadedVersion only.

    ``entered`` is set when the first execution reaches the gate, so a test knows the single
    instance is busy and that what it submits next must queue. ``calls`` counts executions that
    reached the session (held or not), which is how a test proves a request never ran.
    """

    def __init__(self, server: ServerThread, model: str, version: int = 1) -> None:
        assert server.app is not None
        loaded = server.app.registry.get(model, version)
        self.session = loaded.session
        self.entered = threading.Event()
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0
        original = self.session.run
        # Small batches of a fast model may run inline on the event loop, where holding them
        # would stall the whole server: mark this version as slow so they go to its workers.
        if hasattr(loaded, "_ns_per_element"):
            loaded._ns_per_element = float("inf")

        def gated_run(feeds: dict[str, np.ndarray], names: list[str] | None = None) -> Any:
            with self._lock:
                self.calls += 1
            if _on_event_loop():
                raise RuntimeError("an execution gate was reached on the event loop thread")
            self.entered.set()
            if not self._open.wait(WAIT_S * 3):
                raise RuntimeError("execution gate was never released")
            return original(feeds, names)

        self.session.run = gated_run  # type: ignore[method-assign]
        server.before_stop(self.release)

    def wait_entered(self) -> None:
        if not self.entered.wait(WAIT_S):
            raise AssertionError("no execution reached the gate")

    def release(self) -> None:
        self._open.set()

    def __enter__(self) -> ExecutionGate:
        return self

    def __exit__(self, *exc: object) -> None:
        """Open on the way out, so a failing test never leaves requests held."""
        self.release()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def close_on_this_thread(clients: list[Any]) -> None:
    """Close tritonclient.http clients and collect them here, on the test's thread: one left to
    the garbage collector may be collected on an in-process server's thread, where gevent
    refuses the pool join of its ``__del__`` and pytest reports an unraisable exception."""
    import gc

    for client in clients:
        client.close()
    clients.clear()
    gc.collect()


def hold_loads(server: ServerThread, version: str) -> tuple[threading.Event, threading.Event]:
    """Hold every load of a ``version`` folder on ``server`` (a started ServerThread) until the
    returned gate is set; ``entered`` is set once one is held. The gate opens when the server
    stops, so a failing test cannot leave a load waiting."""
    assert server.app is not None
    registry = server.app.registry
    opener, entered, gate = registry._opener, threading.Event(), threading.Event()

    def held(path: Path, config: object) -> object:
        if path.parent.name == version:
            entered.set()
            gate.wait(30)
        return opener(path, config)  # type: ignore[arg-type]

    registry._opener = held  # type: ignore[assignment]
    server.before_stop(gate.set)
    return entered, gate
