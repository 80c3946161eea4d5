"""Repository control through the plane: load, unload and refresh (a person's, through any
protocol, with one verdict on what a load left), and a worker process following what the first
loaded, failed and keeps serving (``--workers``).
"""

from __future__ import annotations

import functools
from typing import Any

from ferry.server.core.registry import ModelEntry, ModelRegistry, run_to_end
from ferry.server.core.repository import validate_model_name
from ferry.server.core.types import RepositoryOutcome
from ferry.server.errors import FailedPrecondition, ModelNotFound


class RepositoryControl:
    """DataPlane's share that loads, unloads and refreshes (a mixin: the registry is the
    plane's, set in ``DataPlane.__init__``)."""

    _registry: ModelRegistry

    async def load(self, model: str) -> RepositoryOutcome:
        """Load (or reload) a model from the repository. A load after which no version of it
        is ready fails with FAILED_PRECONDITION and why, whichever protocol asked."""
        name = validate_model_name(model)
        return await self._registry.load_model(name, functools.partial(_check_loaded, name))

    async def unload(self, model: str, *, missing_ok: bool = False) -> RepositoryOutcome:
        """Stop serving a model. A model that is not loaded (unloaded already, or not in the
        repository) is NOT_FOUND for ferry.v1, whose caller learns of a typo; ``missing_ok``
        answers it with nothing done, as the Open Inference Protocol's unload does in Triton
        (an unload's goal, the model not served, already holds)."""
        name = validate_model_name(model)
        try:
            return await self._registry.unload_model(name)
        except ModelNotFound:
            if not missing_ok:
                raise
            return RepositoryOutcome()

    def failed_loads(self) -> list[list[Any]]:
        """The versions whose load failed in this (first) process (Registry.failed_loads)."""
        return self._registry.failed_loads()

    def kept_serving(self) -> list[list[Any]]:
        """What this (first) process keeps serving past its policy (Registry.kept_serving)."""
        return self._registry.kept_serving()

    def kept_rollouts(self) -> dict[str, list[Any]]:
        """The rollouts served in place of their files here (Registry.kept_rollouts)."""
        return self._registry.kept_rollouts()

    async def follow_rollouts(self, rows: dict[str, list[Any]]) -> None:
        """In a worker: serve them too (Registry.follow_rollouts)."""
        await self._registry.follow_rollouts(rows)

    def follow_kept(self, rows: list[list[Any]]) -> None:
        """In a worker: serve what the first keeps serving too (Registry.follow_kept)."""
        self._registry.follow_kept(rows)

    async def follow_failures(self, rows: list[list[Any]]) -> None:
        """In a worker: fail and take out what failed in the first (Registry.follow_failures)."""
        await self._registry.follow_failures(rows)

    async def refresh(self, *, retry_failed: bool = True) -> RepositoryOutcome:
        """A refresh asked for (the RPC, a worker following the first): run to its end if the
        caller leaves. Cancelled while a version loaded, it left that version LOADING for
        good, its session lost, and no later refresh loaded it (a poll's own refresh is still
        stopped with the server). ``retry_failed`` off: a worker following the first's poll,
        which tries a failed load again only when asked to."""
        return await run_to_end(self._registry.refresh(retry_failed=retry_failed, follow=True))


def _check_loaded(name: str, entry: ModelEntry | None, outcome: RepositoryOutcome) -> None:
    """A load's verdict, on the state it left (registry.load_model runs it under the lock)."""
    if entry is None or not entry.ready_versions():
        why = (
            "; ".join(outcome.failed)
            or ((entry.config_error or entry.policy_error) if entry is not None else "")
            or "it has no version folder (<model>/<N>/model.onnx) the version policy selects"
        )
        raise FailedPrecondition(f"model {name!r} has no version ready after loading: {why}")
    if outcome.failed:
        # Some version did not load as asked (a broken config edit, a session that would
        # not open, a new version that fails): the load failed, as Triton's does, though
        # the versions named here keep serving what they served before.
        ready = ", ".join(str(v) for v in entry.ready_versions())
        raise FailedPrecondition(
            f"model {name!r} did not load as asked: {'; '.join(outcome.failed)}; "
            f"version(s) {ready} keep serving as before"
        )
