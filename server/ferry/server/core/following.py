"""Following the fleet's first process, in a worker process (--workers): the versions whose
load failed there, or that it keeps serving, are every worker's outcome too; and what the first
process tells a worker started again (the models unloaded on request).

A mixin of ModelRegistry (core.registry), which holds the state it reads and the model locks
and unloads it calls; the declarations under TYPE_CHECKING name them for the type checker.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from ferry.server.core import rollout as rollouts
from ferry.server.core.slots import (
    _FIRST,
    _KEPT,
    _STILL_SERVING,
    ModelEntry,
    Signature,
    VersionSlot,
    _failed_first,
    _plain,
    _reload_failed,
)
from ferry.server.core.types import RepositoryOutcome, State


class FleetFollowing:
    """The worker-fleet side of ModelRegistry: what the first process and its workers share."""

    if TYPE_CHECKING:
        models: dict[str, ModelEntry]
        _unloaded_by_request: set[str]
        _required: set[str] | None
        _named: set[str]
        _first_failed: dict[tuple[str, int], tuple[str, Any]]
        _first_kept: set[tuple[str, int]]

        def _model_lock(self, name: str) -> AbstractAsyncContextManager[None]: ...

        def _notify(self) -> None: ...

        async def _sync_model(
            self, name: str, result: RepositoryOutcome, retry_failed: bool
        ) -> None: ...

        async def _unload_version(
            self, entry: ModelEntry, version: int, result: RepositoryOutcome
        ) -> None: ...

    @property
    def unloaded_by_request(self) -> list[str]:
        """Models an explicit unload took out (a restarted worker process is told them)."""
        return sorted(self._unloaded_by_request)

    def keep_unloaded(self, names: list[str]) -> None:
        """Before the first refresh: models an explicit unload took out in the process this one
        follows (a worker started again), which it must not load and serve meanwhile."""
        self._unloaded_by_request.update(names)

    def failed_loads(self) -> list[list[Any]]:
        """In the first process: each version whose load failed here, [name, version, why,
        signature], the failed reload of a served version included (it serves the previous
        load): what every worker must not serve either (``follow_failures``)."""
        rows: list[list[Any]] = []
        for entry in list(self.models.values()):
            for slot in list(entry.versions.values()):
                if entry.config_error and slot.reason == entry.config_error:
                    # Under the files and the config read: a worker that read the config whole
                    # (half written here) loads it (no match), and the fleet sees it (judging).
                    sig = (slot.signature, entry.config_signature)
                    rows.append([entry.name, slot.version, slot.reason, _plain(sig)])
                    continue
                if slot.state is State.FAILED and slot.loaded is None:
                    rows.append([entry.name, slot.version, slot.reason, _plain(slot.signature)])
                elif _reload_failed(slot):
                    why = slot.reason[len(_STILL_SERVING) :]
                    rows.append([entry.name, slot.version, why, _plain(slot.files_seen())])
        return rows

    async def follow_failures(self, rows: list[list[Any]]) -> None:
        """In a worker: the first process's ``failed_loads`` now. A load of one of those
        versions (the same files) fails here too, with the first's reason, and one this worker
        serves already (loaded before the first's load failed) is taken out: every process
        serves a version, or none does."""
        self._first_failed = {(str(n), int(v)): (str(why), sig) for n, v, why, sig in rows}
        for (name, version), (why, sig) in self._first_failed.items():
            entry = self.models.get(name)
            slot = entry.versions.get(version) if entry is not None else None
            if entry is None or slot is None or slot.loaded is None or _reload_failed(slot):
                continue
            if _plain(slot.signature) != sig or slot.state is not State.READY:
                continue
            async with self._model_lock(name):
                if entry is not self.models.get(name) or entry.versions.get(version) is not slot:
                    continue  # changed while this waited on the lock
                await self._unload_version(entry, version, RepositoryOutcome())
                entry.versions[version] = VersionSlot(
                    version, State.FAILED, _failed_first(why), None, slot.signature
                )
                # Not required, as where its load failed (unless --require-models names it).
                required = self._required
                if required is not None and not entry.ready_versions() and name not in self._named:
                    required.discard(name)
                self._notify()

    def kept_serving(self) -> list[list[Any]]:
        """In the first process: [name, version] of each version kept serving because the
        newer ones its version policy selects did not load (``_kept_serving``)."""
        return [
            [entry.name, slot.version]
            for entry in list(self.models.values())
            for slot in list(entry.versions.values())
            if slot.state is State.READY and slot.reason.startswith(_KEPT)
        ]

    def follow_kept(self, rows: list[list[Any]]) -> None:
        """In a worker: the first process's ``kept_serving`` now, which its syncs serve beside
        what the version policy selects. A worker started again loaded only the policy's
        versions (the broken new one), served nothing of the model, was refused the inference
        ports for lacking what the first kept serving, and was started again for good."""
        self._first_kept = {(str(n), int(v)) for n, v in rows}

    def kept_rollouts(self) -> dict[str, list[Any]]:
        """In the first process: model -> [its rollout file's signature, the rollout served in
        place of that file (a broken edit, versions that do not fit), why], for
        ``follow_rollouts``."""
        return {
            e.name: [e.rollout_signature, rollouts.as_doc(e.rollout), e.rollout_error]
            for e in list(self.models.values())
            if e.rollout is not None and e.rollout_error
        }

    async def follow_rollouts(self, rows: dict[str, list[Any]]) -> None:
        """In a worker: serve the rollout the first serves in place of the file both read. A
        worker started again while the file was broken had no earlier rollout to keep, and
        sent every request that names no version to the default while the others split."""
        for name, (sig, doc, why) in rows.items():
            theirs = rollouts.from_doc(doc)
            entry = self.models.get(name)
            if entry is None or entry.rollout_signature != sig or entry.rollout == theirs:
                continue  # another file read here: judged on its own
            async with self._model_lock(name):
                if self.models.get(name) is not entry or entry.rollout_signature != sig:
                    continue  # changed while this waited on the lock
                entry.rollout, entry.rollout_error = theirs, str(why)
                await self._sync_model(name, RepositoryOutcome(), retry_failed=False)
                self._notify()

    def _lifted(self, name: str, slot: VersionSlot) -> bool:
        """Did ``slot`` fail on the first process's word, which it no longer says? Tried
        again then, at a poll too: it was not (its files unchanged), and a worker that had
        failed a version the first loaded since (at its own poll) lacked it, and was killed."""
        return _FIRST in slot.reason and (name, slot.version) not in self._first_failed

    def _failed_in_first(self, name: str, version: int, sig: Signature) -> str:
        """Why this version (with these files) is not to be loaded here: its load failed in
        the first process ("" when it did not, or this is the first process)."""
        failed = self._first_failed.get((name, version))
        if failed is None or failed[1] != _plain(sig):
            return ""
        return _failed_first(failed[0])
