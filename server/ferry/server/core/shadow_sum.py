"""One model's shadow comparison made by several worker processes, added up.

With ``--workers N`` every worker compares its own share of the shadowed requests (the kernel
spreads connections over them), so no process alone holds the comparison a rule should judge:
a candidate that breaks only on the traffic other workers get was never rolled back, and
``promote_after`` needed N times the traffic. The first worker reads the others' figures over
the control channel (workers.shadow_pull) and adds them to its own with ``add_up``, as if one
process had compared every request.

Only figures made under the same comparison key are added (core.shadow.comparison_key): a
worker that has not applied a change yet still holds the previous comparison, whose figures
must not count for the new one. Counts and sums add, the lowest cosine is the lowest of all,
the largest difference the largest, and each output's sums of squares add element-wise, so
every figure derived from them (``rel_error``, ``spread_error``, ``label_agreement``, the
latency ratio) is that of all the comparisons together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Protocol

from ferry.server.core.shadow import SQUARES, ShadowStatistics

SUMMED = (
    "compared",
    "errors",
    "shed",
    "cosine_sum",
    "top1_agree",
    "top1_rows",
    "mismatched",
    "served_ns",
    "shadow_ns",
    "labels_equal",
    "labels_total",
    "in_flight",
)
_INTEGERS = frozenset(SUMMED) - {"cosine_sum"}


class PeerShadows(Protocol):
    """The other workers' comparisons, as the first worker reads them (workers.shadow_pull)."""

    def latest(self) -> list[ShadowStatistics]:
        """What each worker answered last, and what workers that died last answered: no call,
        so it may be asked after every shadow outcome."""
        ...

    async def pull(self) -> bool:
        """Ask every worker now (GetRollout: management, never the serving path); False when
        one did not answer (its figures are as last read)."""
        ...

    def latest_splits(self) -> list[list[Any]]:
        """Every other worker's counts of the splits ruled by max_error_rate (core.split_sum
        rows), as last read with the comparisons, and those of workers that died: no call."""
        ...

    def soon(self) -> None:
        """A decision is near: pull before the next period ends (a promotion waits for it)."""
        ...


def add_up(own: ShadowStatistics, others: Iterable[ShadowStatistics]) -> ShadowStatistics:
    """``own`` plus every one of ``others`` about the same model and comparison key; ``own``
    is left as it is. The sum keeps ``own``'s candidate, key and ``decided``: the process that
    decides keeps whether a rule acted, the others only compare. The process's own figures are
    being changed by its event loop while the metrics thread reads them: the output sums are
    copied first (a dict copy is one step under the GIL; iterating it is not)."""
    squares = {name: list(sums) for name, sums in dict(own.squares).items()}
    total = dataclasses.replace(own, squares=squares)
    for other in others:
        if other is own or other.model != own.model or other.key != own.key:
            continue
        for name in SUMMED:
            setattr(total, name, getattr(total, name) + getattr(other, name))
        total.cosine_min = min(total.cosine_min, other.cosine_min)
        total.max_abs_diff = max(total.max_abs_diff, other.max_abs_diff)
        for name, sums in dict(other.squares).items():
            mine = total.squares.setdefault(name, [0.0] * SQUARES)
            for i, value in enumerate(sums[:SQUARES]):
                mine[i] += value
    return total


def to_row(s: ShadowStatistics) -> dict[str, Any]:
    """One process's comparison as the control channel carries it (JSON; ``inf`` travels as
    ``Infinity``, which both ends, this same code, read)."""
    row: dict[str, Any] = {name: getattr(s, name) for name in SUMMED}
    row.update(
        model=s.model,
        key=s.key,
        candidate=s.candidate,
        cosine_min=s.cosine_min,
        max_abs_diff=s.max_abs_diff,
        squares={name: list(sums) for name, sums in dict(s.squares).items()},
    )
    return row


def from_row(row: dict[str, Any]) -> ShadowStatistics:
    """``to_row``'s inverse; a row that is not one raises (KeyError, TypeError, ValueError)."""
    s = ShadowStatistics(
        int(row["candidate"]),
        str(row["model"]),
        cosine_min=float(row["cosine_min"]),
        max_abs_diff=float(row["max_abs_diff"]),
        key=str(row["key"]),
    )
    for name in SUMMED:
        value = row.get(name, 0)
        setattr(s, name, int(value) if name in _INTEGERS else float(value))
    for name, sums in dict(row.get("squares") or {}).items():
        values = [float(v) for v in sums]
        if len(values) != SQUARES:
            raise ValueError(f"output {name!r}: {len(values)} sums, not {SQUARES}")
        s.squares[str(name)] = values
    return s
