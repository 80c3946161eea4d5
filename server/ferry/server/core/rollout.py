"""A model's rollout: live traffic split between versions, kept with the repository.

``<model>/rollout.json`` holds the split (version -> weight) and the history of every change
(when, by whom, why). It lives in the repository folder, so every worker process and every
replica that serves the repository applies the same split, and a restart resumes it. The file
is read when the model is synced (a refresh, a poll, a load), without reloading any session.

A request that names a version bypasses the split. Otherwise its version is chosen from a hash
of the model name and the request's id, so a client that retries with the same id lands on the
same version; a request without an id is placed at random.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.codec import datatype_name
from ferry.server.core.repository import (
    MAX_VERSION,
    VERSION_RE,
    folder_in_place,
    read_head,
    write_file_atomic,
)
from ferry.server.core.types import TensorSpec
from ferry.server.errors import FailedPrecondition, InvalidArgument

ROLLOUT_FILE = "rollout.json"
MAX_VERSIONS = 16
MAX_WEIGHT = 1e9
MAX_HISTORY = 200  # the oldest entries go first; the split itself is never lost
MAX_FILE = 1 << 20
MAX_REASON = 500
MAX_COMPARISON_ID = 64
# Failed requests a split's rule remembers, to count a repeated one once (the oldest go first)
MAX_FAILED_SEEN = 4096


@dataclass(frozen=True)
class Rules:
    """When a shadowed candidate is promoted or dropped without anyone asking (0: no rule).

    Promote after ``promote_after`` comparisons if the lowest cosine stayed at or above
    ``min_cosine``, the error rate at or below ``max_error_rate`` and the candidate's mean
    latency within ``max_latency_ratio`` x the served one's. Roll back as soon as the error
    rate (after 10 comparisons) or the lowest cosine crosses its bound."""

    promote_after: int = 0
    min_cosine: float = 0.0
    max_error_rate: float = 0.0
    max_latency_ratio: float = 0.0

    def __bool__(self) -> bool:
        return bool(
            self.promote_after or self.min_cosine or self.max_error_rate or self.max_latency_ratio
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "promote_after": self.promote_after,
            "min_cosine": self.min_cosine,
            "max_error_rate": self.max_error_rate,
            "max_latency_ratio": self.max_latency_ratio,
        }


def parse_rules(raw: Any, where: str = "rollout") -> Rules:
    if not raw:
        return Rules()
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: rules must be an object")
    unknown = sorted(set(raw) - set(Rules().as_dict()))
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown rules {unknown}; known: {sorted(Rules().as_dict())}"
        )
    try:
        rules = Rules(
            promote_after=int(raw.get("promote_after", 0)),
            min_cosine=float(raw.get("min_cosine", 0.0)),
            max_error_rate=float(raw.get("max_error_rate", 0.0)),
            max_latency_ratio=float(raw.get("max_latency_ratio", 0.0)),
        )
    except (TypeError, ValueError, OverflowError):  # int(inf): OverflowError
        raise InvalidArgument(f"{where}: rules must be finite numbers") from None
    if not (0 <= rules.promote_after < 2**31 and -1 <= rules.min_cosine <= 1):
        raise InvalidArgument(f"{where}: promote_after >= 0 and min_cosine within [-1, 1]")
    if not (0 <= rules.max_error_rate <= 1 and 0 <= rules.max_latency_ratio < 1e6):
        raise InvalidArgument(f"{where}: max_error_rate within [0, 1], max_latency_ratio >= 0")
    return rules


@dataclass(frozen=True)
class Rollout:
    split: tuple[tuple[int, float], ...]  # (version, weight), weights > 0, in version order
    shadow: tuple[int, float] | None = None  # (candidate version, fraction of requests)
    rules: Rules = Rules()
    # Which comparison of the shadow this is: ``write`` gives a new id to a rollout that names
    # none (None: a change that starts the comparison afresh) and keeps a given one (a rule's
    # change that keeps the shadow), "" included: a file written by hand has no id, and a
    # rule's change must not give its comparison one (a new id starts it afresh everywhere).
    # Every worker keys its figures to it (``comparison_key``), so the figures one
    # process adds up are all from the same comparison. Not part of what a rollout *is*: equal
    # rollouts with other ids route and shadow the same requests.
    comparison: str | None = field(default=None, compare=False)

    @functools.cached_property
    def comparison_key(self) -> str:
        """What a comparison's figures are about: candidate, fraction, rules and comparison id,
        as text, the same in every worker process that read the same rollout file (with
        ``--workers`` the first worker adds up only figures under its own key, so a worker that
        has not applied a change yet adds none of its older ones). Worked out once per rollout:
        it is asked on every shadowed request. A shadow is required."""
        assert self.shadow is not None
        candidate, fraction = self.shadow
        return json.dumps([candidate, fraction, self.rules.as_dict(), self.comparison or ""])

    @property
    def versions(self) -> list[int]:
        """Every version the rollout needs served: the split's and the shadow candidate."""
        extra = [self.shadow[0]] if self.shadow else []
        return sorted({*(v for v, _ in self.split), *extra})

    @functools.cached_property
    def _shares(self) -> tuple[tuple[int, float], ...]:
        """The split's weights over its largest (the same shares): a split of tiny weights,
        {1: 1e-320, 2: 1e-320}, gave every score ``-ln(point) / weight`` as inf, and every
        request went to the first version. Worked out once per rollout, not per request."""
        largest = max((w for _, w in self.split), default=1.0)
        return tuple((v, w / largest) for v, w in self.split)

    def pick(self, model: str, key: str) -> int:
        """The version for a request: the same key always gets the same version.

        Weighted rendezvous hashing: each version draws a point for the key, and the lowest
        ``-ln(point) / weight`` wins, so a version's share is its weight's, and a version whose
        weight grows takes requests from the others and gives none away, however many versions
        the split has. Cumulative intervals did that only for the last of two: growing 3 in
        {1: 8, 2: 1, 3: 1} moved every request of 2, whose weight had not changed, and a share
        of 1's to 2."""
        shares = self._shares
        if not key:  # no key, no stickiness: a weighted draw
            return random.choices([v for v, _ in shares], [w for _, w in shares])[0]
        best_version, best = shares[0][0], math.inf
        for version, weight in shares:
            digest = hashlib.blake2b(f"{model}\0{key}\0{version}".encode(), digest_size=8)
            point = (int.from_bytes(digest.digest(), "big") + 1) / (2**64 + 1)  # in (0, 1]
            score = -math.log(point) / weight
            if score < best:
                best_version, best = version, score
        return best_version


def request_digest(version: int, key: str, inputs: Mapping[str, np.ndarray]) -> bytes:
    """Which request failed on which version, for a split's rule: the version, the request's
    id and its inputs (names, types, shapes, values). A client retrying one bad request under
    its id (which sticks to one version) sends the same digest each time, and it counts once."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([version, key]).encode())
    for name in sorted(inputs):
        a = np.asarray(inputs[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        if a.dtype.kind != "O":
            h.update(a.tobytes())
            continue
        for item in a.ravel():  # BYTES: the elements' values, not their addresses
            data = item if isinstance(item, bytes) else str(item).encode("utf-8", "replace")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.digest()


def going_on(live: Rollout | None, wanted: Rollout) -> Rollout:
    """``wanted`` with the live comparison's id when it keeps the live shadow and rules (a
    rule's change of the split), so every worker's figures go on; any other change starts a
    comparison afresh (``write`` gives it a new id)."""
    if live is None or (live.shadow, live.rules) != (wanted.shadow, wanted.rules):
        return wanted
    return dataclasses.replace(wanted, comparison=live.comparison)


def _version_number(raw: Any) -> int | None:
    """A version as a rollout names it: an int (gRPC), or the text of one (the file's keys),
    by the repository's rule for version folders: ASCII digits, no leading zero. ``int()``
    also read '01' as 1, '1_0' as 10, '\u0663' (an Arabic-Indic 3) as 3, and a 2.7 as 2, none
    of which names a version folder. None when it is not one."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and VERSION_RE.fullmatch(raw):
        # Past 16 digits it is out of range whatever it says (int() of 5,000 digits raises).
        return int(raw) if len(raw) <= len(str(MAX_VERSION)) else MAX_VERSION + 1
    return None


def parse_shadow(version: Any, fraction: Any, where: str = "rollout") -> tuple[int, float]:
    v = _version_number(version)
    try:
        f = float(fraction)
    except (TypeError, ValueError, OverflowError):
        v = None
    if v is None:
        raise InvalidArgument(
            f"{where}: shadow needs a version (a positive integer, ASCII digits without a "
            f"leading zero) and a fraction, got {str(version)[:40]!r}"
        )
    # The repository's own bound (inclusive): a version it serves must be one a rollout can
    # name (2**53 was served, and refused here as "out of range (1..2^53)").
    if not 1 <= v <= MAX_VERSION:
        raise InvalidArgument(f"{where}: shadow version {v} is out of range (1..{MAX_VERSION})")
    if not 0 < f <= 1:
        raise InvalidArgument(f"{where}: the shadow fraction must be within (0, 1], got {f}")
    return v, f


def parse_split(split: dict[Any, Any], where: str = "rollout") -> Rollout:
    """{version: weight} -> Rollout, refusing anything a split cannot mean."""
    if not isinstance(split, dict) or not split:
        raise InvalidArgument(
            f"{where}: the split must map versions to weights, e.g. {{1: 0.9, 2: 0.1}}"
        )
    if len(split) > MAX_VERSIONS:
        raise InvalidArgument(f"{where}: at most {MAX_VERSIONS} versions in a split")
    out: dict[int, float] = {}
    for raw_version, raw_weight in split.items():
        version = _version_number(raw_version)
        if version is None:
            raise InvalidArgument(
                f"{where}: version {str(raw_version)[:40]!r} is not a version number (a positive "
                "integer, ASCII digits without a leading zero)"
            )
        if not 1 <= version <= MAX_VERSION:
            raise InvalidArgument(f"{where}: version {version} is out of range (1..{MAX_VERSION})")
        if isinstance(raw_weight, bool) or not isinstance(raw_weight, int | float):
            raise InvalidArgument(f"{where}: the weight of version {version} is not a number")
        weight = float(raw_weight)
        # Bounded: weights summing to inf would send every request to the last version.
        if not 0 < weight <= MAX_WEIGHT:
            raise InvalidArgument(
                f"{where}: the weight of version {version} must be within (0, {MAX_WEIGHT:g}]"
            )
        out[version] = weight
    return Rollout(tuple(sorted(out.items())))


def _head(path: Path) -> bytes:
    """At most ``MAX_FILE + 1`` bytes of the rollout file. Read whole and cut after, a huge
    file (or a link to /dev/zero) took the server's memory, and a FIFO there held the refresh,
    and with it every management call, for good."""
    return read_head(path, MAX_FILE + 1)


def _read_raw(model_dir: Path) -> tuple[bytes | None, str]:
    """The file's bytes (None: there are none to parse) and why not ('' for no file)."""
    try:
        return _head(model_dir / ROLLOUT_FILE), ""
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"{ROLLOUT_FILE}: {exc.strerror or exc}"


def _signature(raw: bytes | None, error: str) -> str | None:
    """What the file holds, as a refresh compares it: a digest of its content (None: no file).
    Its (mtime, size) missed an edit of the same size within the file system's mtime
    granularity, and the old split served on for good."""
    if raw is None:
        return f"unreadable: {error}" if error else None
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def signature(model_dir: Path) -> str | None:
    """The rollout file's signature now (``scan``'s)."""
    return _signature(*_read_raw(model_dir))


def scan(
    model_dir: Path, known: str | None
) -> tuple[str | None, tuple[Rollout | None, str] | None]:
    """The file's signature, and ``read``'s answer when it differs from ``known`` (else None:
    not parsed again), both from one read of the file."""
    raw, error = _read_raw(model_dir)
    sig = _signature(raw, error)
    if sig == known:
        return sig, None
    return sig, (_parse(raw) if raw is not None else (None, error))


def read(model_dir: Path) -> tuple[Rollout | None, str]:
    """The model's rollout (None: none), and an error that makes the file unusable ('' if not).
    A broken file never stops serving: the model serves its default version and says why."""
    raw, error = _read_raw(model_dir)
    return _parse(raw) if raw is not None else (None, error)


def _parse(raw: bytes) -> tuple[Rollout | None, str]:
    """``read`` of the file's bytes."""
    if len(raw) > MAX_FILE:
        return None, f"{ROLLOUT_FILE} is over {MAX_FILE} bytes"
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            return None, f"{ROLLOUT_FILE} is not a JSON object"
        split = doc.get("split")
        shadow = doc.get("shadow")
        parsed = parse_split(split, ROLLOUT_FILE) if split else Rollout(())
        pair = None
        comparison = ""
        if isinstance(shadow, dict) and shadow:
            pair = parse_shadow(shadow.get("version"), shadow.get("fraction"), ROLLOUT_FILE)
            given = shadow.get("comparison")
            # A hand-edited one that is not a short text is no id: the figures start afresh.
            if isinstance(given, str) and len(given) <= MAX_COMPARISON_ID:
                comparison = given
        parsed = Rollout(
            parsed.split, pair, parse_rules(doc.get("rules"), ROLLOUT_FILE), comparison
        )
        return (parsed if parsed.split or parsed.shadow else None), ""
    except InvalidArgument as exc:
        return None, exc.message
    except ValueError as exc:  # not JSON
        return None, f"{ROLLOUT_FILE} is not valid JSON: {exc}"
    except RecursionError:
        # Nested past the parser's guard (a hand edit): it failed every refresh (Refresh,
        # LoadModel, SetDefaultVersion INTERNAL; no model loaded at start), not this model.
        return None, f"{ROLLOUT_FILE} is nested deeper than the JSON parser allows"


def as_doc(rollout: Rollout) -> dict[str, Any]:
    """``rollout`` as the file holds it (``from_doc`` reads it back): what a worker is sent."""
    shadow = (
        {"version": rollout.shadow[0], "fraction": rollout.shadow[1]}
        | {"comparison": rollout.comparison or ""}
        if rollout.shadow
        else {}
    )
    split = {str(v): w for v, w in rollout.split}
    return {"split": split, "shadow": shadow, "rules": rollout.rules.as_dict()}


def from_doc(doc: Any) -> Rollout | None:
    """``as_doc``'s rollout (None: not one)."""
    return _parse(json.dumps(doc).encode())[0]


def history(model_dir: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(_head(model_dir / ROLLOUT_FILE)[:MAX_FILE])
    except (OSError, ValueError, RecursionError):
        return []
    entries = doc.get("history") if isinstance(doc, dict) else None
    return entries if isinstance(entries, list) else []


def write(model_dir: Path, rollout: Rollout | None, *, by: str, why: str) -> dict[str, Any]:
    """Replace the split (None: end the rollout) and append the change to the history. A
    shadow without a comparison id gets a new one: its comparison starts afresh everywhere."""
    if len(why) > MAX_REASON:
        raise InvalidArgument(f"the reason is over {MAX_REASON} characters")
    if not why.isprintable():
        # A line break or a terminal's escape in a reason forged entries in the history that
        # `ferry models rollout` prints, or rewrote the operator's screen.
        raise InvalidArgument(
            "the reason must be one line of printable text: no line breaks, tabs or control "
            "characters"
        )
    shadow: dict[str, Any] = (
        {
            "version": rollout.shadow[0],
            "fraction": rollout.shadow[1],
            "comparison": uuid.uuid4().hex if rollout.comparison is None else rollout.comparison,
        }
        if rollout and rollout.shadow
        else {}
    )
    entry = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": by,
        "why": why,
        "split": {str(v): w for v, w in rollout.split} if rollout else {},
        "shadow": shadow,
    }
    rules = rollout.rules.as_dict() if rollout and rollout.rules else {}
    if rules:
        entry["rules"] = rules
    past = history(model_dir)[-(MAX_HISTORY - 1) :]
    while True:
        doc = {"split": entry["split"], "shadow": shadow, "rules": rules, "history": [*past, entry]}
        # backslashreplace: a lone surrogate (JSON's "\ud800", read from a hand-edited history)
        # is written back as that same escape; UTF-8 cannot carry it, and every change failed.
        raw = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8", "backslashreplace")
        # Never a file read() refuses: over MAX_FILE the split itself was dropped, and traffic
        # moved to the default version (200 reasons of 500 emoji did it).
        if len(raw) <= MAX_FILE:
            break
        if not past:
            raise InvalidArgument(f"the rollout record would be over {MAX_FILE} bytes")
        past = past[len(past) // 4 + 1 :]  # the oldest entries go first
    write_file_atomic(model_dir / ROLLOUT_FILE, raw)
    return entry


def interface_difference(
    a: tuple[list[TensorSpec], list[TensorSpec]], b: tuple[list[TensorSpec], list[TensorSpec]]
) -> str:
    """How two versions' (inputs, outputs) differ for a client ('' when they do not): names,
    types, shapes (a dynamic size, -1, is a size of its own: [-1, 4] takes requests [-1, n]
    does not) and the bounds of dynamic axes. A split or shadow between versions that differ
    fails requests at random (a client cannot tell which version answers its request), and a
    shadow candidate missing an output was promoted."""
    for kind, mine, theirs in (("inputs", a[0], b[0]), ("outputs", a[1], b[1])):
        left = {s.name: s for s in mine}
        right = {s.name: s for s in theirs}
        if set(left) != set(right):
            return f"{kind} {sorted(left)} against {sorted(right)}"
        for name, x in left.items():
            y = right[name]
            if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
                return f"{kind[:-1]} {name!r}: {_spec(x)} against {_spec(y)}"
            if tuple(x.bounds) != tuple(y.bounds):
                return f"{kind[:-1]} {name!r}: dynamic-axis bounds {x.bounds} against {y.bounds}"
    return ""


def batch_difference(rollout: Rollout, batch_limits: dict[int, int], default: int | None) -> str:
    """How the loaded versions' ``max_batch_size`` (``batch_limits``; 0: no limit) differ
    for the rollout ('' when they do not): the versions that answer requests (the split's, else
    ``default``) must take the same batches, and a shadow candidate at least theirs. Versions
    of a split with 32 and 2 took a request of 4 rows on one and failed it on the other, at
    random, and a candidate taking fewer rows failed the shadows of the larger ones."""

    def rows(version: int) -> float:
        return batch_limits[version] or math.inf

    answering = [v for v in sorted(batch_limits) if v in dict(rollout.split)]
    if not rollout.split and default in batch_limits:
        answering = [default]
    for other in answering[1:]:
        if rows(other) != rows(answering[0]):
            return (
                f"max_batch_size {batch_limits[answering[0]]} (version {answering[0]}) against "
                f"{batch_limits[other]} (version {other}): a request of rows one takes fails "
                "on the other; give them the same batching.max_batch_size"
            )
    candidate = rollout.shadow[0] if rollout.shadow else None
    if candidate in batch_limits and candidate not in answering:
        fewer = [v for v in answering if rows(candidate) < rows(v)]
        if fewer:
            return (
                f"the shadow candidate {candidate} takes at most {batch_limits[candidate]} rows "
                f"(max_batch_size), version {fewer[0]} "
                f"{batch_limits[fewer[0]] or 'any number'}: larger requests would fail on it; "
                "give it the same batching.max_batch_size"
            )
    return ""


def _spec(s: TensorSpec) -> str:
    return f"{datatype_name(s.dtype)} {list(s.shape)}"


def raw(model_dir: Path) -> bytes | None:
    """The rollout file as it is (None: there is none), to put back as it was."""
    try:
        return _head(model_dir / ROLLOUT_FILE)
    except FileNotFoundError:
        return None
    except IsADirectoryError:  # a change could not be written there either
        raise FailedPrecondition(folder_in_place(model_dir / ROLLOUT_FILE)) from None
    except OSError as exc:
        raise FailedPrecondition(
            f"{model_dir.name}/{ROLLOUT_FILE} cannot be read ({exc.strerror or exc}): make it "
            "a regular file, or remove it, and try again"
        ) from None


def restore(model_dir: Path, previous: bytes | None) -> None:
    """Put back what ``raw`` read: a refused change leaves no trace, not even in the history."""
    if previous is None:
        (model_dir / ROLLOUT_FILE).unlink(missing_ok=True)
    else:
        write_file_atomic(model_dir / ROLLOUT_FILE, previous)
