"""A split's ``max_error_rate`` rule over several worker processes, added up.

With ``--workers N`` the kernel spreads connections over the workers, so each holds only its
own share of the requests a split routed: the first worker, which alone decides, counted its
own, and a version that failed every request a worker saw was never rolled out of the split.
Every worker counts the requests its split routes (``Counts``), the first reads the others'
counts with their shadow comparisons (workers.shadow_pull) and judges the sum.

Only counts made under the same key are added: the rollout file as read (its content's digest,
the same in every process that read it) and the files each split version is loaded from, as a
process's own counts start afresh with each rollout read and each version loaded from new
files. A worker that has not applied a change yet adds none of its older counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# version -> [failed, ok]: the requests the split routed to it since the count started
Counts = dict[int, list[int]]
# What a process tells the first: [model, key, {version (text): [failed, ok]}]
Row = list[Any]

MIN_REQUESTS = 10  # a version's requests before its error rate is judged


def key(rollout_signature: str | None, files: Iterable[object]) -> str:
    """The key counts are made under (module docstring), as text."""
    return json.dumps([rollout_signature or "", [repr(f) for f in files]])


def to_row(model: str, key_: str, counts: Counts) -> Row:
    return [model, key_, {str(v): [int(c[0]), int(c[1])] for v, c in counts.items()}]


def from_row(row: object) -> tuple[str, str, Counts] | None:
    """A row read back (None: one that does not read, which adds nothing)."""
    if not isinstance(row, (list, tuple)) or len(row) != 3:
        return None
    model, key_, raw = row[0], row[1], row[2]
    try:
        counts = {int(v): [int(c[0]), int(c[1])] for v, c in dict(raw).items()}
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    if not isinstance(model, str) or not isinstance(key_, str):
        return None
    if any(f < 0 or o < 0 for f, o in counts.values()):
        return None
    return model, key_, counts


def add_up(rows: Iterable[object]) -> list[Row]:
    """Rows of the same model and key added into one each (a dead worker's, kept)."""
    out: dict[tuple[str, str], Counts] = {}
    for row in rows:
        read = from_row(row)
        if read is None:
            continue
        model, key_, counts = read
        into = out.setdefault((model, key_), {})
        for v, (f, o) in counts.items():
            mine = into.setdefault(v, [0, 0])
            mine[0] += f
            mine[1] += o
    return [to_row(m, k, c) for (m, k), c in out.items()]


def summed(model: str, key_: str, own: Counts, rows: Iterable[object]) -> Counts:
    """``own`` plus the other processes' counts of the same model and key."""
    out = {v: list(c) for v, c in own.items()}
    for row in rows:
        read = from_row(row)
        if read is None or read[0] != model or read[1] != key_:
            continue
        for v, (f, o) in read[2].items():
            mine = out.setdefault(v, [0, 0])
            mine[0] += f
            mine[1] += o
    return out


def verdict(
    counts: Counts, versions: Iterable[int], bound: float
) -> tuple[int, int, int, float] | None:
    """The first of ``versions`` whose error rate exceeds the rest's by more than ``bound``
    after MIN_REQUESTS of its requests: (version, failed, requests, the rest's rate)."""
    for version in sorted(versions):
        failed, ok = counts.get(version, (0, 0))
        if not failed or failed + ok < MIN_REQUESTS:
            continue
        other_failed = sum(c[0] for v, c in counts.items() if v != version)
        other_ok = sum(c[1] for v, c in counts.items() if v != version)
        rest = other_failed + other_ok
        baseline = other_failed / rest if rest else 0.0
        if failed / (failed + ok) - baseline > bound:
            return version, failed, failed + ok, baseline
    return None
