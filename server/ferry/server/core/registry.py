"""Which model versions exist, which are served, and in what state.

The registry mirrors the repository folder: ``refresh()`` loads versions that the version policy
selects, unloads the ones it no longer selects (draining their queues first), and retries failed
ones whose files changed. A version that fails to load is FAILED with its reason, and every other
version keeps serving.

One model's business never holds up another's: sessions are created and freed on the loader pool
(core.pools, lower CPU priority), and each model has its own lock, so a management call on one
model never waits behind a refresh that is loading others (one refresh runs at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ferry.server.core import rollout as rollouts
from ferry.server.core.config import ModelConfig
from ferry.server.core.edits import run_to_end
from ferry.server.core.following import FleetFollowing
from ferry.server.core.loaded import LoadedVersion, open_version
from ferry.server.core.pools import ThreadPools
from ferry.server.core.repository import (
    MODEL_FILE,
    UNREADABLE,
    ModelRepository,
)
from ferry.server.core.routing import RolloutRouting
from ferry.server.core.scan import (
    _model_config,
    _published_signature,
    _scan,
)
from ferry.server.core.slots import (
    _ROLLOUT_REFUSED,
    ModelEntry,
    Signature,
    VersionSlot,
    _kept_serving,
    _plain,
    _reload_failed,
    _Staged,
    _still_serving,
    serves_earlier_load,
)
from ferry.server.core.types import (
    IndexEntry,
    Opener,
    RepositoryOutcome,
    State,
    VersionStatus,
    short,
)
from ferry.server.errors import (
    ConversionFailed,
    ErrorKind,
    FailedPrecondition,
    FerryError,
    ModelNotFound,
    ModelNotReady,
    Unavailable,
    VersionNotFound,
)

__all__ = [
    "READ_TIMEOUT_S",
    "ModelEntry",
    "ModelRegistry",
    "Signature",
    "State",
    "VersionSlot",
    "run_to_end",
    "serves_earlier_load",
]

log = logging.getLogger(__name__)


Listener = Callable[[], None]
# Told of every explicit change once it is done here: ("load" | "unload", model) or ("refresh", "").
# Worker processes that serve the same repository apply it too (ferry.server.workers).
Follower = Callable[[str, str], Awaitable[None]]

T = TypeVar("T")
# How long a look at the repository's folders may take before the call answers UNAVAILABLE:
# a hung mount, not a slow one (listing thousands of models over NFS takes seconds).
READ_TIMEOUT_S = 60.0
_NOT_LOADED = "the converted model does not load in this server's onnxruntime"


class ModelRegistry(RolloutRouting, FleetFollowing):
    """Changed on the event loop only. The read-only views (``statuses``, ``loaded_versions``)
    are also read from the metrics thread: they iterate copies of the dicts, each taken in one
    step under the GIL, so a refresh changing them meanwhile cannot break the iteration."""

    def __init__(
        self,
        repository: ModelRepository,
        opener: Opener,
        *,
        warm_up: bool = True,
        pools: ThreadPools | None = None,
    ) -> None:
        self.repository = repository
        self._opener = opener
        self.pools = pools or ThreadPools()
        self.models: dict[str, ModelEntry] = {}
        self._refresh_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}  # one per model name held or waited on
        self._lock_users: dict[str, int] = {}  # how many hold or wait on each (_model_lock)
        self._warm_up = warm_up
        self._listeners: list[Listener] = []
        self._unloaded_by_request: set[str] = set()
        self._required: set[str] | None = None  # None until settle(): see all_ready
        self._named: set[str] = set()  # those --require-models named (settle)
        self.follower: Follower | None = None
        # In a worker process (--workers): the versions whose load failed in the first
        # process, (name, version) -> (why, the files' signature when it tried). Its outcome
        # is every worker's: a worker whose own load succeeded served a version the first
        # did not (out of memory there), and 1 connection in N answered it (follow_failures).
        self._first_failed: dict[tuple[str, int], tuple[str, Any]] = {}
        # In a worker: the versions the first process keeps serving beside a newer one of the
        # policy that did not load there (_kept_serving), which a sync here serves too.
        self._first_kept: set[tuple[str, int]] = set()
        # Model files being opened on the loader pool now (_create). A stop gives up the
        # loads it waits for, but their threads run on in onnxruntime; the process's exit
        # joins them (cli.serve), and a SIGTERM during a long start-up load waited for it.
        self._opening = 0
        # Seconds the longest open of one version took here (failed ones included): with
        # --workers, what a management call waits on a worker's change scales with it.
        self.longest_load = 0.0
        self._opening_lock = threading.Lock()

    def add_listener(self, listener: Listener) -> None:
        """Called after every state change (health and metrics follow the registry)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("registry listener failed")

    # ---- lookup (event loop, hot path) ----
    def get(self, name: str, version: int | None = None) -> LoadedVersion:
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(
                f"model {short(name)!r} is not served here; the repository index lists the "
                "served models (ferry.v1 ListModels; Open Inference Protocol RepositoryIndex, "
                "or POST /v2/repository/index over HTTP)"
            )
        if not version:
            version = entry.default_version()
            if version is None:
                if entry.changing:
                    raise ModelNotReady(f"model {short(name)!r} is {entry.changing}; retry shortly")
                why = entry.unserved_reason()
                raise ModelNotReady(f"model {short(name)!r} has no version ready: {why}")
        slot = entry.versions.get(version)
        if slot is None and entry.changing:
            # Being loaded (a LoadModel right after an unload): the version may be on its way,
            # so retry shortly rather than "not served" (NOT_FOUND, which clients do not retry).
            raise ModelNotReady(f"model {short(name)!r} is {entry.changing}; retry shortly")
        if slot is None:
            served = sorted(entry.versions) or "none"
            if version == entry.config.default_version:
                raise VersionNotFound(
                    f"model {short(name)!r}: its configured default_version {version} is not "
                    f"served (served: {served}); publish it, or change default_version"
                )
            raise VersionNotFound(
                f"model {short(name)!r} has no served version {version}; served: {served}"
            )
        if slot.loaded is None or slot.state is not State.READY:
            why = f": {slot.reason}" if slot.reason else ""
            raise ModelNotReady(f"model {name!r} version {version} is {slot.state.value}{why}")
        return slot.loaded

    def serving_version(self, name: str) -> int | None:
        """ModelEntry.serving_version (None: the model is not served here)."""
        entry = self.models.get(name)
        return entry.serving_version() if entry is not None else None

    def default_version(self, name: str) -> int | None:
        """The version a request that names none gets without a split (None: none ready)."""
        entry = self.models.get(name)
        return entry.default_version() if entry is not None else None

    async def read_folder(self, read: Callable[..., T], *args: Any) -> T:
        """``read(*args)``, a look at the repository's folders, on a thread of its own pool and
        bounded in time. On the event loop, a slow or hung network mount stalled every
        inference request while a RepositoryIndex, a GetModel or an edit listed a folder; a
        hung one now answers UNAVAILABLE (its thread is left to the mount, and the pool's
        few threads bound how many a hung mount can hold)."""
        future = asyncio.get_running_loop().run_in_executor(self.pools.reads, read, *args)
        try:
            return await asyncio.wait_for(future, READ_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(
                f"the model repository {str(self.repository.root)!r} did not answer within "
                f"{READ_TIMEOUT_S:g} s (a slow or hung network mount?): nothing changed; "
                "check the volume, then try again"
            ) from None

    async def require_model(self, name: str) -> None:
        """NOT_FOUND unless the repository holds ``name``, looked up off the event loop."""
        if not await self.read_folder(self.repository.has_model, name):
            raise ModelNotFound(f"model {short(name)!r} is not in the repository")

    @contextlib.asynccontextmanager
    async def edit_lock(self, name: str) -> AsyncIterator[None]:
        """Held by a management edit of a model's folder from its checks to its write, as the
        registry's own changes hold it: a DeleteModelVersion beside a SetRollout naming that
        version both succeeded, and the split named a version that was gone. Only for a model
        the repository holds: a lock is kept per name, and one made for every name a mistaken
        call named (DeleteModelVersion, SetDefaultVersion of a model that is not there) was
        never removed, so such calls grew the server's memory without bound."""
        await self.require_model(name)
        async with self._model_lock(name):
            yield

    async def follow_edit(self, name: str) -> RepositoryOutcome:
        """Serve what a model's folder says after a management edit (default version, a
        deleted version), unless the model was unloaded on request: an edit does not load it
        again (it did, and with --workers only where the edit was made)."""
        return await run_to_end(self._follow_edit(name))

    async def _follow_edit(self, name: str) -> RepositoryOutcome:
        await self.require_model(name)
        async with self._model_lock(name):
            # Checked under the lock: an unload queued on it ran first, and the edit's sync
            # then loaded the model again.
            if name in self._unloaded_by_request:
                return RepositoryOutcome()
            result = RepositoryOutcome()
            await self._sync_model(name, result, retry_failed=True)
            self._notify()
        await self._follow("load", name)
        return result

    def loaded(self, name: str, version: int) -> LoadedVersion | None:
        """The loaded object behind a version, whatever its state; None when there is none."""
        entry = self.models.get(name)
        slot = entry.versions.get(version) if entry is not None else None
        return slot.loaded if slot is not None else None

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

    # ---- changes ----
    @contextlib.asynccontextmanager
    async def _model_lock(self, name: str) -> AsyncIterator[None]:
        """Hold ``name``'s lock. It is kept only while someone holds it or waits on it: kept
        for every name ever locked, a client that loaded, unloaded and deleted many distinct
        models (or published them under fresh names) grew the server's memory for good."""
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        self._lock_users[name] = self._lock_users.get(name, 0) + 1
        try:
            async with lock:
                yield
        finally:
            left = self._lock_users[name] - 1
            if left:
                self._lock_users[name] = left
            else:  # nobody holds or waits on it: the next user makes a new one
                del self._lock_users[name]
                self._locks.pop(name, None)

    async def _on_disk(self, name: str) -> bool:
        """Is ``name`` a model folder the repository serves from (as ``list_models`` sees it)?"""
        try:
            return await self.read_folder(self.repository.has_model, name)
        except Unavailable:  # a hung mount says nothing about the folder: the model stays
            raise
        except FerryError:  # a link, a name that is not a model's: not one list_models gives
            return False

    async def _follow(self, op: str, name: str) -> None:
        if self.follower is not None:
            await self.follower(op, name)

    async def refresh(
        self, *, retry_failed: bool = True, follow: bool = False
    ) -> RepositoryOutcome:
        """Bring the served set in line with the folder. Each model is synced under its own
        lock, all at once (their loads queue on the loader pool). ``follow``: an explicit
        refresh, which the other worker processes apply too (a periodic poll is each one's)."""
        async with self._refresh_lock:
            result = RepositoryOutcome()
            listed = set(await self.read_folder(self.repository.list_models))
            # A model unloaded on request whose folder is gone is no longer kept unloaded: the
            # names stayed for good, one more for each model unloaded then removed, and a
            # folder made again under that name is a new model, loaded like any other.
            self._unloaded_by_request &= listed
            on_disk = listed - self._unloaded_by_request

            async def remove(name: str) -> None:
                async with self._model_lock(name):
                    if name not in self._unloaded_by_request and await self._on_disk(name):
                        # Judged again under the lock: the listing was read before this waited
                        # on it, and a LoadModel or a publish queued ahead (behind an unload's
                        # drain) served the model again; removed, it answered OK and then
                        # served nothing until something loaded it again.
                        await self._sync_model(name, result, retry_failed)
                        return
                    if self._required is not None:
                        self._required.discard(name)  # removed from the repository
                    await self._unload_model(name, result)

            async def sync(name: str) -> None:
                async with self._model_lock(name):
                    if name in self._unloaded_by_request:  # unloaded while this refresh waited
                        return
                    await self._sync_model(name, result, retry_failed)

            # One model started per loop iteration, not all at once: each sync reads its folder
            # (stats, listings, path resolution) before its load goes to the loader pool, about
            # 0.25 ms a model, and 200 of them started together held the loop for ~100 ms in
            # one iteration, stalling every other model's requests. Their loads still overlap.
            started: list[asyncio.Future[None]] = []
            try:
                for work in (
                    *(remove(name) for name in sorted(set(self.models) - on_disk)),
                    *(sync(name) for name in sorted(on_disk)),
                ):
                    started.append(asyncio.ensure_future(work))
                    await asyncio.sleep(0)
                await asyncio.gather(*started)
            except asyncio.CancelledError:
                for task in started:  # as gather would: a cancelled refresh stops its syncs
                    task.cancel()
                raise
            self._notify()
            if follow:  # a poll's scan (retry_failed off) is followed as one: "poll"
                await self._follow("refresh" if retry_failed else "poll", "")
            return result

    async def load_model(
        self,
        name: str,
        check: Callable[[ModelEntry | None, RepositoryOutcome], None] | None = None,
    ) -> RepositoryOutcome:
        """Load (or reload) ``name``. ``check``: the caller's verdict on the outcome, run under
        the model's lock: judged after it, an unload queued behind the load had run, and a
        load that served the model was answered as if it had found no version to load."""
        return await run_to_end(self._load_model(name, check))

    async def _load_model(
        self, name: str, check: Callable[[ModelEntry | None, RepositoryOutcome], None] | None
    ) -> RepositoryOutcome:
        await self.require_model(name)
        async with self._model_lock(name):
            self._unloaded_by_request.discard(name)
            result = RepositoryOutcome()
            await self._sync_model(name, result, retry_failed=True)
            # Required from now on only once it serves: added before the load, the replica
            # turned NOT_SERVING for the length of every load of a model beside the ones it
            # serves, and stayed so after a load that failed.
            entry = self.models.get(name)
            if self._required is not None and entry is not None and entry.ready_versions():
                self._required.add(name)
            self._notify()
            await self._follow("load", name)
            if check is not None:
                check(self.models.get(name), result)
            return result

    async def unload_model(self, name: str) -> RepositoryOutcome:
        return await run_to_end(self._unload_model_on_request(name))

    async def _unload_model_on_request(self, name: str) -> RepositoryOutcome:
        if name not in self.models:  # before a lock exists for a name no model has
            raise ModelNotFound(f"model {short(name)!r} is not loaded")
        async with self._model_lock(name):
            if name not in self.models:
                raise ModelNotFound(f"model {short(name)!r} is not loaded")
            self._unloaded_by_request.add(name)
            if self._required is not None:
                self._required.discard(name)
            result = RepositoryOutcome()
            await self._unload_model(name, result)
            self._notify()
            await self._follow("unload", name)
            return result

    async def index(self) -> list[IndexEntry]:
        """Every version the registry knows, plus the repository's models it serves no version
        of (never loaded, unloaded on request, or without a valid version), sorted. The folder
        is listed first, off the loop; the served rows are read after it, in one step."""
        try:
            on_disk = await self.read_folder(self.repository.list_models)
        except FailedPrecondition:  # unreadable (a refresh says why): the served rows answer
            on_disk = []
        rows: list[IndexEntry] = []
        for name, why in self.versionless():
            rows.append(IndexEntry(name, None, State.UNLOADED, why))
        for status in self.statuses():
            rows.append(IndexEntry(status.name, status.version, status.state, status.reason))
        for name in on_disk:
            if name not in self.models:
                rows.append(IndexEntry(name, None, State.UNLOADED, "unloaded"))
        rows.sort(key=lambda r: (r.name, r.version or 0))
        return rows

    async def publish(
        self, name: str, staged: Path, commit: Callable[[], int]
    ) -> tuple[int, VersionStatus | None]:
        """Open the staged version, then ``commit`` it (the rename that makes it the next
        version) and serve the session already opened: a published version is opened once.
        A staged model that does not open fails here, before anything becomes visible.
        Returns the version and its status (None when the version policy does not serve it)."""
        async with self._model_lock(name):
            # The folder is read off the event loop (a slow mount stalled every request).
            cfg_sig, config, config_ok = await self.read_folder(
                _model_config, self.repository, name
            )
            loaded = await self._open_staged(name, staged, config)
            try:
                version = await asyncio.to_thread(commit)
            except BaseException:
                await loaded.close(drain=False, releaser=self.pools.loading)
                raise
            loaded.version = version  # opened before the rename gave it its number
            # Served from now on, as a load would: only once published. Taken off before the
            # open, a publish that failed left a model unloaded on request off the list, and
            # the next refresh served what the operator had unloaded.
            self._unloaded_by_request.discard(name)
            # As _scan signs a version (its model file and its own config): signed otherwise,
            # the sync below saw a change and opened every published version a second time.
            # Read off the loop, without the bound: the version is published, and must be served.
            sig = await asyncio.to_thread(_published_signature, self.repository, name, version)
            entry = self.models.get(name)
            if entry is None and config_ok:
                entry = self.models[name] = ModelEntry(name, config, cfg_sig)
            elif entry is None:
                entry = self.models[name] = ModelEntry(name)
            if config_ok and entry.config_signature == cfg_sig and entry.config == config:
                entry.versions[version] = VersionSlot(version, State.READY, "", loaded, sig)
            else:  # the config changed: sync opens it afresh
                await loaded.close(drain=False, releaser=self.pools.loading)
            result = RepositoryOutcome()
            await self._sync_model(name, result, retry_failed=False)
            self._notify()
            await self._follow("load", name)
            status = {s.version: s for s in self.statuses(name)}.get(version)
            return version, status

    async def _open_staged(self, name: str, staged: Path, config: ModelConfig) -> LoadedVersion:
        """Open a staged model, whose failure alone is "does not load": every error of the
        publish was said so, and a repository that refused the new version's folder (a
        permission, a read-only mount) was blamed on the converted model."""
        try:
            return await self._open(name, 0, staged / MODEL_FILE, config)
        except FerryError as exc:
            if exc.kind in (ErrorKind.ALREADY_EXISTS, ErrorKind.LIMIT_EXCEEDED):
                raise
            raise ConversionFailed(f"{_NOT_LOADED}: {exc.message[:500]}") from None
        except Exception as exc:
            raise ConversionFailed(
                f"{_NOT_LOADED}: {type(exc).__name__}: {str(exc)[:500]}"
            ) from None

    async def close(self) -> None:
        async with self._refresh_lock:
            for name in list(self.models):
                async with self._model_lock(name):
                    await self._unload_model(name, RepositoryOutcome())
        self.pools.shutdown()

    # ---- internals ----
    async def _sync_model(self, name: str, result: RepositoryOutcome, retry_failed: bool) -> None:
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name, changing="loading")
        try:
            await self._sync_entry(entry, name, result, retry_failed)
        finally:
            entry.changing = ""
        if not entry.versions and self._required is not None and name not in self._named:
            # No version left to serve (its last one deleted): required only because it served
            # at start, it no longer holds the replica's readiness, as when its folder goes.
            # Kept, DeleteModelVersion of a model's last version turned the whole replica NOT
            # ready, and a load balancer took every other model's traffic off it too.
            self._required.discard(name)

    async def _sync_entry(
        self, entry: ModelEntry, name: str, result: RepositoryOutcome, retry_failed: bool
    ) -> None:
        # The folder is read on a thread: paths resolved, a stat per file, a config or rollout
        # parsed when it changed. On the loop that was ~0.4 ms a model, 200 of them per refresh,
        # every one of them a pause for the requests of the models already served.
        scan = await asyncio.get_running_loop().run_in_executor(
            self.pools.files,
            _scan,
            self.repository,
            name,
            entry.config_signature,
            entry.rollout_signature,
        )
        if scan.read_error:
            self._unreadable(entry, scan.read_error, result, retry_failed)
            return
        if UNREADABLE in entry.policy_error:  # readable again: nothing failed to load
            unread = _still_serving(entry.policy_error)
            for served in list(entry.versions.values()):
                if served.reason == unread:
                    served.reason = ""
        config_changed = scan.config_signature != entry.config_signature
        if config_changed:
            if scan.config_error and any(s.loaded is not None for s in entry.versions.values()):
                # A broken edit of a served model's config: its versions keep serving with the
                # config they were opened with (a typo on disk took a live model down), and
                # the error says why the edit did not apply.
                entry.config_error = scan.config_error
            else:
                entry.config, entry.config_error = scan.config, scan.config_error
            entry.config_signature = scan.config_signature
        on_disk = scan.on_disk
        previous = entry.rollout  # the last one served: kept when an edit cannot be served
        rollout_read = scan.rollout_signature != entry.rollout_signature
        if rollout_read:
            entry.rollout_signature = scan.rollout_signature
            if scan.rollout_error and previous is not None:
                # A broken edit of a live rollout (a typo, a copy caught half written) sent
                # every request to the default version, often the canary: the rollout served
                # before goes on, as for an edit naming versions that differ (_keep_one_interface).
                entry.rollout_error = f"{rollouts.ROLLOUT_FILE} as edited is not served: " + (
                    scan.rollout_error
                )
                log.warning(
                    "model %s: %s; the rollout served before goes on", name, scan.rollout_error
                )
            else:
                entry.rollout, entry.rollout_error = scan.rollout, scan.rollout_error
                if entry.rollout_error:
                    log.warning(
                        "model %s: %s; serving its default version", name, entry.rollout_error
                    )
        wanted = entry.config.version_policy.select(on_disk)
        if entry.rollout is not None:  # a split's versions are served beside the policy's
            wanted = sorted({*wanted, *(v for v in entry.rollout.versions if v in on_disk)})
        # The configured default is served beside the policy's too: with default_version = 1
        # and the default policy (the newest only), every request naming no version failed.
        pinned = entry.config.default_version
        if pinned is not None and pinned in on_disk and pinned not in wanted:
            wanted = sorted({*wanted, pinned})
        by_first = [v for v in on_disk if (name, v) in self._first_kept and v not in wanted]
        if by_first:  # a worker: what the first process keeps serving (follow_kept)
            wanted = sorted({*wanted, *by_first})
        entry.policy_error = ""
        if on_disk and not wanted:
            # A policy naming only versions that are not there (a typo, a version not yet
            # published) unloaded a live model, which then said it had no version folders.
            entry.policy_error = (
                f"its version_policy ({_policy_text(entry.config)}) selects none of the versions "
                f"on disk {on_disk}"
            )
            serving = sorted(v for v, slot in entry.versions.items() if slot.loaded is not None)
            if serving:
                log.warning("model %s: %s; still serving %s", name, entry.policy_error, serving)
                kept = _still_serving(entry.policy_error)
                for v in serving:
                    held = entry.versions[v]
                    if held.reason != kept or retry_failed:
                        result.failed.append(f"{name}/{v}: {entry.policy_error}")
                    held.reason = kept
                return
            log.warning("model %s: %s", name, entry.policy_error)
        loads = []
        # With a rollout, a load is served only once it fits the rollout's other versions
        # (_serve_fitting): a version reloaded from files that take other tensors dropped the
        # split, and every request went to the default version, often the canary.
        staged: dict[int, _Staged] | None = {} if entry.rollout is not None else None
        loading: set[int] = set()
        for v in wanted:
            slot = entry.versions.get(v)
            sig = scan.signatures.get(v)
            if entry.config_error:
                failure = f"{name}/{v}: {entry.config_error}"
                if slot is not None and slot.loaded is not None:
                    kept = _still_serving(entry.config_error)
                    if slot.reason != kept:
                        log.warning("model %s version %s: %s", name, v, kept)
                        slot.reason = kept
                        result.failed.append(failure)
                    elif retry_failed:  # asked again: the answer is the same failure
                        result.failed.append(failure)
                    continue
                if (
                    slot is None
                    or slot.state is not State.FAILED
                    or slot.reason != entry.config_error
                ):
                    entry.versions[v] = VersionSlot(v, State.FAILED, entry.config_error, None, sig)
                    result.failed.append(failure)
                elif retry_failed:
                    result.failed.append(failure)
                continue
            # A changed config reloads every selected version: the ready ones to apply it, the
            # failed ones because the config may have been why they failed.
            if (
                slot is None
                or config_changed
                or (slot.state is State.FAILED and (retry_failed or slot.signature != sig))
                or (slot.loaded is not None and slot.files_seen() != sig)  # its files changed
                # Asked again (a load, a refresh): a reload that failed is tried again, and
                # fails again in the answer. It was not, and LoadModel answered OK while the
                # files on disk did not load and the previous load kept answering.
                or (retry_failed and _reload_failed(slot))
                or self._lifted(name, slot)
            ):
                loading.add(v)
        if loading or rollout_read:
            # A load refused for the rollout is judged again beside any other change: the
            # other side's files replaced to match, or the rollout changed, make it fit.
            loading.update(
                v
                for v in wanted
                if (slot := entry.versions.get(v)) is not None and _ROLLOUT_REFUSED in slot.reason
            )
        for v in sorted(loading):
            sig = scan.signatures.get(v)
            loads.append(
                self._load_version(entry, v, sig, scan.model_file(v), result, staged=staged)
            )
        await asyncio.gather(*loads)
        if staged:
            await self._serve_fitting(entry, staged, result)
        # Also when only the file changed: a hand edit (or a copy) naming versions all loaded
        # already loads nothing, and its split between versions that differ was served.
        if (loads or rollout_read) and entry.rollout is not None:
            self._keep_one_interface(entry, previous if rollout_read else None)
            if entry.rollout is not None:  # the one kept may name versions the edit did not
                wanted = sorted({*wanted, *(v for v in entry.rollout.versions if v in on_disk)})
        # Versions the policy no longer selects go only now, after the new ones loaded: a
        # new version replacing the old one leaves no moment without a served version.
        stale = sorted(set(entry.versions) - set(wanted))
        for v in _kept_serving(entry, wanted, stale, on_disk):
            stale.remove(v)
        for v in stale:
            await self._unload_version(entry, v, result)

    @staticmethod
    def _unreadable(
        entry: ModelEntry, why: str, result: RepositoryOutcome, retry_failed: bool
    ) -> None:
        """A model folder the server cannot list (another user's, mode 0700; a stale network
        mount): this model fails with why, its loaded versions keep serving, and every other
        model is synced as usual. Its PermissionError failed the whole refresh: Refresh
        answered INTERNAL, and at start the server loaded no model at all."""
        changed = entry.policy_error != why
        entry.policy_error = why
        kept = _still_serving(why)
        for slot in list(entry.versions.values()):
            if slot.loaded is not None and slot.reason != kept:
                slot.reason, changed = kept, True
        if changed:
            log.warning("model %s: %s", entry.name, why)
        if changed or retry_failed:
            result.failed.append(f"{entry.name}: {why}")

    async def _load_version(
        self,
        entry: ModelEntry,
        version: int,
        sig: Signature,
        path: Path,
        result: RepositoryOutcome,
        *,
        staged: dict[int, _Staged] | None = None,
    ) -> None:
        """Load a version; with ``staged`` (a model with a rollout), leave a load that opened
        there for ``_serve_fitting`` to serve or refuse."""
        old = entry.versions.get(version)
        if old is None or old.loaded is None:
            entry.versions[version] = VersionSlot(version, State.LOADING, "", None, sig)
        self._notify()
        try:
            elsewhere = self._failed_in_first(entry.name, version, sig)
            if elsewhere:
                raise FailedPrecondition(elsewhere)
            began = time.monotonic()
            try:
                loaded = await self._open(entry.name, version, path, entry.config)
            finally:
                self.longest_load = max(self.longest_load, time.monotonic() - began)
        except Exception as exc:  # any load failure is reported, never raised to the caller
            reason = exc.message if isinstance(exc, FerryError) else f"{type(exc).__name__}: {exc}"
            reason = reason.strip().splitlines()[0][:500] if reason.strip() else repr(exc)
            log.warning("model %s version %s failed to load: %s", entry.name, version, reason)
            if old is not None and old.loaded is not None:
                # A reload failed: keep serving the old session rather than dropping the version.
                old.reason = _still_serving(reason)
                old.tried_signature = sig  # not again at every poll, only after a new change
                result.failed.append(f"{entry.name}/{version}: {reason}")
                return
            entry.versions[version] = VersionSlot(version, State.FAILED, reason, None, sig)
            result.failed.append(f"{entry.name}/{version}: {reason}")
            return
        if staged is not None:
            staged[version] = _Staged(sig, loaded, old)
            return
        await self._serve_load(entry, version, _Staged(sig, loaded, old), result)

    async def _serve_load(
        self, entry: ModelEntry, version: int, load: _Staged, result: RepositoryOutcome
    ) -> None:
        sig, loaded, old = load.signature, load.loaded, load.old
        entry.versions[version] = VersionSlot(version, State.READY, "", loaded, sig)
        self._notify()  # health follows each model as it becomes ready, not the whole refresh
        result.loaded.append(f"{entry.name}/{version}")
        reloaded = old is not None and old.loaded is not None
        log.info(
            "model %s version %s %s (providers %s, max_batch_size %d)",
            entry.name,
            version,
            "reloaded" if reloaded else "loaded",
            ",".join(loaded.session.providers),
            loaded.max_batch_size,
        )
        if old is not None and old.loaded is not None:
            await old.loaded.close(drain=True, releaser=self.pools.loading)

    async def _open(
        self, name: str, version: int, path: Path, config: ModelConfig
    ) -> LoadedVersion:
        """Open on the loader pool: its threads run at a lower priority than serving."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pools.loading, self._create, name, version, path, config
        )

    @property
    def opening(self) -> int:
        """How many model files are being opened on the loader pool now (a load given up by
        a stop still runs there until onnxruntime returns)."""
        with self._opening_lock:
            return self._opening

    def _create(self, name: str, version: int, path: Path, config: ModelConfig) -> LoadedVersion:
        with self._opening_lock:
            self._opening += 1
        try:
            return open_version(
                self._opener,
                name,
                version,
                path,
                config,
                warm_up=self._warm_up,
                executor=self.pools.execution,
            )
        finally:
            with self._opening_lock:
                self._opening -= 1

    async def _unload_version(
        self, entry: ModelEntry, version: int, result: RepositoryOutcome
    ) -> None:
        slot = entry.versions.get(version)
        if slot is None:
            return
        if slot.loaded is not None:
            slot.state = State.UNLOADING
            self._notify()
            await slot.loaded.close(drain=True, releaser=self.pools.loading)
        del entry.versions[version]
        result.unloaded.append(f"{entry.name}/{version}")
        log.info("model %s version %s unloaded", entry.name, version)

    async def _unload_model(self, name: str, result: RepositoryOutcome) -> None:
        entry = self.models.get(name)
        if entry is None:
            return
        entry.changing = "unloading"
        try:
            for v in list(entry.versions):
                await self._unload_version(entry, v, result)
        finally:
            entry.changing = ""
        del self.models[name]


def _policy_text(config: ModelConfig) -> str:
    policy = config.version_policy
    if policy.all:
        return "all"
    if policy.specific:
        return f"specific {list(policy.specific)}"
    return f"latest {policy.latest or 1}"
