"""Rollout routing: which version answers a request that names none (a split's share, the
shadow candidate refused unpromoted), a rollout's change written and served, and the fitting
of loads to the rollout in force (one interface, one batching across its versions).

A mixin of ModelRegistry (core.registry), which holds the state it reads and the model locks
and sync it calls; the declarations under TYPE_CHECKING name them for the type checker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from ferry.server.core import rollout as rollouts
from ferry.server.core.edits import run_to_end
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.pools import ThreadPools
from ferry.server.core.repository import ModelRepository, repository_edit
from ferry.server.core.scan import _rollout_signature
from ferry.server.core.slots import (
    _ROLLOUT_REFUSED,
    ModelEntry,
    VersionSlot,
    _Staged,
    _still_serving,
)
from ferry.server.core.types import RepositoryOutcome, State, short
from ferry.server.errors import FailedPrecondition, ModelNotFound, ModelNotReady, VersionNotFound

# The registry's logger, as before the split: the name is in every log line (server.logs).
log = logging.getLogger("ferry.server.core.registry")

T = TypeVar("T")


class RolloutRouting:
    """The rollout side of ModelRegistry: routing, rollout changes and split fitting."""

    if TYPE_CHECKING:
        repository: ModelRepository
        pools: ThreadPools
        models: dict[str, ModelEntry]
        _unloaded_by_request: set[str]

        def get(self, name: str, version: int | None = None) -> LoadedVersion: ...

        async def read_folder(self, read: Callable[..., T], *args: Any) -> T: ...

        async def require_model(self, name: str) -> None: ...

        def _model_lock(self, name: str) -> AbstractAsyncContextManager[None]: ...

        def _notify(self) -> None: ...

        async def _follow(self, op: str, name: str) -> None: ...

        async def _sync_model(
            self, name: str, result: RepositoryOutcome, retry_failed: bool
        ) -> None: ...

        async def _serve_load(
            self, entry: ModelEntry, version: int, load: _Staged, result: RepositoryOutcome
        ) -> None: ...

    def route(self, name: str, version: int | None, key: str) -> LoadedVersion:
        """The version a request is served by: the one it names, else its place in the
        model's rollout split (by ``key``, the request id), else the default version. A split
        version that is not ready gives way to the split's largest ready share (else the
        default) rather than failing the request."""
        entry = self.models.get(name)
        if not version and entry is not None and entry.rollout is not None and entry.rollout.split:
            slot = entry.versions.get(entry.rollout.pick(name, key))
            if slot is not None and slot.loaded is not None and slot.state is State.READY:
                return slot.loaded
            # Its share goes to the split's largest ready share, a version the split (and its
            # interface check) names, before the default, which neither did.
            version = entry.serving_version()
            self.refuse_unpromoted(name, version)
            return self.get(name, version)
        if not version and entry is not None and entry.rollout is not None and entry.rollout.shadow:
            self.refuse_unpromoted(name, entry.default_version())
        return self.get(name, version)

    def refuse_unpromoted(self, name: str, version: int | None) -> None:
        """ModelNotReady when ``version``, about to answer the requests that name none, is the
        shadow candidate only because the versions the rollout serves failed (its split's, or
        with none the default it would have): a pin {1: 1} beside candidate 2 whose version 1
        failed to load sent every request to the candidate, unpromoted, while GetRollout showed
        the pin. One still loading gives way to it (the candidate served before the change)."""
        entry = self.models.get(name)
        ro = entry.rollout if entry is not None else None
        if entry is None or ro is None or ro.shadow is None or version != ro.shadow[0]:
            return
        meant = [v for v, _ in ro.split]
        if not meant:
            pinned = entry.config.default_version
            meant = [pinned if pinned is not None else max(entry.versions, default=0)]
        if version in meant:
            return
        slots = [entry.versions.get(v) for v in meant]
        if any(slot is not None and slot.state is State.LOADING for slot in slots):
            return
        why = "; ".join(
            f"version {v} is {slot.state.value}{': ' + slot.reason if slot.reason else ''}"
            if slot is not None
            else f"version {v} is not served"
            for v, slot in zip(meant, slots, strict=True)
        )
        raise ModelNotReady(
            f"model {short(name)!r}: {why}, and the shadow candidate {version} is not promoted "
            "to answer in its place: load that version again (ferry models load), or promote "
            f"the candidate (ferry models rollout {short(name)} {version}=1)"
        )

    def rollout_of(self, name: str) -> tuple[rollouts.Rollout | None, str]:
        """The model's rollout in force, and why it is not the one on disk, or why a version
        of it does not serve its files ('' when neither)."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {short(name)!r} is not served here")
        errors = [entry.rollout_error] if entry.rollout_error else []
        if entry.rollout is not None:
            checked = set(entry.rollout.versions)
            if not entry.rollout.split:  # a shadow alone: the default it is compared with too
                checked.add(entry.default_version() or 0)
            for v in sorted(checked):
                slot = entry.versions.get(v)
                if slot is not None and _ROLLOUT_REFUSED in slot.reason:
                    errors.append(f"version {v}: {slot.reason}")
        return entry.rollout, "; ".join(errors)

    async def set_rollout(
        self,
        name: str,
        split: rollouts.Rollout | None,
        *,
        by: str,
        why: str,
        decided_on: rollouts.Rollout | None = None,
        check: Callable[[], None] | None = None,
    ) -> RepositoryOutcome:
        """Write the model's split (None: end it) with the repository, then serve it: the
        versions it names are loaded beside the version policy's own. ``decided_on``: the
        rollout a rule judged (the object read, see ``rollout_of``); the change is refused
        when another has been made since, so a rule never undoes a change it did not see.
        ``check``: the caller's refusal, run under the model's edit lock before the write, so
        no other edit (SetDefaultVersion) can change what it judged between it and the write."""
        return await run_to_end(
            self._set_rollout(name, split, by, why, decided_on=decided_on, check=check)
        )

    async def _set_rollout(
        self,
        name: str,
        split: rollouts.Rollout | None,
        by: str,
        why: str,
        *,
        decided_on: rollouts.Rollout | None,
        check: Callable[[], None] | None,
    ) -> RepositoryOutcome:
        await self.require_model(name)
        async with self._model_lock(name):
            if decided_on is not None:
                await self._still_the_rollout(name, decided_on)
            if check is not None:
                check()
            if name in self._unloaded_by_request:
                # Serving a rollout would load it again here (and, with --workers, in the
                # workers too, each of which then disagreed with the others on a refresh).
                raise FailedPrecondition(
                    f"model {short(name)!r} was unloaded on request: load it first "
                    "(LoadModel, or ferry models load), then set its rollout"
                )
            if split is not None:
                on_disk = set(await self.read_folder(self.repository.list_versions, name))
                missing = [v for v in split.versions if v not in on_disk]
                if missing:
                    raise VersionNotFound(
                        f"model {name!r} has no version {missing} in the repository; it has "
                        f"{sorted(on_disk) or 'none'}"
                    )
            mdir = await self.read_folder(self.repository.model_dir, name)
            if split is not None:
                self._check_one_interface(name, split)  # the versions already loaded
            previous = await asyncio.to_thread(rollouts.raw, mdir)
            with repository_edit(f"{name}/{rollouts.ROLLOUT_FILE}"):
                await asyncio.to_thread(rollouts.write, mdir, split, by=by, why=why)
            result = RepositoryOutcome()
            await self._sync_model(name, result, retry_failed=True)
            if split is not None:
                try:
                    self._check_one_interface(name, split)  # and those it loaded
                    self._refuse_unfitting_loads(name, split)
                except FailedPrecondition:
                    await asyncio.to_thread(rollouts.restore, mdir, previous)
                    await self._sync_model(name, RepositoryOutcome(), retry_failed=False)
                    self._notify()
                    raise
            self._notify()
            await self._follow("load", name)
            return result

    def _refuse_unfitting_loads(self, name: str, split: rollouts.Rollout) -> None:
        """FailedPrecondition when a version ``split`` names serves nothing because its load
        did not fit the split (``_serve_fitting``): the split would not be served as asked."""
        entry = self.models.get(name)
        for v in split.versions:
            slot = entry.versions.get(v) if entry is not None else None
            if slot is not None and slot.loaded is None and _ROLLOUT_REFUSED in slot.reason:
                raise FailedPrecondition(slot.reason.split(f"{_ROLLOUT_REFUSED}: ", 1)[-1])

    async def _still_the_rollout(self, name: str, decided_on: rollouts.Rollout) -> None:
        """Refuse a rule's change (or a shadow publish's) when the rollout it judged is no
        longer the one in force: a person's change made while the rule decided (one that loads a version holds the lock
        for seconds, and the old rollout served meanwhile) was overwritten by the rule's
        verdict on the old candidate, and a new shadow was ended unjudged. The file is looked
        at too (its content's digest now): a change written there but not yet read counts
        as made."""
        signature = await self.read_folder(_rollout_signature, self.repository, name)
        entry = self.models.get(name)
        if entry is None or entry.rollout is not decided_on or signature != entry.rollout_signature:
            raise FailedPrecondition(
                f"the rollout of {short(name)!r} was changed by another call while this change "
                "waited; this one is dropped, and the rollout in force stays"
            )

    def _check_one_interface(self, name: str, split: rollouts.Rollout) -> None:
        """The rollout's versions (and, for a shadow alone, the default version it is compared
        with) that are loaded take and give the same tensors (rollout.interface_difference)."""
        why = self._rollout_difference(name, split, {})
        if why:
            raise FailedPrecondition(why)

    def _rollout_difference(
        self, name: str, split: rollouts.Rollout, fresh: dict[int, LoadedVersion]
    ) -> str:
        """Why ``split`` cannot be served ('' when it can) by the versions loaded now, with
        ``fresh`` (version -> a load not yet served) in place of what those versions serve."""
        entry = self.models.get(name)
        if entry is None:
            return ""
        versions = sorted(split.versions)
        default = entry.default_version()
        if not split.split and default is not None:
            versions = [default, *versions]
        loaded = [
            (v, lv)
            for v in versions
            if (lv := fresh.get(v)) is not None
            or ((slot := entry.versions.get(v)) is not None and (lv := slot.loaded) is not None)
        ]
        if not loaded:
            return ""
        first, a = loaded[0]
        for other, b in loaded[1:]:
            why = rollouts.interface_difference((a.inputs, a.outputs), (b.inputs, b.outputs))
            if why:
                return (
                    f"versions {first} and {other} of {short(name)!r} differ: {why}. A split "
                    "or shadow needs one interface (a client cannot tell which version "
                    "answers it): name the version in each request instead"
                )
        limits = {v: lv.max_batch_size for v, lv in loaded}
        why = rollouts.batch_difference(split, limits, default)
        if why:
            return (
                f"the versions in the rollout of {short(name)!r} take different batches: {why}, or "
                "name the version in each request instead"
            )
        return ""

    def _keep_one_interface(self, entry: ModelEntry, previous: rollouts.Rollout | None) -> None:
        """A rollout whose versions, as loaded now, differ (a rollout file edited by hand, or
        copied in) is not served: the rollout served before it (``previous``) goes on, else the
        default version, and GetRollout says why. The same rule as for a version's files
        (``_serve_fitting``): what served before a change that cannot be served keeps serving.
        SetRollout checks before it writes; a hand edit is seen only here."""
        assert entry.rollout is not None
        why = self._rollout_difference(entry.name, entry.rollout, {})
        if not why:
            return
        if (
            previous is not None
            and previous is not entry.rollout
            and not self._rollout_difference(entry.name, previous, {})
        ):
            entry.rollout = previous
            entry.rollout_error = f"{rollouts.ROLLOUT_FILE} as edited is not served: {why}"
            log.warning("model %s: %s; the rollout served before goes on", entry.name, why)
            return
        entry.rollout, entry.rollout_error = None, why
        log.warning("model %s: %s; serving its default version", entry.name, why)

    async def _serve_fitting(
        self, entry: ModelEntry, staged: dict[int, _Staged], result: RepositoryOutcome
    ) -> None:
        """Serve the loads of this sync that fit the rollout (all together if they fit
        together: a split's versions replaced alike at once; else each that fits on its own).
        One that does not is refused as a failed load is: a reload leaves the version serving
        its previous files, a first load leaves it FAILED, and the rollout goes on as it was,
        never handed to the default version (often the canary) by a file replaced under one
        version of it. GetRollout says why (``rollout_of``)."""
        rollout = entry.rollout
        fresh = {v: s.loaded for v, s in staged.items()}
        refused: dict[int, str] = {}
        if rollout is not None and self._rollout_difference(entry.name, rollout, fresh):
            fresh = {}
            # The largest share first, then the default version (a shadow's), then the rest:
            # at a start, with no previous load to keep, the versions left are those that
            # answer most (taken by number, 1=1 2=9 sent every request to the 10% share).
            weights, default = dict(rollout.split), entry.default_version()
            for v, s in sorted(
                staged.items(), key=lambda i: (-weights.get(i[0], 0), i[0] != default, i[0])
            ):
                why = self._rollout_difference(entry.name, rollout, {**fresh, v: s.loaded})
                if why:
                    refused[v] = why
                else:
                    fresh[v] = s.loaded
        for v, s in sorted(staged.items()):
            if v not in refused:
                await self._serve_load(entry, v, s, result)
                continue
            why = f"{_ROLLOUT_REFUSED}: {refused[v]}"
            log.warning("model %s version %s: %s", entry.name, v, why)
            result.failed.append(f"{entry.name}/{v}: {why}")
            if s.old is not None and s.old.loaded is not None:
                s.old.reason = _still_serving(why)
                s.old.tried_signature = s.signature
            else:
                entry.versions[v] = VersionSlot(v, State.FAILED, why, None, s.signature)
            self._notify()
            await s.loaded.close(drain=False, releaser=self.pools.loading)
