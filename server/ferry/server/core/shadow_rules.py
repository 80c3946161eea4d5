"""A rollout's shadow: running a routed request on the candidate version too, after the
caller's answer, and the shadow's rules (``promote_after``, ``min_cosine``...) judged on the
comparison summed over the worker processes: promote the candidate or roll it back. The figures
themselves are ``core.shadow``'s; the change a rule decides is made by ``_decide``.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from ferry.server.core import inputs, shadow, shadow_sum
from ferry.server.core import rollout as rollouts
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.rule_host import RuleHost
from ferry.server.core.types import InferenceRequest, Limits
from ferry.server.errors import FerryError


class ShadowRules(RuleHost):
    """DataPlane's share that shadows requests and judges the comparison (a mixin: the state
    is the plane's, set in ``DataPlane.__init__``)."""

    _registry: ModelRegistry
    limits: Limits
    _shadows: shadow.Shadows
    # The other workers' comparisons (sum_shadows_with), in the first worker only.
    _peer_shadows: shadow_sum.PeerShadows | None
    _decisions: set[asyncio.Task[None]]
    _closing: asyncio.Event
    decides_rollouts: bool

    def _maybe_shadow(
        self,
        request: InferenceRequest,
        served: LoadedVersion,
        outputs: dict[str, Any],
        elapsed: float,
    ) -> None:
        """Run this request on the model's shadow candidate too, after the caller's answer;
        its outcome is a statistic (core.shadow), never the caller's."""
        ro, _ = self._registry.rollout_of(served.name)
        if ro is None or ro.shadow is None:
            return
        candidate, fraction = ro.shadow
        if candidate == served.version or random.random() >= fraction:
            return
        stats = self._shadows.statistics(served.name, ro, self._comparison_key(served.name, ro))
        if request.outputs:
            # What the caller asked for and got, not the outputs its batch ran: batched with a
            # request for another output, the served answer held both, the candidate's run of
            # this request only the asked one, and an identical candidate counted a mismatch.
            outputs = {name: outputs[name] for name in request.outputs if name in outputs}
        try:
            lv = self._registry.get(served.name, candidate)
            work = inputs.validate(lv, request, self.limits)
        except FerryError as exc:  # not ready, or it does not take these inputs
            # On its way in (a worker or a polling replica loads it after reading the rollout)
            # or out: not run, not failed (shadow.shed, the one rule for both places).
            entry = self._registry.models.get(served.name)
            slot = entry.versions.get(candidate) if entry is not None else None
            if shadow.shed(exc, slot.state if slot is not None else None):
                stats.shed += 1
            else:
                stats.errors += 1
            return
        busy = served.batcher.queue_depth > 0 or lv.batcher.queue_depth > 0
        if busy or stats.in_flight >= shadow.MAX_IN_FLIGHT:
            stats.shed += 1  # requests are waiting (here or on the candidate): shadows go first
            return
        work.shadow = True
        run = lv.batcher.submit(
            work,
            deadline=time.monotonic() + shadow.SHADOW_TIMEOUT,
            priority=shadow.SHADOW_PRIORITY,
            counted=False,  # no caller's request: its shedding is no rejected or expired one
        )
        self._shadows.start(
            stats, run, outputs, int(elapsed * 1e9), lambda s: self._apply_rules(served.name, s)
        )

    def _apply_rules(
        self,
        model: str,
        stats: shadow.ShadowStatistics,
        pulled: bool = False,
        every_worker: bool = True,
    ) -> None:
        """The rollout's rules, after each shadow outcome and each pull of the other workers'
        figures (``pulled``; ``every_worker``: each answered it): promote the candidate (it
        takes all the traffic) or roll it back (the shadow, and any share of the split it had,
        end). Judged on the comparison summed over every worker process; ``stats`` is this
        process's, which keeps ``decided``."""
        if not self.decides_rollouts:
            return
        try:
            ro, _ = self._registry.rollout_of(model)
        except FerryError:
            return
        if ro is None or ro.shadow is None or ro.shadow[0] != stats.candidate:
            return
        if stats.key != self._comparison_key(model, ro):
            # A late outcome of a comparison a change replaced (same candidate, new rules or
            # a new start): its figures were judged by the new rules, and a promote_after set
            # after N comparisons promoted the candidate with none made under it.
            return
        if stats.decided or not ro.rules:
            return  # no verdict to reach: the sum over the workers is not worked out
        judged = self._summed(stats)
        verdict = judged.verdict(ro.rules)
        if not verdict:
            return
        if verdict == "promote" and self._peer_shadows is not None:
            # Promoted only on figures just read from every worker: what another worker
            # compared since the last pull may hold the disagreement that rolls it back. A
            # rollback needs no more evidence than it has.
            if not pulled:
                self._peer_shadows.soon()
                return
            if not every_worker:
                # One did not answer: its figures are as last read. The next period's pull
                # asks again (asked at once, a worker that fails at once would spin it).
                return
        stats.decided = True
        candidate = stats.candidate
        if verdict == "promote":
            # The candidate takes every request: by ending the split when it is what requests
            # that name no version get anyway (the newest, say), or else by a pin. A pin left
            # behind kept every version published later off traffic.
            natural = self._registry.default_version(model)
            split: dict[int, float] | None = None if natural == candidate else {candidate: 1.0}
        else:
            split = {v: w for v, w in ro.split if v != candidate} or None
        # The split left after a rollback keeps its max_error_rate: dropped with the shadow's
        # rules, a canary beside the candidate lost its guard, and a failing canary version
        # kept its share for good.
        keep = None
        if verdict == "rollback" and split and ro.rules.max_error_rate:
            keep = rollouts.Rollout(
                (), None, rollouts.Rules(max_error_rate=ro.rules.max_error_rate)
            )
        what = "promoted" if verdict == "promote" else "rolled back"
        why = f"{what} by rule: {judged.summary()}"
        self._decide(model, split, why, ro, keep=keep, stats=stats)

    def _comparison_key(self, model: str, ro: rollouts.Rollout) -> str:
        """The comparison key of ``ro``'s shadow (core.shadow.comparison_key) with the files its
        candidate is loaded from now: replaced and reloaded, it is compared afresh."""
        assert ro.shadow is not None
        entry = self._registry.models.get(model)
        slot = entry.versions.get(ro.shadow[0]) if entry is not None else None
        files = repr(slot.signature) if slot is not None else ""
        if entry is not None and not ro.split:
            # With no split the candidate is compared with the default version: a publish
            # that made another version the default (or replaced its files) went on with the
            # figures against the previous one, and a rule promoted the candidate over a
            # version it was hardly compared with. The comparison starts afresh then.
            default = entry.default_version()
            served = entry.versions.get(default) if default is not None else None
            files += f"\0served {default} {served.signature if served is not None else ''!r}"
        return shadow.comparison_key(ro, files)

    def sum_shadows_with(self, peers: shadow_sum.PeerShadows) -> None:
        """Add the other worker processes' shadow comparisons to what the rules judge,
        GetRollout and /metrics show (the first worker's: it alone decides and answers)."""
        self._peer_shadows = peers

    def _summed(
        self,
        stats: shadow.ShadowStatistics,
        others: list[shadow.ShadowStatistics] | None = None,
    ) -> shadow.ShadowStatistics:
        """``stats`` plus the other workers' figures of the same comparison (``others``: as
        last read, when not given): no call to another process, so it may run after every
        shadow outcome."""
        if self._peer_shadows is None:
            return stats
        return shadow_sum.add_up(stats, self._peer_shadows.latest() if others is None else others)

    def shadow_statistics(self) -> list[shadow.ShadowStatistics]:
        """Every model's shadow comparison (for metrics), with its model: summed over the
        worker processes as last read (workers.shadow_pull), never a call at a scrape."""
        others = self._peer_shadows.latest() if self._peer_shadows is not None else None
        # Only shadows in force: one rolled back, promoted or ended by a person kept its last
        # comparison on /metrics for good, its gauges read as a comparison still running.
        live = {}
        for name, entry in list(self._registry.models.items()):
            if entry.rollout is not None and entry.rollout.shadow is not None:
                live[name] = entry.rollout.shadow[0]
        summed = [
            self._summed(s, others)
            for name, s in list(self._shadows.stats.items())
            if live.get(name) == s.candidate
        ]
        return [s for s in summed if s.compared or s.errors or s.shed]

    def own_shadow_statistics(self) -> list[shadow.ShadowStatistics]:
        """This process's own comparisons, none summed: what it tells the first worker."""
        return list(self._shadows.stats.values())

    def shadowed_models(self) -> list[str]:
        """The models whose rollout has a shadow now."""
        return [
            name
            for name, entry in list(self._registry.models.items())
            if entry.rollout is not None and entry.rollout.shadow is not None
        ]

    def judge_shadows(self, every_worker: bool = True) -> None:
        """After the other workers' figures were pulled: every shadowed model's rules on the
        sum, whether or not this process compared any of its requests (the kernel may give
        every shadowed connection to other workers; a rule was only checked after an outcome
        of this process's own). ``every_worker``: each answered the pull (else no promotion)."""
        for name in self.shadowed_models():
            ro, _ = self._registry.rollout_of(name)
            if ro is not None and ro.shadow is not None:
                stats = self._shadows.statistics(name, ro, self._comparison_key(name, ro))
                self._after(self._apply_rules, name, stats, True, every_worker)

    async def close_shadows(self) -> None:
        self._closing.set()  # a decision waiting to be tried again stops waiting
        await self._shadows.close()
        await asyncio.gather(*self._decisions, return_exceptions=True)
