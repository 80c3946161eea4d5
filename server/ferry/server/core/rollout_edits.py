"""A model's rollout as served (GetRollout) and as changed (SetRollout, and a rule's decision
through it): its split, its shadow and rules, its history, and what refuses a change that would
compare a version with itself or name versions that do not load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.server.core import rollout as rollouts
from ferry.server.core import shadow, shadow_sum
from ferry.server.core.config import load_config
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import validate_model_name
from ferry.server.core.types import RolloutView
from ferry.server.errors import FailedPrecondition, FerryError, InvalidArgument, ModelNotFound


class RolloutEdits:
    """DataPlane's share that shows and changes a rollout (a mixin: the state is the plane's,
    set in ``DataPlane.__init__``)."""

    _registry: ModelRegistry
    _shadows: shadow.Shadows
    _peer_shadows: shadow_sum.PeerShadows | None
    _unapplied: dict[str, str]

    if TYPE_CHECKING:

        def _comparison_key(self, model: str, ro: rollouts.Rollout) -> str: ...

        def _summed(
            self,
            stats: shadow.ShadowStatistics,
            others: list[shadow.ShadowStatistics] | None = None,
        ) -> shadow.ShadowStatistics: ...

    def rollout(
        self,
        model: str,
        history: list[dict[str, Any]] | None = None,
        kept: tuple[rollouts.Rollout | None, str] | None = None,
    ) -> RolloutView:
        """The model's rollout as served. ``history`` and ``kept`` (the file as read, for a
        model not served): already read off the event loop (``read_rollout``), else read here."""
        name = validate_model_name(model)
        mdir = self._registry.repository.model_dir(name)
        try:
            ro, error = self._registry.rollout_of(name)
        except ModelNotFound:
            if kept is None:
                if not mdir.is_dir():
                    raise
                kept = rollouts.read(mdir)
            # In the repository but not served (unloaded on request): its rollout is kept
            # with it and resumes at its next load, so it is shown as the file holds it (it
            # was NOT_FOUND, "not served here", as if there were none).
            ro, error = kept
        stats = None
        if ro is not None and ro.shadow is not None:
            key = self._comparison_key(name, ro)
            stats = self._summed(self._shadows.statistics(name, ro, key))
            if not ro.split and self._registry.default_version(name) == ro.shadow[0] and not error:
                # Accepted while another version was the default, then made the default (a
                # SetDefaultVersion, a newer version deleted): it is compared with itself.
                error = (
                    f"the shadow candidate {ro.shadow[0]} is now the version every request that "
                    "names none gets, so nothing is compared: pin the version that should keep "
                    "answering with a split, or end the shadow"
                )
        if name in self._unapplied:
            error = "; ".join(filter(None, (error, self._unapplied[name])))
        return RolloutView(
            name,
            ro.split if ro is not None else (),
            error,
            tuple(history if history is not None else rollouts.history(mdir)),
            ro.shadow if ro is not None else None,
            stats,
            ro.rules.as_dict() if ro is not None and ro.rules else {},
        )

    async def total_rollout(self, model: str) -> RolloutView:
        """``rollout`` with the shadow comparison of every worker as it is now (GetRollout):
        the others are asked first, off the serving path."""
        if self._peer_shadows is not None:
            await self._peer_shadows.pull()
        return await self.read_rollout(model)

    async def read_rollout(self, model: str) -> RolloutView:
        """``rollout`` with its file read in a thread: the history is up to 1 MiB of JSON,
        read and parsed on the event loop at every GetRollout and SetRollout, which stalled
        every request the process served meanwhile (for good on a hung repository mount)."""
        name = validate_model_name(model)
        mdir = self._registry.repository.model_dir(name)
        served = name in self._registry.models
        history, kept = await asyncio.to_thread(_rollout_on_disk, mdir, served)
        return self.rollout(name, history, kept)

    async def set_rollout(
        self,
        model: str,
        split: dict[int, float] | None,
        *,
        by: str,
        why: str,
        shadow_of: tuple[int, float] | None = None,
        rules: Mapping[str, float] | None = None,
        fresh_shadow: bool = True,
        decided_on: rollouts.Rollout | None = None,
    ) -> RolloutView:
        """Split the model's live traffic (None or {}: end the split) and/or shadow a fraction
        of it to a candidate (``shadow_of``: version, fraction); every worker and replica
        serving the repository follows, and the change is recorded. ``fresh_shadow``: the
        shadow's comparison starts afresh (a person's change; a rule's keeps it).
        ``decided_on``: a rule's change, refused if the rollout it judged was changed since."""
        name = validate_model_name(model)
        wanted = rollouts.parse_split(split) if split else rollouts.Rollout(())
        if shadow_of is not None:
            wanted = rollouts.Rollout(
                wanted.split, rollouts.parse_shadow(*shadow_of), rollouts.parse_rules(rules)
            )
            if not fresh_shadow:  # a rule's change: the comparison goes on
                entry = self._registry.models.get(name)
                wanted = rollouts.going_on(entry.rollout if entry else None, wanted)
        elif rules and (parsed_rules := rollouts.parse_rules(rules)):
            # Only rules that act (an empty rules message, all 0, is none: it refused ending a
            # rollout, saying promote_after and min_cosine need a shadow).
            if parsed_rules.promote_after or parsed_rules.min_cosine or not wanted.split:
                raise InvalidArgument(
                    "promote_after and min_cosine act on a shadow's comparison: set a shadow "
                    "version too (a split alone takes max_error_rate)"
                )
            wanted = rollouts.Rollout(wanted.split, None, parsed_rules)
        parsed = wanted if wanted.split or wanted.shadow else None
        shadowed = parsed if parsed is not None and parsed.shadow is not None else None
        outcome = await self._registry.set_rollout(
            name,
            parsed,
            by=by,
            why=why,
            decided_on=decided_on,
            # Under the edit lock: checked before it, a SetDefaultVersion beside it made the
            # candidate the default version, unpromoted and unjudged.
            check=(lambda: self._check_shadow(name, shadowed)) if shadowed is not None else None,
        )
        if parsed is not None and parsed.shadow is not None and fresh_shadow:
            self._shadows.forget(name)
        # Only the versions this rollout names: syncing the model retries every failed version,
        # and one the rollout does not touch made a change that was applied answer an error.
        named = {f"{name}/{v}:" for v in (parsed.versions if parsed else ())}
        failed = [f for f in outcome.failed if f.split(" ", 1)[0] in named]
        if failed:
            raise FailedPrecondition(
                f"the split is recorded, but these versions did not load: {'; '.join(failed)}; "
                "requests for them go to the default version until they do"
            )
        return await self.read_rollout(name)

    def _check_shadow(self, name: str, wanted: rollouts.Rollout) -> None:
        """A shadow of the one version that answers every request compares it with itself:
        it was accepted, compared nothing (``_maybe_shadow`` skips it) and a rule could
        neither promote nor roll it back. (A canary's version in a split may be shadowed: the
        requests the others answer are compared.) Run under the model's edit lock, and the
        default the model's folder names counts too: a SetDefaultVersion that wrote it is
        followed (served) only after it released the lock."""
        assert wanted.shadow is not None
        candidate = wanted.shadow[0]
        if wanted.split:
            serving = {v for v, w in wanted.split if w > 0}
            where = "the only version in the split"
        else:
            default = self._registry.default_version(name)
            serving = {default} if default is not None else set()
            if self._written_default(name) == candidate:
                serving = {candidate}
            where = "the version every request that names none gets"
        if serving == {candidate}:
            raise FailedPrecondition(
                f"version {candidate} of {name!r} is {where}, so it would be compared with "
                "itself: pin the version that should keep answering with a split (e.g. "
                "split {N: 1}) and shadow the candidate beside it"
            )

    def _written_default(self, name: str) -> int | None:
        """The default version the model's folder names now (its config's, else the newest
        its version policy serves), as the registry serves it once it follows the last edit
        (None: its config does not parse, which serves nothing new)."""
        repository = self._registry.repository
        try:
            config = load_config(repository.model_dir(name))
            newest = max(config.version_policy.select(repository.list_versions(name)), default=None)
        except FerryError:
            return None
        return config.default_version or newest


def _rollout_on_disk(
    mdir: Path, served: bool
) -> tuple[list[dict[str, Any]], tuple[rollouts.Rollout | None, str] | None]:
    """A model's rollout history and, for a model not served whose folder is there, its
    rollout file as read (``DataPlane.read_rollout``, in a thread)."""
    kept = None if served or not mdir.is_dir() else rollouts.read(mdir)
    return rollouts.history(mdir), kept
