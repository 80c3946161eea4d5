"""A split's error-rate rule (``max_error_rate``): the requests each version of a live split
answered and failed since the rollout was read, summed over the worker processes, and the
version a rule takes out of the split when its errors exceed the rest's. ``DataPlane`` counts
each routed request's outcome here; the change a rule decides is made by ``_decide``.
"""

from __future__ import annotations

import weakref
from typing import Any

from ferry.server.core import rollout as rollouts
from ferry.server.core import shadow_sum, split_sum
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.rule_host import RuleHost
from ferry.server.core.types import InferenceRequest


class SplitRule(RuleHost):
    """DataPlane's share that counts and judges a split's errors (a mixin: the state is the
    plane's, set in ``DataPlane.__init__``)."""

    _registry: ModelRegistry
    # model -> the split's counts as of the rollout read (DataPlane.__init__ says what each is)
    _split_counts: dict[str, SplitState]
    _peer_shadows: shadow_sum.PeerShadows | None
    decides_rollouts: bool

    def _check_split_errors(
        self, lv: LoadedVersion, failed_now: bool, request: InferenceRequest | None = None
    ) -> None:
        """A version serving a share of a split whose error rate exceeds the rest of the
        split's by more than the rules' max_error_rate (after 10 of its requests) is rolled out
        of the split. Relative, so that a client's bad requests, which fail on every version,
        roll nothing back. Counted over the requests this split routed since it was set: the
        version's lifetime counters also held requests from before the split and those naming
        the version, so a client sending bad requests to version 2 by name rolled it back.
        "Since it was set" is since this rollout was read (the object, not its value): keyed by
        the split's value, a person setting the same split again after a rollback got the old
        failures counted again, and the version, once taken out, was never judged again in this
        process, so it failed its share of requests for good. A failed ``request`` that failed
        before under this split (the same id and inputs: a client's retries, which its id sticks
        to one version) counts once: a request the model refuses at run time (an index past a
        table) fails on every version alike, and each retry of one counted against the one
        version its id picked, rolling an identical version out of the split.

        Every worker process counts (``--workers``); the first alone judges, on the sum of
        every worker's counts (core.split_sum): judged on its own, it never saw the failures
        of the requests the kernel gave the other workers."""
        ro, _ = self._registry.rollout_of(lv.name)
        if ro is None or not ro.rules.max_error_rate or len(ro.split) < 2:
            return
        if lv.version not in dict(ro.split):
            return
        now = self._split_loads(lv.name, ro)
        counts, rolled_back, seen = self._split_state(lv.name, ro, now)
        if lv.version in rolled_back:  # decided already; the change is on its way
            return
        if not any(lv is served for served in now):
            return  # answered by a load replaced since: its files' outcome, not the new ones'
        if failed_now and request is not None:
            digest = rollouts.request_digest(lv.version, request.id, request.inputs)
            if digest in seen:
                return
            seen[digest] = None
            if len(seen) > rollouts.MAX_FAILED_SEEN:  # bounded: the oldest is forgotten
                del seen[next(iter(seen))]
        mine = counts.setdefault(lv.version, [0, 0])  # [failed, ok]
        mine[0 if failed_now else 1] += 1
        if failed_now:
            self._judge_split(lv.name, ro, counts, rolled_back)

    def _split_state(
        self, model: str, ro: rollouts.Rollout, now: tuple[LoadedVersion | None, ...]
    ) -> tuple[split_sum.Counts, set[int], dict[bytes, None]]:
        """The split's counts, the versions a rule took out of it and the failed requests
        counted, started afresh for a rollout read since or a version loaded again."""
        key, then, counts, rolled_back, seen = self._split_counts.get(
            model, (None, (), {}, set(), {})
        )
        if key is not ro:
            counts, rolled_back, seen = {}, set(), {}
            self._split_counts[model] = (ro, _weak(now), counts, rolled_back, seen)
        elif not _same_loads(then, now):
            # A version loaded again (new files): the old files' failures are not its own.
            # Kept, they rolled a fixed version out of the split on its first failure. What a
            # rule decided already stays decided: its change is on its way.
            counts, seen = {}, {}
            self._split_counts[model] = (ro, _weak(now), counts, rolled_back, seen)
        return counts, rolled_back, seen

    def _split_key(self, model: str, ro: rollouts.Rollout) -> str:
        """What the split's counts are about, the same in every worker process that read the
        same rollout file and loaded the same files (core.split_sum)."""
        entry = self._registry.models.get(model)
        slots = entry.versions if entry is not None else {}
        files = [
            slot.signature if (slot := slots.get(v)) is not None else None for v, _ in ro.split
        ]
        return split_sum.key(entry.rollout_signature if entry is not None else None, files)

    def _judge_split(
        self,
        model: str,
        ro: rollouts.Rollout,
        counts: split_sum.Counts,
        rolled_back: set[int],
    ) -> None:
        """The split's rule on this process's counts plus the other workers' as last read."""
        if not self.decides_rollouts or rolled_back:
            return  # a worker counts only; or a decision is on its way
        if self._peer_shadows is not None:
            counts = split_sum.summed(
                model, self._split_key(model, ro), counts, self._peer_shadows.latest_splits()
            )
        found = split_sum.verdict(counts, dict(ro.split), ro.rules.max_error_rate)
        if found is None:
            return
        version, failed, requests, baseline = found
        rolled_back.add(version)
        split = {v: w for v, w in ro.split if v != version}
        why = (
            f"rolled back by rule: version {version} failed {failed} of {requests} "
            f"requests, the rest of the split {baseline:.1%} (max_error_rate "
            f"{ro.rules.max_error_rate:g} above it)"
        )
        # A shadow beside the split, and the rules, go on: the rule acted on the split only.
        self._decide(model, split or None, why, ro, keep=ro)

    def split_ruled_models(self) -> list[str]:
        """The models whose rollout has a split of several versions with a max_error_rate."""
        return [
            name
            for name, entry in list(self._registry.models.items())
            if (ro := entry.rollout) is not None and ro.rules.max_error_rate and len(ro.split) > 1
        ]

    def own_split_counts(self) -> list[split_sum.Row]:
        """This process's counts of each split in force (none summed): what it tells the first
        worker."""
        rows = []
        for model in self.split_ruled_models():
            ro, _ = self._registry.rollout_of(model)
            state = self._split_counts.get(model)
            if ro is None or state is None or state[0] is not ro:
                continue
            if not _same_loads(state[1], self._split_loads(model, ro)):
                continue  # counts of loads replaced since: they start afresh
            rows.append(split_sum.to_row(model, self._split_key(model, ro), state[2]))
        return rows

    def split_keys(self) -> dict[str, str]:
        """model -> the key of its split's counts in force here (retired counts of others go)."""
        out = {}
        for model in self.split_ruled_models():
            ro, _ = self._registry.rollout_of(model)
            if ro is not None:
                out[model] = self._split_key(model, ro)
        return out

    def judge_splits(self) -> None:
        """After the other workers' counts were pulled: every split's rule on the sum, whether
        or not this process routed any of its requests (the kernel may give every connection
        to other workers)."""
        for model in self.split_ruled_models():
            ro, _ = self._registry.rollout_of(model)
            if ro is None:
                continue
            counts, rolled_back, _ = self._split_state(model, ro, self._split_loads(model, ro))
            self._after(self._judge_split, model, ro, counts, rolled_back)

    def _split_loads(self, model: str, ro: rollouts.Rollout) -> tuple[LoadedVersion | None, ...]:
        """What each version of ``ro``'s split serves now (None: nothing loaded)."""
        entry = self._registry.models.get(model)
        slots = entry.versions if entry is not None else {}
        return tuple(
            slot.loaded if (slot := slots.get(v)) is not None else None for v, _ in ro.split
        )


# What a split's versions served when its counts started: weak, so that a version loaded
# again does not keep the replaced session (and its weights) alive.
_Loads = tuple["weakref.ref[LoadedVersion] | None", ...]


def _weak(loads: tuple[LoadedVersion | None, ...]) -> _Loads:
    return tuple(weakref.ref(lv) if lv is not None else None for lv in loads)


def _same_loads(then: _Loads, now: tuple[LoadedVersion | None, ...]) -> bool:
    """Does each split version serve the load it served then (no reload, unload or load)?"""
    return len(then) == len(now) and all(
        (ref() if ref is not None else None) is lv for ref, lv in zip(then, now, strict=True)
    )


# (the rollout as read, the loads its split's versions serve (weak), {version: [failed, ok]},
# the versions a rule took out of it, the failed requests already counted)
SplitState = tuple[Any, _Loads, dict[int, list[int]], set[int], dict[bytes, None]]
