"""Shadow traffic: a share of live requests also runs on a candidate version, after the caller
has its answer, and the two versions' outputs are compared.

The caller never waits for the shadow and never sees its outcome: the shadow run is a separate
task started once the served answer exists, its errors are counted, not raised. It never takes
capacity the served path needs: it is queued at the lowest priority, not started while the
served version or the candidate has requests waiting, and at most ``MAX_IN_FLIGHT`` shadows
run per model, so under load shadow work is the first to go (counted as ``shed``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ferry.server.accuracy import SPREAD, max_rel_error
from ferry.server.core.types import State
from ferry.server.errors import DeadlineExceeded, QueueFull, Unavailable

log = logging.getLogger(__name__)

# After every request of a caller (lower first): above any priority the wire carries (OIP uint64).
SHADOW_PRIORITY = 2**64
MAX_IN_FLIGHT = 8
SHADOW_TIMEOUT = 5.0  # seconds a shadow may wait in the candidate's queue
SQUARES = 4  # per output: sum of squared differences, of squared served values, sum, count


# Refused at the candidate's door or expired in its queue behind the live requests that go
# first, or its session closed under it (unloaded, replaced)
_NOT_RUN = (QueueFull, DeadlineExceeded, Unavailable)


def shed(exc: BaseException, candidate: State | None = None) -> bool:
    """Whether a shadow that gave no answer was shed (not run: the live traffic, or the
    candidate on its way in or out, ``candidate`` being its state then) rather than failed by
    the candidate: the one rule, for a shadow refused before it is queued (the candidate not
    ready: dataplane) and one that did not run there (``Shadows``). Counted as errors, a load
    on the candidate, or its seconds of loading, rolled an identical candidate back by
    max_error_rate."""
    return isinstance(exc, _NOT_RUN) or candidate in (State.LOADING, State.UNLOADING)


@dataclass
class ShadowStatistics:
    """Running comparison of one model's candidate against the versions that served."""

    candidate: int
    model: str = ""
    compared: int = 0
    errors: int = 0  # the candidate failed where the served version answered
    shed: int = 0  # not run: the candidate busy or its queue too slow, or too many in flight
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    max_abs_diff: float = 0.0
    top1_agree: int = 0
    top1_rows: int = 0  # rows whose outputs are class scores
    mismatched: int = 0  # outputs missing from the candidate's answer or of another shape/type
    served_ns: int = 0
    shadow_ns: int = 0
    # Per floating-point output, over every comparison: the sums of ||served - shadow||^2 and
    # ||served||^2 (the size of the error, which a cosine does not see: one value per request, a
    # regression's, has a cosine of 1 whatever the candidate answers), and for an output of one
    # value per sample, the sum and count of the served values (their spread: ``spread_error``).
    squares: dict[str, list[float]] = field(default_factory=dict)
    labels_equal: int = 0  # elements of integer and boolean outputs equal in both
    labels_total: int = 0
    in_flight: int = 0
    decided: bool = False  # a rule acted on this candidate: no second decision
    key: str = ""  # the comparison these figures belong to (``comparison_key``)

    def verdict(self, rules: Any) -> str:
        """'promote', 'rollback' or '' under ``rules`` (core.rollout.Rules)."""
        if self.decided or not rules:
            return ""
        runs = self.compared + self.errors
        error_rate = self.errors / runs if runs else 0.0
        promoting = bool(rules.promote_after) and self.compared >= rules.promote_after
        # After 10 runs, and before any promotion however few (a promote_after of 5 promoted
        # a candidate that failed 4 of its 9 runs under a max_error_rate of 0.01).
        if rules.max_error_rate and (runs >= 10 or promoting) and error_rate > rules.max_error_rate:
            return "rollback"
        if rules.min_cosine and self.compared and self.cosine_min < rules.min_cosine:
            return "rollback"
        # Over 10 comparisons at least, like the error rate (summed, a near-zero output in one
        # request cannot decide alone), and before any promotion, however few (a promote_after
        # under 10 promoted a candidate whose ids all differed).
        if rules.min_cosine and (self.compared >= 10 or promoting):
            most = max_rel_error(rules.min_cosine)
            if most is not None and not (self.rel_error <= most and self.spread_error <= most):
                return "rollback"
            if self.labels_total and self.label_agreement < rules.min_cosine:
                return "rollback"
        if not promoting:
            return ""
        ratio = self.shadow_ns / self.served_ns if self.served_ns else 1.0
        if rules.max_latency_ratio and ratio > rules.max_latency_ratio:
            return "rollback"
        return "promote"

    def summary(self) -> str:
        ratio = self.shadow_ns / self.served_ns if self.served_ns else 1.0
        odd = f", {self.mismatched} outputs missing or of another shape/type" * bool(
            self.mismatched
        )
        return (
            f"{self.compared} compared, {self.errors} errors, lowest cosine "
            f"{self.cosine_min:.6f}, relative error {self.rel_error:.4g}, of the spread "
            f"{self.spread_error:.4g}, ids equal {self.label_agreement:.2%}{odd}, latency "
            f"{ratio:.2f}x the served version's"
        )

    @property
    def label_agreement(self) -> float:
        """The share of integer and boolean output elements (ids, masks) equal in both, over
        every comparison; 1 when there are none."""
        return self.labels_equal / self.labels_total if self.labels_total else 1.0

    @property
    def spread_error(self) -> float:
        """For outputs of one value per sample, ||served - shadow|| over the served values'
        spread about their mean (as the conversion budget judges a regression): near one large
        value (a price, a temperature), a candidate answering the mean for every request kept
        a relative error of 0.005. 0 when no output is judged so, or the values hardly vary
        (a spread under SPREAD of their size)."""
        worst = 0.0
        for error, norm, total, count in self.squares.values():
            if count < 2:
                continue
            spread = norm - total * total / count
            if spread > 0.0 and spread >= SPREAD * SPREAD * norm:
                worst = max(worst, math.sqrt(error / spread))
        return worst

    @property
    def rel_error(self) -> float:
        """||served - shadow|| / ||served|| over every comparison, the largest over outputs
        (the rules allow sqrt(2 (1 - min_cosine)), as the conversion's budget does)."""
        worst = 0.0
        for error, norm, _, _ in self.squares.values():
            if norm > 0.0:
                worst = max(worst, math.sqrt(error / norm))
            elif error > 0.0:
                return math.inf
        return worst

    @property
    def mean_cosine(self) -> float:
        return self.cosine_sum / self.compared if self.compared else 1.0

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agree / self.top1_rows if self.top1_rows else None

    def record(self, served: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> None:
        cosines = []
        for name, a in served.items():
            b = shadow.get(name)
            if b is None or a.shape != b.shape or a.dtype != b.dtype:
                # An output the candidate lacks, or gives in another shape or type, is a
                # disagreement: skipped, it let a candidate that breaks every client asking
                # for that output be promoted with a cosine of 1.
                cosines.append(0.0)
                self.mismatched += 1
                continue
            floating = a.dtype.kind == "f" or a.dtype.name == "bfloat16"
            if not floating and a.dtype.kind not in "iub":  # text (BYTES): equal or not
                cosines.append(1.0 if np.array_equal(a, b) else 0.0)
                continue
            if not floating:
                # Labels, ids, masks: counted equal or not over every comparison (the cosine of
                # one id against another is 1; the share of equal ones is the cosine of their
                # one-hot encodings). Not per request: one changed id in a request of one would
                # make its figure 0 and roll a candidate back at its first disagreement.
                self.labels_equal += int(np.count_nonzero(a == b))
                self.labels_total += a.size
                if a.size:
                    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                    self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
                continue
            x = a.astype(np.float64).ravel()
            y = b.astype(np.float64).ravel()
            odd = ~(np.isfinite(x) & np.isfinite(y))
            if odd.any():
                # NaN made the cosine NaN, which min() skips: a candidate answering NaN never
                # crossed min_cosine. A NaN or inf where the served one has another value is a
                # disagreement; the same ones in both are set aside.
                if not np.array_equal(x[odd], y[odd], equal_nan=True):
                    cosines.append(0.0)
                    self.max_abs_diff = float("inf")
                    continue
                x, y = x[~odd], y[~odd]
            nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
            cosines.append(float(x @ y / (nx * ny)) if nx and ny else float(nx == ny))
            sums = self.squares.setdefault(name, [0.0] * SQUARES)
            sums[0] += float(np.sum((x - y) ** 2))
            sums[1] += nx * nx
            if a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1):  # one value per sample
                sums[2] += float(np.sum(x))
                sums[3] += x.size
            if x.size:
                self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(x - y))))
            if a.ndim == 2 and a.shape[1] > 1:
                self.top1_rows += a.shape[0]
                self.top1_agree += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
        cosine = min(cosines) if cosines else 1.0  # only labels: judged by their counts
        self.compared += 1
        self.cosine_sum += cosine
        self.cosine_min = min(self.cosine_min, cosine)


def comparison_key(rollout: Any, candidate_files: str = "") -> str:
    """The comparison ``rollout``'s shadow figures belong to (core.rollout.Rollout), of the
    candidate as loaded from ``candidate_files`` (its files' signature, the same in every
    worker process that loaded the same files): a candidate whose files were replaced went on
    with the figures of the model it replaced, which diluted the new one's difference, and a
    candidate 50% off was promoted on them."""
    key = str(rollout.comparison_key)
    return f"{key}\0{candidate_files}" if candidate_files else key


class Shadows:
    """The shadow runs of every model of one process."""

    def __init__(self) -> None:
        self.stats: dict[str, ShadowStatistics] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def statistics(self, model: str, rollout: Any, key: str | None = None) -> ShadowStatistics:
        """The comparison of ``rollout``'s shadow (core.rollout.Rollout; ``key``: its
        ``comparison_key`` with the candidate's files, when known). Another candidate,
        fraction or rules start afresh: a ``promote_after`` counted the comparisons made before
        its rule existed, and promoted a candidate at once."""
        key = comparison_key(rollout) if key is None else key
        stats = self.stats.get(model)
        if stats is None or stats.key != key:
            stats = self.stats[model] = ShadowStatistics(rollout.shadow[0], model, key=key)
        return stats

    def forget(self, model: str) -> None:
        """A shadow set (again) by a person starts its comparison afresh."""
        self.stats.pop(model, None)

    def start(
        self,
        stats: ShadowStatistics,
        run: object,
        served: Mapping[str, np.ndarray],
        served_ns: int,
        then: Callable[[ShadowStatistics], None] | None = None,
    ) -> None:
        """Run ``run`` (a coroutine producing the candidate's outputs) in the background;
        ``then`` sees the statistics after each outcome (the rollout's rules)."""
        stats.in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._run(stats, run, served, served_ns, then)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before its first step (the server stopping) never awaited ``run``:
        # closed here, that is not reported as a coroutine never awaited. Closing one that
        # ran to its end does nothing.
        close = getattr(run, "close", None)
        if close is not None:
            task.add_done_callback(lambda _: close())

    async def _run(
        self,
        stats: ShadowStatistics,
        run: object,
        served: Mapping[str, np.ndarray],
        served_ns: int,
        then: Callable[[ShadowStatistics], None] | None,
    ) -> None:
        start = time.perf_counter_ns()
        try:
            shadow = await run  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the candidate's failure is a statistic, never the caller's
            if shed(exc):
                stats.shed += 1
            else:
                stats.errors += 1
                log.debug("shadow run of candidate %d failed: %s", stats.candidate, exc)
        else:
            stats.served_ns += served_ns
            stats.shadow_ns += time.perf_counter_ns() - start
            stats.record(served, shadow)
        finally:
            stats.in_flight -= 1
        if then is not None:
            then(stats)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
