"""Which model versions exist, which are served, and in what state.

The registry mirrors the repository folder: ``refresh()`` loads versions that the version policy
selects, unloads the ones it no longer selects (draining their queues first), and retries failed
ones whose files changed. A version that fails to load is FAILED with its reason, and every other
version keeps serving. Sessions are created on worker threads, so loading never blocks inference.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ferry.server.core.config import (
    CONFIG_NAMES,
    ModelConfig,
    apply_version_config,
    load_config,
)
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.repository import MODEL_FILE, ModelRepository
from ferry.server.errors import (
    FerryError,
    ModelNotFound,
    ModelNotReady,
    VersionNotFound,
)
from ferry.server.runtime.session import OrtSession

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"
    UNLOADED = "UNLOADED"


@dataclass
class VersionSlot:
    version: int
    state: State
    reason: str = ""
    loaded: LoadedVersion | None = None
    signature: tuple[float, int] | None = None  # (mtime, size) of model.onnx when last tried


@dataclass
class ModelEntry:
    name: str
    config: ModelConfig = field(default_factory=ModelConfig)
    config_signature: tuple[float, int] | None = None
    config_error: str = ""
    versions: dict[int, VersionSlot] = field(default_factory=dict)

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in self.versions.items() if s.state is State.READY)

    def default_version(self) -> int | None:
        if self.config.default_version is not None:
            return self.config.default_version
        ready = self.ready_versions()
        return ready[-1] if ready else (max(self.versions) if self.versions else None)


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    state: State
    reason: str
    is_default: bool


@dataclass
class RefreshResult:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


Listener = Callable[[], None]


class ModelRegistry:
    def __init__(self, repository: ModelRepository, *, warm_up: bool = True) -> None:
        self.repository = repository
        self.models: dict[str, ModelEntry] = {}
        self._lock = asyncio.Lock()
        self._warm_up = warm_up
        self._listeners: list[Listener] = []
        self._unloaded_by_request: set[str] = set()

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
                f"model {_short(name)!r} is not served here; ListModels shows the served models"
            )
        if not version:
            version = entry.default_version()
            if version is None:
                why = entry.config_error or "no version folders (<model>/<N>/model.onnx)"
                raise ModelNotReady(f"model {name!r} has no version ready: {why}")
        slot = entry.versions.get(version)
        if slot is None:
            raise VersionNotFound(
                f"model {name!r} has no served version {version}; served: "
                f"{sorted(entry.versions) or 'none'}"
            )
        if slot.loaded is None or slot.state is not State.READY:
            why = f": {slot.reason}" if slot.reason else ""
            raise ModelNotReady(f"model {name!r} version {version} is {slot.state.value}{why}")
        return slot.loaded

    def statuses(self, name: str = "") -> list[VersionStatus]:
        if name and name not in self.models:
            raise ModelNotFound(f"model {_short(name)!r} is not served here")
        out = []
        for entry in self.models.values():
            if name and entry.name != name:
                continue
            default = entry.default_version()
            for v, slot in sorted(entry.versions.items()):
                out.append(VersionStatus(entry.name, v, slot.state, slot.reason, v == default))
        return out

    def loaded_versions(self) -> list[LoadedVersion]:
        return [
            s.loaded
            for e in self.models.values()
            for s in e.versions.values()
            if s.loaded is not None and s.state is State.READY
        ]

    def all_ready(self) -> bool:
        """Every selected version finished loading and at least one is READY."""
        slots = [s for e in self.models.values() for s in e.versions.values()]
        return any(s.state is State.READY for s in slots) and not any(
            s.state is State.LOADING for s in slots
        )

    # ---- changes ----
    async def refresh(self, *, retry_failed: bool = True) -> RefreshResult:
        """Bring the served set in line with the folder."""
        async with self._lock:
            result = RefreshResult()
            on_disk = set(self.repository.list_models()) - self._unloaded_by_request
            for name in sorted(set(self.models) - on_disk):
                await self._unload_model(name, result)
            await asyncio.gather(
                *(self._sync_model(name, result, retry_failed) for name in sorted(on_disk))
            )
            self._notify()
            return result

    async def load_model(self, name: str) -> RefreshResult:
        if not self.repository.has_model(name):
            raise ModelNotFound(f"model {_short(name)!r} is not in the repository")
        async with self._lock:
            self._unloaded_by_request.discard(name)
            result = RefreshResult()
            await self._sync_model(name, result, retry_failed=True)
            self._notify()
            return result

    async def unload_model(self, name: str) -> RefreshResult:
        async with self._lock:
            if name not in self.models:
                raise ModelNotFound(f"model {_short(name)!r} is not loaded")
            self._unloaded_by_request.add(name)
            result = RefreshResult()
            await self._unload_model(name, result)
            self._notify()
            return result

    async def close(self) -> None:
        async with self._lock:
            for name in list(self.models):
                await self._unload_model(name, RefreshResult())

    # ---- internals ----
    async def _sync_model(self, name: str, result: RefreshResult, retry_failed: bool) -> None:
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name)
        mdir = self.repository.model_dir(name)
        cfg_sig = _config_signature(mdir)
        config_changed = entry.config_signature != cfg_sig
        if config_changed:
            try:
                entry.config = load_config(mdir)
                entry.config_error = ""
            except FerryError as exc:
                entry.config_error = exc.message
            entry.config_signature = cfg_sig
        try:
            on_disk = self.repository.list_versions(name)
        except FerryError:
            on_disk = []
        wanted = entry.config.version_policy.select(on_disk)
        for v in sorted(set(entry.versions) - set(wanted)):
            await self._unload_version(entry, v, result)
        loads = []
        for v in wanted:
            slot = entry.versions.get(v)
            sig = _file_signature(self.repository.model_file(name, v))
            if entry.config_error:
                if (
                    slot is None
                    or slot.state is not State.FAILED
                    or slot.reason != entry.config_error
                ):
                    if slot is not None and slot.loaded is not None:
                        await self._unload_version(entry, v, result)
                    entry.versions[v] = VersionSlot(v, State.FAILED, entry.config_error, None, sig)
                    result.failed.append(f"{name}/{v}: {entry.config_error}")
                continue
            # A changed config reloads every selected version: the ready ones to apply it, the
            # failed ones because the config may have been why they failed.
            if (
                slot is None
                or config_changed
                or (slot.state is State.FAILED and (retry_failed or slot.signature != sig))
            ):
                loads.append(self._load_version(entry, v, sig, result))
        await asyncio.gather(*loads)

    async def _load_version(
        self, entry: ModelEntry, version: int, sig: tuple[float, int] | None, result: RefreshResult
    ) -> None:
        old = entry.versions.get(version)
        if old is None or old.loaded is None:
            entry.versions[version] = VersionSlot(version, State.LOADING, "", None, sig)
        self._notify()
        path = self.repository.model_file(entry.name, version)
        try:
            loaded = await asyncio.to_thread(self._create, entry.name, version, path, entry.config)
        except Exception as exc:  # any load failure is reported, never raised to the caller
            reason = exc.message if isinstance(exc, FerryError) else f"{type(exc).__name__}: {exc}"
            reason = reason.strip().splitlines()[0][:500] if reason.strip() else repr(exc)
            log.warning("model %s version %s failed to load: %s", entry.name, version, reason)
            if old is not None and old.loaded is not None:
                # A reload failed: keep serving the old session rather than dropping the version.
                old.reason = f"reload failed, still serving previous load: {reason}"
                result.failed.append(f"{entry.name}/{version}: {reason}")
                return
            entry.versions[version] = VersionSlot(version, State.FAILED, reason, None, sig)
            result.failed.append(f"{entry.name}/{version}: {reason}")
            return
        entry.versions[version] = VersionSlot(version, State.READY, "", loaded, sig)
        result.loaded.append(f"{entry.name}/{version}")
        if old is not None and old.loaded is not None:
            await old.loaded.close(drain=True)

    def _create(self, name: str, version: int, path: Path, config: ModelConfig) -> LoadedVersion:
        if not path.is_file():
            raise ModelNotReady(f"{name}/{version}/{MODEL_FILE} is missing")
        config = apply_version_config(config, path.parent)
        session = OrtSession(path, config.onnxruntime)
        if config.batching.max_batch_size is None:
            config = config.with_max_batch_size(32 if session.batchable() else 0)
        elif config.batching.max_batch_size > 0 and not session.batchable():
            raise ModelNotReady(
                f"config sets batching.max_batch_size = {config.batching.max_batch_size} but the "
                "graph's inputs/outputs do not all have a dynamic first dimension; set it to 0"
            )
        if self._warm_up:
            try:
                session.warm_up(1 if config.batching.max_batch_size else 0)
            except Exception as exc:
                log.warning("warm-up of %s/%s failed (serving anyway): %s", name, version, exc)
        return LoadedVersion(name, version, session, config)

    async def _unload_version(self, entry: ModelEntry, version: int, result: RefreshResult) -> None:
        slot = entry.versions.get(version)
        if slot is None:
            return
        if slot.loaded is not None:
            slot.state = State.UNLOADING
            self._notify()
            await slot.loaded.close(drain=True)
        del entry.versions[version]
        result.unloaded.append(f"{entry.name}/{version}")

    async def _unload_model(self, name: str, result: RefreshResult) -> None:
        entry = self.models.get(name)
        if entry is None:
            return
        for v in list(entry.versions):
            await self._unload_version(entry, v, result)
        del self.models[name]


def _file_signature(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


def _config_signature(mdir: Path) -> tuple[float, int] | None:
    for n in CONFIG_NAMES:
        sig = _file_signature(mdir / n)
        if sig is not None:
            return sig
    return None


def _short(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."
