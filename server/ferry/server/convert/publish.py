"""Turning a finished job's staging folder into a served version.

The folder is opened in onnxruntime with the serving config it will have *before* the rename,
because a published version is immutable and visible at once: a graph that cannot be served must
fail the job, not become the model's newest version.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from ferry.server.core import rollout as rollouts
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import (
    MODEL_FILE,
    VERSION_CONFIG_FILE,
    ModelRepository,
    repository_edit,
    write_file_atomic,
)
from ferry.server.core.types import State
from ferry.server.errors import FailedPrecondition, FerryError, InternalError

log = logging.getLogger("ferry.convert")

# The history entry of the pin a shadow publish sets first; the last entry only when the
# publish did not finish (stopped by a restart): see ``interrupted_pin``.
PIN_REASON = "pinned while a candidate is published"
# In the job's folder, written just before the rename: see ``note_publishing``.
PUBLISHING_FILE = "publishing.json"


async def publish(
    repository: ModelRepository,
    registry: ModelRegistry,
    model: str,
    staged: Path,
    serving_config: dict[str, Any],
    *,
    rollout: str = "",
    rollout_fraction: float = 0.1,
    by: str = "conversion",
) -> tuple[int, str]:
    """Publish ``staged`` as the model's next version and serve it; returns the version and a
    note for the job's message when the new version is not served.

    The registry opens the staged model with the config it will be served with *before* the
    rename (a published version is immutable and visible at once, so a graph that cannot be
    served must fail the job), and then serves that same session: one session per publish."""
    with repository_edit(f"the serving config of {model!r}'s new version"):
        await asyncio.to_thread(_prepare, staged, serving_config)
    current = _serving_version(registry, model) if rollout == "shadow" else None
    before: rollouts.Rollout | None = None
    expected: rollouts.Rollout | None = None
    live: tuple[tuple[int, float], ...] = ()
    pinned = False  # this publish set a pin, which goes again if nothing is published
    if current is not None:
        # Pinned first: under the version policy the new version would take the traffic the
        # moment it is published; pinned, the versions serving now keep it until a rule or a
        # person promotes the candidate. A live split is that pin as it stands: pinning only
        # the default version ended a {1: 0.9, 2: 0.1} canary without anyone asking.
        before = registry.rollout_of(model)[0]
        live = before.split if before is not None else ()
        if not live:
            live, pinned = ((current, 1.0),), True
            pin = rollouts.Rollout(live)
            await registry.set_rollout(model, pin, by=by, why=PIN_REASON)
        # The rollout this publish leaves in force until it adds its shadow (or removes its
        # pin): a person's change made meanwhile (the new version loads for seconds) wins, and
        # is never overwritten with the split read before it (an ended canary came back).
        expected = registry.rollout_of(model)[0]

    def commit() -> int:
        # The repository's refusal of the rename (a full disk, a read-only mount, a
        # permission) is said as such, not as a model that does not load (registry.publish).
        with repository_edit(f"the new version of {model!r}"):
            return repository.publish(model, staged)

    try:
        version, status = await registry.publish(model, staged, commit)
    except BaseException:
        if pinned:
            # Nothing was published: the pin goes, or it would hold every later version
            # (published without a shadow) away from the traffic.
            try:
                await registry.set_rollout(
                    model,
                    before,
                    by=by,
                    why="the candidate was not published; pin removed",
                    decided_on=expected,
                )
            except Exception as exc:  # the publish's own error is the one to report
                log.warning("model %s: the shadow pin was not removed: %s", model, exc)
        raise
    if current is not None:
        # A live split keeps its rule too: dropped, a canary's max_error_rate stopped rolling
        # a failing version out of the split the moment a shadow candidate was converted.
        # The rules a person set for another candidate are not carried to this one.
        kept = before.rules.max_error_rate if before is not None and before.split else 0.0
        shadowed = rollouts.Rollout(
            live, (version, rollout_fraction), rollouts.Rules(max_error_rate=kept)
        )
        try:
            await registry.set_rollout(
                model,
                shadowed,
                by=by,
                why=f"version {version} published as a shadow candidate",
                decided_on=expected,
            )
        except FailedPrecondition as exc:  # e.g. another interface: published, not shadowed
            return version, (
                f" but not as a shadow candidate ({exc.message}); the versions serving now "
                f"keep every request (ferry models rollout {model})"
            )
        serving = (
            f"version {live[0][0]} keeps"
            if len(live) == 1
            else "the split " + ", ".join(f"{v}: {w:g}" for v, w in live) + " keep"
        )
        return version, (
            f" as a shadow candidate: {serving} serving, "
            f"{rollout_fraction:.0%} of requests also run on version {version} "
            f"(ferry models rollout {model})"
        )
    if rollout == "shadow":
        note = " (no version was serving, so it serves directly rather than as a shadow)"
    elif status is None:
        note = " (not served: the model's version_policy does not select it)"
    elif status.state is State.FAILED:
        note = f" (but loading it failed: {status.reason})"
    else:
        note = _split_note(registry, model, version)
    return version, note


def _split_note(registry: ModelRegistry, model: str, version: int) -> str:
    """A live split decides where requests go: the job said "published" while every request
    went on to the split's versions, and nothing said why."""
    try:
        live = registry.rollout_of(model)[0]
    except FerryError:
        return ""
    if live is None or not live.split or version in dict(live.split):
        return ""
    shares = ", ".join(f"{v}={w:g}" for v, w in live.split)
    return (
        f" (takes no traffic yet: the live split {shares} decides which version answers "
        f"requests that name none; ferry models rollout {model} {version}=1, or --end)"
    )


def _serving_version(registry: ModelRegistry, model: str) -> int | None:
    """The version requests that name none get now (None: nothing serves)."""
    try:
        return registry.get(model).version
    except FerryError:
        return None


def _prepare(staged: Path, serving_config: dict[str, Any]) -> None:
    """Write the serving config the job asked for.

    The folder already holds only what a version may (``jobs.keep_version_files`` ran when the
    child exited, before the server read anything from it)."""
    if not (staged / MODEL_FILE).is_file():
        raise InternalError(f"the conversion process exited 0 without writing {MODEL_FILE}")
    if serving_config:
        text = json.dumps(serving_config, indent=2, sort_keys=True) + "\n"
        write_file_atomic(staged / VERSION_CONFIG_FILE, text.encode())


def note_publishing(job_dir: Path, staged: Path) -> None:
    """Record, before the rename that makes ``staged`` a version, which folder and model file
    it is (device and inode: a rename keeps both). A server killed between that rename and the
    job's SUCCEEDED row reported a serving version as FAILED "convert again", and converting
    again published it twice; a restart reads this note (``published_version``) instead."""
    ids = {"folder": _identity(staged), "model": _identity(staged / MODEL_FILE)}
    try:
        write_file_atomic(job_dir / PUBLISHING_FILE, json.dumps(ids).encode())
    except OSError as exc:  # the state disk (full): a finished conversion still publishes
        log.warning(
            "%s: not written (%s); were the server killed during this publish, its next start "
            "would report the job FAILED although its version was published",
            job_dir / PUBLISHING_FILE,
            exc,
        )


def published_version(repository: ModelRepository, model: str, job_dir: Path) -> int:
    """The version the job's staging folder became before a restart stopped the job (the
    version whose folder and model file are the ones ``note_publishing`` recorded); 0 when
    the job had not reached the rename, or the note cannot be read."""
    try:
        ids = json.loads((job_dir / PUBLISHING_FILE).read_text(encoding="utf-8"))
        folder, model_file = tuple(ids["folder"]), tuple(ids["model"])
        numbers = repository.list_versions(model)
    except (OSError, ValueError, KeyError, TypeError, FerryError):
        return 0
    for version in numbers:
        vdir = repository.version_dir(model, version)
        try:
            if _identity(vdir) == folder and _identity(vdir / MODEL_FILE) == model_file:
                return version
        except OSError:
            continue
    return 0


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def interrupted_pin(repository: ModelRepository, model: str, candidate: int = 0) -> str:
    """A warning when ``model``'s rollout still holds the pin of a shadow publish that a
    restart stopped ('' when not). The pin stays: ending it would send every request to a
    candidate nobody compared; said at start-up, it is not a silent reason for a later
    version to take no traffic."""
    try:
        entries = rollouts.history(repository.model_dir(model))
    except FerryError:
        return ""
    if not entries or entries[-1].get("why") != PIN_REASON:
        return ""
    split = ", ".join(f"{v}={w}" for v, w in dict(entries[-1].get("split") or {}).items())
    return (
        f"model {model}: a shadow publish stopped by the restart left its pin ({split}): those "
        f"versions keep every request; shadow the new version (ferry models rollout {model} "
        f"--shadow {candidate or 'N'}=0.1) or end the pin (ferry models rollout {model} --end)"
    )
