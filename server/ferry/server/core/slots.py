"""A model's entry in the registry and its version slots, and the reasons a slot carries
that the registry's rules read back: a version kept serving beside a policy that did not load,
a reload that failed while the earlier load serves, a load that failed in the first worker
process."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ferry.server.core import rollout as rollouts
from ferry.server.core.config import ModelConfig
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.types import State, VersionStatus

# The registry's logger, as before the split: the name is in every log line (server.logs).
log = logging.getLogger("ferry.server.core.registry")


# A file's or a folder's files' stat (_file_signature): what a refresh compares to see a change.
Signature = tuple[Any, ...] | None


@dataclass
class VersionSlot:
    version: int
    state: State
    reason: str = ""
    loaded: LoadedVersion | None = None
    # The stat signature (_file_signature) of model.onnx, of the version's own config and of
    # its external weights (model.onnx.data) as loaded: what it serves (a shadow comparison's
    # key reads it), or for a version that is not loaded, the files last tried
    signature: Signature = None
    # The files whose reload failed while this one keeps serving its earlier load (None: no
    # such failure): not tried again at every poll, only after a new change. Written into
    # ``signature`` it changed the shadow comparison's key and dropped the figures collected,
    # though the same files still served.
    tried_signature: Signature = None

    def files_seen(self) -> Signature:
        """The files a refresh compares with what is on disk: the last ones tried."""
        return self.signature if self.tried_signature is None else self.tried_signature


@dataclass
class ModelEntry:
    name: str
    config: ModelConfig = field(default_factory=ModelConfig)
    config_signature: Signature = None
    config_error: str = ""
    # Why nothing new is served though the folder is there (read each sync): a version policy
    # that selects none of the versions on disk, a folder the server cannot read
    policy_error: str = ""
    versions: dict[int, VersionSlot] = field(default_factory=dict)
    rollout: rollouts.Rollout | None = None  # the live split (core.rollout), None: default only
    rollout_error: str = ""
    rollout_signature: str | None = None  # its content's digest (core.rollout.signature)
    # "loading" from a new entry until its first versions are in place, "unloading" while an
    # unload empties it: a request in between must not be told the folder has no versions.
    changing: str = ""

    def unserved_reason(self) -> str:
        """Why no version is served, for a model with none: said alike by a request for it
        and by the repository index (which gave an empty reason where the folder had no
        versions, say once the last one was deleted)."""
        return (
            self.config_error or self.policy_error or "no version folders (<model>/<N>/model.onnx)"
        )

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in list(self.versions.items()) if s.state is State.READY)

    def default_version(self) -> int | None:
        """The configured version, else the newest READY one, else the newest known. Asked
        for every request that names no version, so it scans without sorting."""
        if self.config.default_version is not None:
            return self.config.default_version
        newest = None
        for v, s in list(self.versions.items()):
            if s.state is State.READY and (newest is None or v > newest):
                newest = v
        if newest is not None:
            return newest
        return max(self.versions) if self.versions else None

    def serving_version(self) -> int | None:
        """The version that describes the model to a client that names none: with a live
        split, its largest ready share (ties: the newest), else ``default_version``. Metadata
        and the default flag described the newest version while a pin sent every request to
        another."""
        if self.rollout is not None and self.rollout.split:
            ready = {v for v, s in list(self.versions.items()) if s.state is State.READY}
            best = max(((w, v) for v, w in self.rollout.split if v in ready), default=None)
            if best is not None:
                return best[1]
        return self.default_version()


_KEPT = "kept serving"


def _kept_serving(
    entry: ModelEntry, wanted: list[int], stale: list[int], on_disk: list[int]
) -> list[int]:
    """The versions the policy no longer selects that keep serving, with why: the READY ones
    still on disk, when none of the versions it selects is READY. A broken or half-copied new
    version (latest = 1) unloaded the one serving, and a typo on disk took a live model down;
    it goes once a version the policy selects loads. A version deleted from disk goes anyway."""
    ready = False
    for v in wanted:
        slot = entry.versions.get(v)
        if slot is not None and slot.state is State.READY:
            ready = True
            if slot.reason.startswith(_KEPT):  # selected again (a policy edit): just served
                slot.reason = ""
    if ready:
        return []
    kept = [v for v in stale if v in on_disk and entry.versions[v].state is State.READY]
    if kept:
        failed = [v for v in wanted if v in entry.versions]
        why = f"{_KEPT}: version(s) {failed} of the version policy did not load"
        for v in kept:
            if entry.versions[v].reason != why:
                log.warning("model %s version %s: %s", entry.name, v, why)
                entry.versions[v].reason = why
    return kept


_STILL_SERVING = "reload failed, still serving previous load: "
# Why a load that opened is not served: it does not fit the model's rollout (_serve_fitting).
_ROLLOUT_REFUSED = "its files do not fit the rollout"


@dataclass
class _Staged:
    """A version's load that opened, before ``_serve_fitting`` serves or refuses it."""

    signature: Signature
    loaded: LoadedVersion
    old: VersionSlot | None


def _still_serving(why: str) -> str:
    """A served version's reason when a reload of it failed and it serves as loaded before."""
    return f"{_STILL_SERVING}{why}"


def serves_earlier_load(status: VersionStatus) -> bool:
    """Does a READY version serve the load made before its files changed, whose reload failed
    (``_reload_failed``)? Its version number is served, but not what is on disk."""
    return status.state is State.READY and status.reason.startswith(_STILL_SERVING)


def _reload_failed(slot: VersionSlot) -> bool:
    """Does ``slot`` serve an earlier load because its files changed and failed to load?"""
    return slot.loaded is not None and slot.reason.startswith(_STILL_SERVING)


_FIRST = "its load failed in the first worker process"


def _failed_first(why: str) -> str:
    return f"{_FIRST}, whose outcome every worker follows: {why}"


def _plain(sig: Signature) -> Any:
    """A signature as it reads after a trip through JSON (the control channel's): the first
    process's and a worker's compare equal when their files are the same."""
    return json.loads(json.dumps(sig))
