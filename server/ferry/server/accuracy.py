"""The accuracy budget's rules that the conversion (a variant against fp32 or PyTorch) and the
rollout shadow (a candidate against the served version) share, so that one ``min_cosine`` means
the same wherever it is given.

A cosine sees directions only, so the budget also bounds the size of the error
(``max_rel_error``) and, for outputs of one value per sample, the error against how those values
vary (``SPREAD`` says when they vary enough to be judged so)."""

from __future__ import annotations

import math

# An output of one value per sample whose spread over the samples is under this share of its
# size hardly varies: it is not judged on its spread (that would judge noise).
SPREAD = 1e-3


def max_rel_error(min_cosine: float) -> float | None:
    """The relative error a cosine budget allows: sqrt(2 (1 - min_cosine)), the error of a
    variant whose outputs keep their size and turn by the budget's angle (0.141 at 0.99). None
    where the budget is off (min_cosine <= 0)."""
    return math.sqrt(2.0 * (1.0 - min_cosine)) if min_cosine > 0 else None
