"""What a rollout rule's mixin (``SplitRule``, ``ShadowRules``) calls on ``DataPlane``, declared
once for the type checker: ``_after`` (a step run after the caller's answer) and ``_decide``
(``RuleDecisions``: a rule's decision recorded and applied). Nothing here exists at run time, so
the plane's own methods are the ones called."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ferry.server.core import rollout as rollouts
from ferry.server.core import shadow


class RuleHost:
    if TYPE_CHECKING:

        @staticmethod
        def _after(step: Callable[..., None], *args: Any) -> None: ...

        def _decide(
            self,
            model: str,
            split: dict[int, float] | None,
            why: str,
            decided_on: rollouts.Rollout,
            *,
            keep: rollouts.Rollout | None = None,
            stats: shadow.ShadowStatistics | None = None,
        ) -> None: ...
