"""How long a batch will run, predicted from the batches that ran: the batcher's basis for refusing
at arrival a request that cannot finish before its deadline (predictive load shedding).

A batch's cost is modelled as a line, ``fixed + per_unit * units``, fitted by exponentially
weighted least squares (BentoML's shedding fits the same shape): on most models a batch of 32
costs far less than 32 batches of 1, so "items ahead x cost of one" would refuse work that batching
would finish in time. Recent batches weigh most, so the line follows a model whose speed changes
(a neighbour taking the cores, a warm cache).
"""

from __future__ import annotations

__all__ = ["ServiceTime"]


class ServiceTime:
    """Online fit of batch duration (seconds) against batch size (units)."""

    __slots__ = ("_decay", "_sx", "_sxx", "_sxy", "_sy", "_w", "fixed", "per_unit")

    def __init__(self, decay: float = 0.05) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        self._decay = decay
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        # Until a batch has run nothing is known: predict 0, so nothing is refused on a guess.
        self.fixed = 0.0
        self.per_unit = 0.0

    @property
    def ready(self) -> bool:
        return self._w > 0.0

    def reset(self) -> None:
        """Forget every batch seen: predict 0 (nothing known) until the next one."""
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.fixed = self.per_unit = 0.0

    def observe(self, units: int, seconds: float) -> None:
        """Fold in one batch that ran ``units`` units in ``seconds``."""
        if not seconds >= 0.0:  # a clock that went backwards, or NaN
            return
        x = float(max(units, 1))
        keep = 1.0 - self._decay
        self._w = self._w * keep + 1.0
        self._sx = self._sx * keep + x
        self._sy = self._sy * keep + seconds
        self._sxx = self._sxx * keep + x * x
        self._sxy = self._sxy * keep + x * seconds
        self._refit()

    def _refit(self) -> None:
        w = self._w
        mx, my = self._sx / w, self._sy / w
        var = self._sxx / w - mx * mx
        if var > 1e-9 * mx * mx:
            slope = (self._sxy / w - mx * my) / var
            intercept = my - slope * mx
            if slope >= 0.0 and intercept >= 0.0:
                self.fixed, self.per_unit = intercept, slope
                return
            if slope < 0.0:
                # Bigger batches measured faster (noise, or a cache warming): a flat line.
                self.fixed, self.per_unit = my, 0.0
                return
        # One batch size seen so far (or a line through negative time): proportional to size,
        # the pessimistic reading, until batches of other sizes say how much batching saves.
        self.fixed, self.per_unit = 0.0, my / mx

    def predict(self, units: int) -> float:
        """Seconds a batch of ``units`` units is expected to run."""
        return self.fixed + self.per_unit * max(units, 1)
