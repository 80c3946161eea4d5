"""What the first process of ``ferry serve --workers N`` judges a worker's answer to a change
on (fleet.WorkerFleet.follow): the versions this process serves that the worker does not, the
ones it serves from an earlier load where this process serves the files on disk, and the ones
it loaded from other files. Pure functions over ``control`` answers, so that the fleet module
keeps to starting, watching and telling the workers."""

from __future__ import annotations

from typing import Any

from ferry.server.workers import control


def still(
    then: dict[str, list[int]] | None, now: dict[str, list[int]] | None
) -> dict[str, list[int]] | None:
    """The versions served both ``then`` and ``now`` (None when either is not known)."""
    if then is None or now is None:
        return None
    return {name: sorted(set(v) & set(now.get(name) or ())) for name, v in then.items()}


def without(
    mine: dict[str, list[int]] | None, these: dict[str, list[int]]
) -> dict[str, list[int]] | None:
    """``mine`` less the versions ``these`` names."""
    if mine is None:
        return None
    return {name: sorted(set(v) - set(these.get(name) or ())) for name, v in mine.items()}


def same_files(
    then: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The versions whose files were the same ``then`` and ``now``."""
    return {
        name: {v: sig for v, sig in versions.items() if (now.get(name) or {}).get(v) == sig}
        for name, versions in then.items()
    }


def lacks(
    mine: dict[str, list[int]] | None,
    answer: object,
    fresh: dict[str, list[int]] | None = None,
) -> str:
    """The versions this process serves that a worker's answer to a change says it does not,
    and those of ``fresh`` (served here from the files on disk) that it serves from an earlier
    load, its reload having failed ("" when none, or when either side did not say)."""
    if mine is None or not isinstance(answer, dict) or not isinstance(answer.get("serving"), dict):
        return ""
    missing = [f"{name} version {v}" for name, v in control.lacking(mine, answer["serving"])]
    theirs_earlier = answer.get("earlier")
    if fresh is not None and isinstance(theirs_earlier, dict):
        # Both serve the version number; only this process serves what is on disk now.
        missing += [
            f"{name} version {v} (it serves its earlier load: its reload failed)"
            for name, versions in sorted(fresh.items())
            for v in sorted(set(versions) & set(theirs_earlier.get(name) or ()))
        ]
    return control.describe(missing)


def other_files(
    answer: object, fresh: dict[str, list[int]] | None, files: dict[str, dict[str, Any]]
) -> str:
    """The versions of ``fresh`` that a worker's answer says it loaded from other files than
    ``files`` (this process's), described ("" when none, or when either side did not say)."""
    theirs = answer.get("files") if isinstance(answer, dict) else None
    if fresh is None or not isinstance(theirs, dict):
        return ""
    both = {
        name: {v: sig for v, sig in versions.items() if int(v) in (fresh.get(name) or ())}
        for name, versions in files.items()
    }
    return control.describe(
        [
            f"{name} version {v} ({control.OTHER_FILES})"
            for name, v in control.other_files(both, theirs)
        ]
    )


def newer_files(
    answer: object, behind: dict[str, list[int]] | None, files: dict[str, dict[str, Any]]
) -> str:
    """The versions of ``behind`` (this process serves them from an earlier load, its reload
    having failed) that a worker's answer says it serves from other files than that load's,
    and not from an earlier load of its own: it loaded files this process could not, a copy
    that finished between the two reads, and answers with other weights under the same
    version number. Described ("" when none, or when either side did not say)."""
    theirs_earlier = answer.get("earlier") if isinstance(answer, dict) else None
    if behind is None or not isinstance(theirs_earlier, dict):
        return ""
    own = {
        name: [v for v in versions if v not in (theirs_earlier.get(name) or ())]
        for name, versions in behind.items()
    }
    return other_files(answer, own, files)


def loaded_what_failed(
    mine: dict[str, list[int]] | None, answer: object, failed: list[list[Any]]
) -> str:
    """The versions whose load failed in this process (``failed``: Registry.failed_loads rows,
    [name, version, why, signature]) and which it does not serve, that a worker's answer says
    it serves from other files than those that failed: it read whole what this process read
    half copied, and answers a version this process refuses (and, as the newest, requests that
    name none). Described ("" when none, or when either side did not say)."""
    theirs = answer.get("files") if isinstance(answer, dict) else None
    if mine is None or not isinstance(theirs, dict):
        return ""
    found = []
    for row in failed:
        name, version, sig = str(row[0]), int(row[1]), row[3]
        if version in (mine.get(name) or ()):
            continue  # served here from an earlier load: newer_files judges it
        got = (theirs.get(name) or {}).get(str(version))
        if got is not None and (not isinstance(got, list) or not got or got[0] != sig):
            found.append(
                f"{name} version {version} (its load failed in the first process on "
                "files, or a config, that changed on disk since)"
            )
    return control.describe(found)
