"""Two onnxruntime sessions timed against each other on one box: rounds alternate which runs
first, each timing lasts ~20 ms (above the timer's and the scheduler's noise), and the figure
is the median of the per-round ratios with its quartiles, so a busy moment skews one round, not
the result. Used by the benchmarks that compare a variant with its reference."""

from __future__ import annotations

import statistics
import time
from typing import Any

TIMING_S = 0.02


def _seconds(session: Any, feed: dict[str, Any], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return time.perf_counter() - start


def compare(
    reference: tuple[Any, dict[str, Any]], other: tuple[Any, dict[str, Any]], rounds: int
) -> dict[str, float]:
    """How many times faster ``other`` runs than ``reference``: ``speedup`` (median of the
    per-round ratios), ``q1``/``q3`` (their quartiles), and each one's median ms per run."""
    pairs = [reference, other]
    for session, feed in pairs:  # warm up: the first runs allocate and pick kernels
        _seconds(session, feed, 3)
    once = _seconds(*reference, 1)
    runs = max(1, int(TIMING_S / max(once, 1e-6)))
    times: list[list[float]] = [[], []]
    for index in range(rounds):
        for which in (0, 1) if index % 2 == 0 else (1, 0):
            times[which].append(_seconds(*pairs[which], runs) / runs)
    ratios = sorted(r / o for r, o in zip(times[0], times[1], strict=True))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "speedup": statistics.median(ratios),
        "q1": q1,
        "q3": q3,
        "reference_ms": statistics.median(times[0]) * 1e3,
        "other_ms": statistics.median(times[1]) * 1e3,
    }
