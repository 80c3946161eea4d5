"""With --workers, the first process's failed loads, and the versions it keeps serving beside
them, are every worker's (Registry.follow_failures, Registry.follow_kept).

Two registries over one real repository stand for the first process and a worker: the first's
opener fails for one version as a load out of memory there would, the worker's does not. No
sockets: the rows travel as the control channel carries them (JSON).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from asyncutil import LOAD_GUARD_S, arun

from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import seed_model, write_model
from ferry.server.runtime.session import open_session
from ferry.server.workers import judging

# A test's body: what it does with the first process's registry and a worker's.
Pair = Callable[[ModelRegistry, ModelRegistry], Awaitable[None]]


def _first(repo: ModelRepository, failing: set[int]) -> ModelRegistry:
    """The first process: its load of the versions in ``failing`` runs out of memory."""

    def opener(path: Path, config: Any, **kw: Any) -> Any:
        if int(path.parent.name) in failing:
            raise MemoryError("out of memory in the first process")
        return open_session(path, config, **kw)

    return ModelRegistry(repo, opener, warm_up=False)


def _run(repo: ModelRepository, body: Pair, failing: set[int] | None = None) -> None:
    """Run ``body`` with the first (failing the versions in ``failing``, which the body may
    change) and a worker, neither of which has looked at the repository yet; both are closed
    after it."""

    async def main() -> None:
        first = _first(repo, set() if failing is None else failing)
        worker = ModelRegistry(repo, open_session, warm_up=False)
        try:
            await body(first, worker)
        finally:
            await first.close()
            await worker.close()

    arun(main, LOAD_GUARD_S)


def _rows(first: ModelRegistry) -> list[list[Any]]:
    return json.loads(json.dumps(first.failed_loads()))  # as the control channel carries them


def _replace(repo: ModelRepository, model: Any, version: int = 1) -> None:
    """New files for a seed version, a second later by their mtime (a refresh sees them)."""
    path = repo.model_dir("seed") / str(version) / "model.onnx"
    path.write_bytes(model.SerializeToString())
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _serving(registry: ModelRegistry) -> dict[str, list[int]]:
    return {name: entry.ready_versions() for name, entry in registry.models.items()}


def test_a_version_that_failed_in_the_first_is_failed_in_a_worker_too(
    repo: ModelRepository,
) -> None:
    """The worker's own load succeeds; it fails with the first's reason instead, and keeps
    serving what the first keeps serving (the previous version, under latest 1)."""
    write_model(repo, "seed", seed_model(seed=1))
    failing: set[int] = set()

    async def body(first: ModelRegistry, worker: ModelRegistry) -> None:
        await first.refresh()
        await worker.refresh()
        write_model(repo, "seed", seed_model(seed=2), version=2)
        failing.add(2)
        await first.refresh()
        assert _serving(first) == {"seed": [1]}
        await worker.follow_failures(_rows(first))
        result = await worker.refresh()
        assert _serving(worker) == {"seed": [1]}
        (why,) = [s.reason for s in worker.statuses("seed") if s.version == 2]
        assert "first worker process" in why and "out of memory in the first process" in why
        assert result.failed and "out of memory" in result.failed[0]
        await worker.refresh(retry_failed=False)  # a poll: the same outcome, no new load
        assert _serving(worker) == {"seed": [1]}
        # The first loads it (memory again): no row names it, and the worker's load serves it.
        failing.clear()
        await first.load_model("seed")
        assert first.failed_loads() == []
        await worker.follow_failures(_rows(first))
        await worker.load_model("seed")
        assert _serving(worker) == _serving(first) == {"seed": [2]}

    _run(repo, body, failing)


def test_a_version_a_worker_served_before_the_first_failed_it_is_taken_out(
    repo: ModelRepository,
) -> None:
    """A worker that loaded a version before the first's load of it failed (it started again
    meanwhile) stops serving it once told, and its readiness follows, as the first's does."""
    write_model(repo, "seed", seed_model())

    async def body(first: ModelRegistry, worker: ModelRegistry) -> None:
        await first.refresh()
        first.settle()
        await worker.refresh()
        worker.settle()
        assert _serving(worker) == {"seed": [1]} and worker.all_ready()
        await worker.follow_failures(_rows(first))
        assert _serving(worker) == _serving(first) == {"seed": []}
        assert worker.all_ready() == first.all_ready()

    _run(repo, body, {1})


def test_files_changed_since_the_first_tried_are_loaded_by_the_worker(
    repo: ModelRepository,
) -> None:
    """The first's failure is of the files it tried: other files (copied in since) are not
    refused on its word, which would hold until the first's next load of them."""
    write_model(repo, "seed", seed_model())

    async def body(first: ModelRegistry, worker: ModelRegistry) -> None:
        await first.refresh()
        rows = _rows(first)
        _replace(repo, seed_model(seed=3))  # new files, copied in since the first tried
        await worker.follow_failures(rows)
        await worker.refresh()
        assert _serving(worker) == {"seed": [1]}

    _run(repo, body, {1})


def test_a_reload_that_failed_in_the_first_keeps_the_previous_load_in_the_worker(
    repo: ModelRepository,
) -> None:
    """New files of a served version that the first could not load: it serves the previous
    load, and so does the worker, rather than answering from the new files alone."""
    write_model(repo, "seed", seed_model(seed=1))
    failing: set[int] = set()

    async def body(first: ModelRegistry, worker: ModelRegistry) -> None:
        await first.refresh()
        await worker.refresh()
        before = worker.get("seed", 1)
        _replace(repo, seed_model(seed=2))
        failing.add(1)
        await first.refresh()
        await worker.follow_failures(_rows(first))
        await worker.refresh()
        assert worker.get("seed", 1) is before
        (why,) = [s.reason for s in worker.statuses("seed")]
        assert why.startswith("reload failed, still serving previous load") and "first" in why

    _run(repo, body, failing)


def test_a_worker_started_again_serves_what_the_first_keeps_serving(
    repo: ModelRepository,
) -> None:
    """Under latest 1 with a broken newest version, the first keeps serving the previous one;
    a worker that starts afresh serves it too once told, and drops it when the first does."""
    write_model(repo, "seed", seed_model(seed=1))

    async def body(first: ModelRegistry, worker: ModelRegistry) -> None:
        await first.refresh()
        vdir = repo.model_dir("seed") / "2"
        vdir.mkdir()
        (vdir / "model.onnx").write_bytes(b"not an onnx model")
        await first.refresh()
        assert _serving(first) == {"seed": [1]}
        await worker.refresh()  # the worker, started again, takes its first look
        assert _serving(worker) == {"seed": []}  # the policy's version alone: none
        worker.follow_kept(first.kept_serving())
        await worker.refresh()
        assert _serving(worker) == _serving(first) == {"seed": [1]}
        _replace(repo, seed_model(seed=2), version=2)
        await first.refresh()
        assert first.kept_serving() == []
        worker.follow_kept(first.kept_serving())
        await worker.refresh()
        assert _serving(worker) == _serving(first) == {"seed": [2]}

    _run(repo, body)


def test_a_version_failed_on_the_first_word_is_loaded_at_a_poll_once_the_first_serves_it(
    repo: ModelRepository,
) -> None:
    """The first loads a version at a poll that failed there before (a config fixed, memory
    freed): a worker that had failed it on the first's word tried it again only when asked
    to (its files unchanged), lacked it at that poll, and was killed for it."""
    write_model(repo, "seed", seed_model())
    failing = {1}

    async def body(first: ModelRegistry, worker: ModelRegistry) -> None:
        await first.refresh()
        await worker.follow_failures(_rows(first))
        await worker.refresh()
        assert _serving(worker) == {"seed": []}
        failing.clear()
        await first.load_model("seed")
        await worker.follow_failures(_rows(first))
        await worker.refresh(retry_failed=False)  # the poll a worker follows
        assert _serving(worker) == _serving(first) == {"seed": [1]}

    _run(repo, body, failing)


def test_a_config_error_of_the_first_never_fails_a_worker_that_reads_the_config_whole(
    repo: ModelRepository,
) -> None:
    """A worker judges the config itself: a config fixed between the first's scan and the
    worker's must not fail the worker's load on the first's stale word. The row is sent all
    the same, under the files and the config the first read, so that the fleet sees a worker
    serving what the first refused (judging.loaded_what_failed): left out, one connection in
    N served a new model the others refused until the next refresh."""
    write_model(repo, "seed", seed_model())
    config = repo.model_dir("seed") / "config.json"
    config.write_text("{not json")

    async def body(first: ModelRegistry, worker: ModelRegistry) -> None:
        await first.refresh()
        assert _serving(first) == {"seed": []}
        ((name, version, why, _sig),) = _rows(first)
        assert (name, version) == ("seed", 1) and "config.json cannot be parsed" in why
        config.write_text("{}")  # the copy ends before the worker reads it
        await worker.follow_failures(_rows(first))
        await worker.refresh()
        assert _serving(worker) == {"seed": [1]}
        theirs = json.loads(json.dumps({"files": worker.served_files("seed")}))
        found = judging.loaded_what_failed(_serving(first), theirs, _rows(first))
        assert "seed version 1 (its load failed in the first process" in found

    _run(repo, body)
