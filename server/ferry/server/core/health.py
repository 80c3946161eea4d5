"""Health and status reporting: each version's state as the index, ListModels and GetModel
show it, the files each READY version serves, and whether the replica is ready (``settle``
fixes what that means once the start-up load is done).

A mixin of ModelRegistry (core.registry), which holds the state it reads; the declarations
under TYPE_CHECKING name it for the type checker. These views are also read from the metrics
thread: they iterate copies of the dicts, each taken in one step under the GIL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.slots import ModelEntry, _plain
from ferry.server.core.types import State, VersionStatus, short
from ferry.server.errors import ModelNotFound


class HealthReporting:
    """The reporting side of ModelRegistry: statuses, served files, readiness."""

    if TYPE_CHECKING:
        models: dict[str, ModelEntry]
        _required: set[str] | None
        _named: set[str]

    def statuses(self, name: str = "") -> list[VersionStatus]:
        if name and name not in self.models:
            raise ModelNotFound(f"model {short(name)!r} is not served here")
        out = []
        for entry in list(self.models.values()):
            if name and entry.name != name:
                continue
            default = entry.serving_version()
            for v, slot in sorted(entry.versions.items()):
                out.append(VersionStatus(entry.name, v, slot.state, slot.reason, v == default))
        return out

    def served_files(self, name: str = "") -> dict[str, dict[int, Any]]:
        """model -> READY version -> the signature of the files it was loaded from, with the
        model's config and rollout files as read (``""``: every model), as it reads after a
        trip through JSON: with --workers, two processes serving one version from other files
        (changed on disk between their loads) answer with other weights under one version
        number, and two that read another config or rollout (edited between their reads) with
        another batching policy (max_batch_size, combine_requests) or another version for a
        request that names none; the version numbers and the model file agreed."""
        return {
            entry.name: {
                v: _plain((slot.signature, entry.config_signature, entry.rollout_signature))
                for v, slot in list(entry.versions.items())
                if slot.state is State.READY and slot.loaded is not None
            }
            for entry in list(self.models.values())
            if not name or entry.name == name
        }

    def versionless(self, name: str = "") -> list[tuple[str, str]]:
        """(model, why) for each model the registry knows that has no version, not even a
        failed one (its version folders deleted, a config that does not parse): said alike by
        the repository index, ListModels and GetModel. ListModels and GetModel said nothing of
        such a model (no row, no version), the index that it was UNAVAILABLE and why."""
        return [
            (entry.name, entry.changing or entry.unserved_reason())
            for entry in list(self.models.values())
            if not entry.versions and (not name or entry.name == name)
        ]

    def loaded_versions(self) -> list[LoadedVersion]:
        return [
            s.loaded
            for e in list(self.models.values())
            for s in list(e.versions.values())
            if s.loaded is not None and s.state is State.READY
        ]

    def all_ready(self) -> bool:
        """Is this replica ready? Before ``settle``: every selected version finished loading and
        at least one is READY. After it: the models the replica must serve each have a READY
        version; a model loading, reloading or failing beside them changes nothing, so a
        readiness probe does not pull a serving replica out on every deploy."""
        return self.health()[0]

    def health(self) -> tuple[bool, dict[str, bool]]:
        """``all_ready()`` and each model's readiness (a READY version), from one pass over the
        models: health follows every registry change, and with hundreds of models two passes
        per change were most of what a refresh cost the event loop."""
        states: dict[str, bool] = {}
        any_loading = False
        for entry in list(self.models.values()):
            ready = False
            for slot in list(entry.versions.values()):
                if slot.state is State.READY:
                    ready = True
                elif slot.state is State.LOADING:
                    any_loading = True
            states[entry.name] = ready
        if self._required is None:
            replica = any(states.values()) and not any_loading
        else:
            serving = {name for name, ready in states.items() if ready}
            replica = self._required <= serving if self._required else bool(serving)
        return replica, states

    def settle(self, required: list[str] | None = None) -> None:
        """Fix what readiness means once the start-up load is done: the models named, or else
        those serving now. An explicit load adds a model to them once it serves, an explicit
        unload removes it, and so does the deletion of its last version unless it was named."""
        if required:
            self._required = set(required)
            self._named = set(required)
        else:
            self._required = {name for name, ready in self.health()[1].items() if ready}
