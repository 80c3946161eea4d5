"""Which model versions exist, which are served, and in what state.

The registry mirrors the repository folder: ``refresh()`` loads versions that the version policy
selects, unloads the ones it no longer selects (draining their queues first), and retries failed
ones whose files changed. A version that fails to load is FAILED with its reason, and every other
version keeps serving.

One model's business never holds up another's: sessions are created and freed on the loader pool
(core.pools, lower CPU priority), and each model has its own lock, so a management call on one
model never waits behind a refresh that is loading others (one refresh runs at a time).

ModelRegistry is the facade callers import; its parts live beside it: the entry and slot types
(core.slots), the folder scan and signatures (core.scan), one model's sync (core.sync), rollout
routing (core.routing), following the fleet's first process (core.following), health and
status (core.health), and management edits run to their end (core.edits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ferry.server.core.config import ModelConfig
from ferry.server.core.edits import run_to_end
from ferry.server.core.following import FleetFollowing
from ferry.server.core.health import HealthReporting
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.pools import ThreadPools
from ferry.server.core.repository import (
    MODEL_FILE,
    ModelRepository,
)
from ferry.server.core.routing import RolloutRouting
from ferry.server.core.scan import (
    _model_config,
    _published_signature,
)
from ferry.server.core.slots import (
    ModelEntry,
    Signature,
    VersionSlot,
    serves_earlier_load,
)
from ferry.server.core.sync import VersionSync
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


class ModelRegistry(RolloutRouting, FleetFollowing, VersionSync, HealthReporting):
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
