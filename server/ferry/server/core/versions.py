"""Managing a model's versions: what is on disk and served, deleting one, choosing the default.

The default version lives in the model's own config file (``config.toml`` or ``config.json``),
which stays the one source of truth the registry reads; it is edited in place and replaced
atomically. A TOML file is edited as text (only the top-level ``default_version`` and
``version_policy`` lines), so its comments and layout survive, and the result is parsed back
before it replaces the original: an edit that would not parse is refused, never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ferry.server.core import rollout as rollouts
from ferry.server.core.config import ModelConfig, find_config_file, load_config, parse_config
from ferry.server.core.registry import ModelRegistry, State, run_to_end
from ferry.server.core.repository import (
    MODEL_DATA_FILE,
    MODEL_FILE,
    VERSION_CONFIG_FILE,
    ModelRepository,
    read_report,
    repository_edit,
    validate_version,
    write_file_atomic,
)
from ferry.server.errors import (
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    LimitExceeded,
    ModelNotFound,
)


@dataclass(frozen=True)
class VersionView:
    version: int
    state: str  # a registry State value; UNLOADED when on disk but not selected
    reason: str
    is_default: bool
    size_bytes: int
    report_json: str


@dataclass(frozen=True)
class ModelView:
    name: str
    default_version: int  # 0: none
    versions: list[VersionView]
    reason: str = ""  # why no version is listed, when none is (the repository index's words)


async def describe(repository: ModelRepository, registry: ModelRegistry, name: str) -> ModelView:
    """The model's versions on disk and served. The folder is read off the event loop (a slow
    network mount stalled every inference request while GetModel listed it), the registry's
    state after it, in one step."""
    entry = registry.models.get(name)
    known = list(entry.versions) if entry is not None else []
    there, on_disk, files = await registry.read_folder(_read_versions, repository, name, known)
    entry = registry.models.get(name)
    if not there and entry is None:
        # A folder with no version, not yet known to the registry, is a model all the same
        # (the index lists it): it was NOT_FOUND, "not in the repository", beside it.
        raise ModelNotFound(f"model {name!r} is not in the repository")
    default = (entry.serving_version() if entry is not None else None) or 0
    slots = entry.versions if entry is not None else {}
    selected: set[int | None] = set()
    if entry is not None:  # what a sync serves: the policy's, the default, the rollout's
        selected = {*entry.config.version_policy.select(on_disk), entry.config.default_version}
        selected.update(entry.rollout.versions if entry.rollout is not None else ())
    views = []
    for v in sorted(set(on_disk) | set(slots)):
        slot = slots.get(v)
        size, report = files.get(v, (0, ""))  # not there: served since the read, not on disk
        views.append(
            VersionView(
                version=v,
                state=slot.state.value if slot is not None else State.UNLOADED.value,
                reason=slot.reason if slot is not None else _unloaded(registry, name, v, selected),
                is_default=v == default,
                size_bytes=size,
                report_json=report,
            )
        )
    # Said as the repository index says it: a model whose version folders were all deleted
    # was answered with no version and no word of why.
    reason = "" if views else dict(registry.versionless(name)).get(name, "unloaded")
    return ModelView(name, default, views, reason)


def _read_versions(
    repository: ModelRepository, name: str, known: list[int]
) -> tuple[bool, list[int], dict[int, tuple[int, str]]]:
    """Whether the model's folder is there, the versions on disk, and the size and report of
    those and of ``known`` ones."""
    there = repository.has_model(name)
    on_disk = repository.list_versions(name) if there else []
    files = {}
    for v in {*on_disk, *known}:
        vdir = repository.version_dir(name, v)
        try:
            size = (vdir / MODEL_FILE).stat().st_size
        except OSError:
            size = 0
        with contextlib.suppress(OSError):  # a model over 2 GiB: its weights are beside it
            size += (vdir / MODEL_DATA_FILE).stat().st_size
        files[v] = (size, read_report(vdir))
    return there, on_disk, files


def _unloaded(registry: ModelRegistry, name: str, version: int, selected: set[int | None]) -> str:
    """Why a version on disk is not served. Every such version was said to be "not selected by
    the version policy", also those of a model unloaded on request (which the policy selects)
    and one copied in since the last refresh."""
    if name in registry.unloaded_by_request:
        return "the model was unloaded on request (LoadModel, or ferry models load, serves it)"
    if name not in registry.models or version in selected:
        return "not loaded yet: a refresh (or LoadModel) loads it"
    return "not selected by the version policy"


async def delete_version(
    repository: ModelRepository, registry: ModelRegistry, name: str, version: int
) -> None:
    """Remove the folder (an atomic rename first, so no reader ever sees half of it), then let
    the registry drop the version: in-flight requests finish on the session already in memory.
    Run to its end if the caller leaves: a folder removed but not followed stayed served."""
    await run_to_end(_delete(repository, registry, name, version))


async def _delete(
    repository: ModelRepository, registry: ModelRegistry, name: str, version: int
) -> None:
    try:
        async with registry.edit_lock(name):
            # Checked off the event loop (a slow mount stalled every request), under the lock.
            await registry.read_folder(_check_delete, repository, name, version)
            with repository_edit(f"the removal of {name}/{version}"):
                await asyncio.to_thread(repository.delete_version, name, version)
    except LimitExceeded:
        # A full disk that took the version's files but not the mark of its number: the
        # version is gone all the same, and must not stay served until the next refresh.
        if not await registry.read_folder(lambda: repository.version_dir(name, version).exists()):
            await registry.follow_edit(name)
        raise
    await registry.follow_edit(name)


def _check_delete(repository: ModelRepository, name: str, version: int) -> None:
    """Refuse a deletion of a version that is the default or in the rollout."""
    repository.require_version(name, validate_version(version))
    config = _model_config(repository.model_dir(name))
    if config.default_version == version:
        raise FailedPrecondition(
            f"version {version} is {name!r}'s configured default_version: set another default "
            "(or 0 to clear it) with SetDefaultVersion first"
        )
    live, _ = rollouts.read(repository.model_dir(name))
    if live is not None and version in live.versions:
        # Deleting it would leave the split naming a version that is gone (its traffic then
        # went to whatever took the number next).
        raise FailedPrecondition(
            f"version {version} is in {name!r}'s rollout (split or shadow): change or end the "
            "rollout first (SetRollout / ferry models rollout)"
        )
    left = [v for v in repository.list_versions(name) if v != version]
    newest = max(config.version_policy.select(left), default=None)
    _keep_shadow_off_traffic(live, name, config.default_version or newest, f"deleting {version}")


async def set_default_version(
    repository: ModelRepository, registry: ModelRegistry, name: str, version: int
) -> None:
    """Write ``default_version`` (0 clears it). When the version policy is ``latest = N`` and
    would not serve that version, N grows to include it, since a default that is not loaded
    would fail every request that names no version. Run to its end if the caller leaves."""
    await run_to_end(_set_default(repository, registry, name, version))


async def _set_default(
    repository: ModelRepository, registry: ModelRegistry, name: str, version: int
) -> None:
    async with registry.edit_lock(name):
        # Read and checked off the event loop (a slow mount stalled every request).
        target, text = await registry.read_folder(_default_edit, repository, name, version)
        with repository_edit(f"{name}/{target.name}"):
            await asyncio.to_thread(write_file_atomic, target, text.encode("utf-8"))
    await registry.follow_edit(name)


def _default_edit(repository: ModelRepository, name: str, version: int) -> tuple[Path, str]:
    """The config file to write, and its text with ``default_version`` set (or cleared)."""
    mdir = repository.model_dir(name)
    if not mdir.is_dir():
        raise ModelNotFound(f"model {name!r} is not in the repository")
    on_disk = repository.list_versions(name)
    policy_value = None
    # Read first, whatever the edit: clearing the default (0) read the file only to edit it,
    # and a config.json that is not JSON, or a config.toml that is not UTF-8, answered INTERNAL.
    policy = _model_config(mdir).version_policy
    if version:
        repository.require_version(name, validate_version(version))
        if version not in policy.select(on_disk):
            if policy.specific:
                raise FailedPrecondition(
                    f"{name!r}'s version_policy serves only versions {list(policy.specific)}: "
                    f"add {version} to it in the model's config file first"
                )
            policy_value = sum(1 for v in on_disk if v >= version)
    live, _ = rollouts.read(mdir)
    if live is not None and live.shadow is not None and not live.split:
        after = version
        if not after:  # cleared: the newest version the policy serves
            after = max(policy.select(on_disk), default=0)
        what = f"making {version} the default" if version else "clearing the default version"
        _keep_shadow_off_traffic(live, name, after, what)
    path = find_config_file(mdir)
    if path is not None and path.suffix == ".toml":
        text = _edit_toml(path.read_text(encoding="utf-8-sig"), "default_version", version or None)
        if policy_value is not None:
            text = _edit_toml(text, "version_policy", f"{{ latest = {policy_value} }}")
        target = path
    else:
        raw = json.loads(path.read_text(encoding="utf-8-sig")) if path is not None else {}
        if not isinstance(raw, dict):
            raise FailedPrecondition(f"{name}/config.json does not hold an object: fix it first")
        raw.pop("default_version", None)
        if version:
            raw["default_version"] = version
        if policy_value is not None:
            raw["version_policy"] = {"latest": policy_value}
        text = json.dumps(raw, indent=2, sort_keys=True) + "\n"
        target = mdir / VERSION_CONFIG_FILE
    _check_edit(text, target, version)
    return target, text


def _model_config(mdir: Path) -> ModelConfig:
    """The model's config as the edit's checks need it. A file that does not parse is the
    repository's state, not the request's fault: it was INVALID_ARGUMENT (the call itself was
    fine, and a client told so does not retry after the file is fixed)."""
    try:
        return load_config(mdir)
    except InvalidArgument as exc:
        raise FailedPrecondition(
            f"{exc.message}; fix the model's config file first (nothing was changed)"
        ) from None


def _keep_shadow_off_traffic(
    live: rollouts.Rollout | None, name: str, default_after: int | None, what: str
) -> None:
    """Refuse an edit after which the shadow candidate of a rollout with no split would be the
    default version: it would answer every request that names none, unjudged by the rules and
    promoted by no one (the shadow then compared it with itself, and GetRollout only said so
    afterwards). Promote it (a split naming it), or end the shadow, first."""
    if live is None or live.shadow is None or live.split:
        return
    candidate = live.shadow[0]
    if default_after == candidate:
        raise FailedPrecondition(
            f"{what} would make version {candidate}, the shadow candidate of {name!r}, the version "
            "every request that names none gets: promote it with a split naming it, or end the "
            "shadow, first (SetRollout / ferry models rollout)"
        )


_TABLE = re.compile(r"^\s*\[")


def _edit_toml(text: str, key: str, value: int | str | None) -> str:
    """Set (or with None remove) a top-level ``key = value`` line, before the first table."""
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if _TABLE.match(line)), len(lines))
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    found = [i for i in range(end) if pattern.match(lines[i])]
    if not found and any(re.match(rf"^\s*\[\s*{re.escape(key)}\s*\]", line) for line in lines):
        raise FailedPrecondition(
            f"the model's config.toml sets [{key}] as a table; edit it by hand or write it as "
            f"a top-level `{key} = ...` line"
        )
    new = f"{key} = {value}\n"
    if found:
        if value is None:
            del lines[found[0]]
        else:
            lines[found[0]] = new
    elif value is not None:
        if end and not lines[end - 1].endswith("\n"):
            lines[end - 1] += "\n"
        lines.insert(end, new)
    return "".join(lines)


def _check_edit(text: str, target: Path, version: int) -> None:
    where = f"{target.parent.name}/{target.name}"
    try:
        raw = tomllib.loads(text) if target.suffix == ".toml" else json.loads(text)
        config = parse_config(raw, where=where)
    except (ValueError, FerryError) as exc:
        why = exc.message if isinstance(exc, FerryError) else str(exc)
        raise FailedPrecondition(
            f"cannot set the default version: {where} would not parse after the edit ({why}); "
            "edit it by hand"
        ) from None
    if (config.default_version or 0) != version:
        raise InvalidArgument(f"{where}: default_version did not take; edit it by hand")
