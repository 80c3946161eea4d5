"""The sync of one model's versions with its folder: what its config, version policy and
rollout select is loaded (on the loader pool), served once it fits, and what they no longer
select is unloaded after; a load that fails leaves its version FAILED, or serving its earlier
load.

A mixin of ModelRegistry (core.registry), which holds the state it changes; the declarations
under TYPE_CHECKING name it, and the rollout and fleet rules it calls, for the type checker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.server.core import rollout as rollouts
from ferry.server.core.config import ModelConfig
from ferry.server.core.loaded import LoadedVersion, open_version
from ferry.server.core.pools import ThreadPools
from ferry.server.core.repository import UNREADABLE, ModelRepository
from ferry.server.core.scan import _scan
from ferry.server.core.slots import (
    _ROLLOUT_REFUSED,
    ModelEntry,
    Signature,
    VersionSlot,
    _kept_serving,
    _reload_failed,
    _Staged,
    _still_serving,
)
from ferry.server.core.types import Opener, RepositoryOutcome, State
from ferry.server.errors import FailedPrecondition, FerryError

# The registry's logger, as before the split: the name is in every log line (server.logs).
log = logging.getLogger("ferry.server.core.registry")


class VersionSync:
    """The loading side of ModelRegistry: one model's versions brought in line with its folder."""

    if TYPE_CHECKING:
        repository: ModelRepository
        pools: ThreadPools
        models: dict[str, ModelEntry]
        longest_load: float
        _opener: Opener
        _warm_up: bool
        _required: set[str] | None
        _named: set[str]
        _first_kept: set[tuple[str, int]]
        _opening: int
        _opening_lock: threading.Lock

        def _notify(self) -> None: ...

        def _lifted(self, name: str, slot: VersionSlot) -> bool: ...

        def _failed_in_first(self, name: str, version: int, sig: Signature) -> str: ...

        def _keep_one_interface(
            self, entry: ModelEntry, previous: rollouts.Rollout | None
        ) -> None: ...

        async def _serve_fitting(
            self, entry: ModelEntry, staged: dict[int, _Staged], result: RepositoryOutcome
        ) -> None: ...

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
