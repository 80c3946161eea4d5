"""A rollout rule's decision (a split's version rolled out, a shadow's candidate promoted or
rolled back), applied as a person's change would be, off the request: recorded, and tried again
while it cannot be written (a full or read-only disk) and what it judged still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ferry.server.core import rollout as rollouts
from ferry.server.core import shadow
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.types import RolloutView
from ferry.server.errors import FerryError

# Under the plane's name, which the rules' decisions were always logged by.
log = logging.getLogger("ferry.server.core.dataplane")
# Seconds before a rule's decision that could not be written (a full or read-only disk) is
# tried again: doubled after each failure, up to the last.
DECISION_RETRY = (0.5, 30.0)


class RuleDecisions:
    """DataPlane's share that applies the rules' decisions (a mixin: the state is the plane's,
    set in ``DataPlane.__init__``)."""

    _registry: ModelRegistry
    _decisions: set[asyncio.Task[None]]
    # model -> why a rule's decision is not in force yet (its write failed; tried again
    # until it is written or another change replaces what it judged): GetRollout, /metrics
    _unapplied: dict[str, str]
    _closing: asyncio.Event

    if TYPE_CHECKING:

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
        ) -> RolloutView: ...

    def _decide(
        self,
        model: str,
        split: dict[int, float] | None,
        why: str,
        decided_on: rollouts.Rollout,
        *,
        keep: rollouts.Rollout | None = None,
        stats: shadow.ShadowStatistics | None = None,
    ) -> None:
        """A rule's decision on ``decided_on`` (the rollout it judged): recorded and applied as
        a person's would be, off the request, unless another change was made meanwhile (then
        it is dropped, and ``stats``, the comparison judged, may be judged again).
        ``keep``: the rollout whose shadow and rules stay (a split's rule changed the split
        alone; it dropped a live shadow and every rule with it)."""
        log.warning("model %s: %s", model, why)
        shadow_of = keep.shadow if keep is not None else None
        rules = keep.rules.as_dict() if keep is not None and keep.rules else None
        if shadow_of is None and not split:
            rules = None  # a split's rule needs a split; none is left

        async def apply() -> None:
            delay, most = DECISION_RETRY
            traced = False
            while True:
                try:
                    await self.set_rollout(
                        model,
                        split,
                        by="rollout rules",
                        why=why,
                        shadow_of=shadow_of,
                        rules=rules,
                        fresh_shadow=False,
                        decided_on=decided_on,
                    )
                except Exception as exc:
                    # An exception other than a FerryError is a fault of the server's own:
                    # uncaught, it ended the task, the decision was lost, and what it judged
                    # stayed decided, never judged again. Its traceback is logged once, and it
                    # is tried again as a disk's failure is.
                    unexpected = not isinstance(exc, FerryError)
                    failure = (
                        exc.message
                        if isinstance(exc, FerryError)
                        else f"{type(exc).__name__}: {exc}"
                    )
                    if unexpected and not traced:
                        traced = True
                        log.exception("model %s: a rule's decision failed unexpectedly", model)
                    if self._judged_in_force(model, decided_on) and not self._closing.is_set():
                        # Not written (a full or read-only disk): the rollout it judged still
                        # serves, a failing version its share, so it is tried again, and said
                        # where a person looks. Dropped, the rollback never happened.
                        self._unapplied[model] = (
                            f"a rule's decision is not in force yet ({why}): {failure}; "
                            f"trying again every {most:g} s at most"
                        )
                        log.warning(
                            "model %s: a rule's decision could not be applied, trying again in "
                            "%g s: %s",
                            model,
                            delay,
                            failure,
                        )
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._closing.wait(), delay)
                        delay = min(delay * 2, most)
                        continue
                    if stats is not None:
                        stats.decided = False  # the rollout in force is judged at the next outcome
                    log.warning("model %s: a rule's decision was not applied: %s", model, failure)
                self._unapplied.pop(model, None)
                return

        task = asyncio.get_running_loop().create_task(apply())
        self._decisions.add(task)
        task.add_done_callback(self._decisions.discard)

    def _judged_in_force(self, model: str, decided_on: rollouts.Rollout) -> bool:
        """Whether the rollout a rule judged still serves (no other change replaced it)."""
        try:
            return self._registry.rollout_of(model)[0] is decided_on
        except FerryError:
            return False

    def unapplied_decisions(self) -> dict[str, str]:
        """model -> why a rule's decision is not in force yet (/metrics)."""
        return dict(self._unapplied)
