"""Retries with exponential backoff and jitter, inside one deadline.

Only idempotent calls go through here: inference, metadata, listing and statistics may run twice
without harm, an upload or a conversion may not, so their clients never retry. The ``timeout`` a
caller gives is the budget for every attempt and every pause together, which is what a caller with
a latency objective means by it; an attempt never gets more than what is left of the budget.

A failure is retried only when its status code is in ``retryable_codes`` *and* its exception class
says it can succeed later (``FerryError.retryable``): a request over a configured limit
(``LimitExceededError``) comes back as RESOURCE_EXHAUSTED too, but retrying it only burns budget.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from ferry.client._errors import FerryError, InvalidArgumentError

T = TypeVar("T")

# CANCELLED only as ServerCancelledError (the server reset the call unstarted): the class says.
DEFAULT_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)


@dataclass(frozen=True)
class RetryPolicy:
    """How an idempotent call is retried.

    ``max_attempts`` counts the first try (1: never retry). The pause before attempt ``n + 1`` is
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))`` scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``, so that clients failed by the same event do not come back in step.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retryable_codes: frozenset[grpc.StatusCode] = field(default=DEFAULT_RETRYABLE_CODES)

    def __post_init__(self) -> None:
        # Refused here, not at the first retryable error: a nan backoff reached time.sleep
        # (ValueError mid-call), max_attempts=2.5 made 3 attempts, and codes given by name
        # ({"UNAVAILABLE"}) matched nothing, so nothing was retried and nothing said so.
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise InvalidArgumentError(f"max_attempts must be an integer >= 1, got {attempts!r}")
        for name in ("initial_backoff", "max_backoff", "multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
        if not (0 <= self.initial_backoff < math.inf and 0 <= self.max_backoff < math.inf):
            raise InvalidArgumentError(
                "backoffs must be finite numbers of seconds >= 0, got "
                f"{self.initial_backoff!r} and {self.max_backoff!r}"
            )
        if not 1 <= self.multiplier < math.inf:
            raise InvalidArgumentError(
                f"multiplier must be a finite number >= 1, got {self.multiplier}"
            )
        if not 0 <= self.jitter <= 1:
            raise InvalidArgumentError(f"jitter must be within [0, 1], got {self.jitter}")
        codes: object = self.retryable_codes
        if isinstance(codes, str | bytes) or not all(
            isinstance(c, grpc.StatusCode) for c in self.retryable_codes
        ):
            raise InvalidArgumentError(
                "retryable_codes must be grpc.StatusCode members "
                f"(e.g. grpc.StatusCode.UNAVAILABLE), got {codes!r}"[:300]
            )
        inert = sorted(c.name for c in self.retryable_codes if c not in DEFAULT_RETRYABLE_CODES)
        if inert:
            # Accepted, they retried nothing and said nothing: a code is retried only when its
            # error can succeed later (FerryError.retryable), and no error of these codes can.
            raise InvalidArgumentError(
                f"retryable_codes {inert} are never retried: only UNAVAILABLE, "
                "RESOURCE_EXHAUSTED (not over a limit) and a CANCELLED the server sent can "
                "succeed on another try; choose among those"
            )

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """One attempt only: for calls that must not run twice."""
        return cls(max_attempts=1)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to pause after failed attempt number ``attempt`` (1-based)."""
        try:
            grown = self.initial_backoff * self.multiplier ** (attempt - 1)
        except OverflowError:  # 10.0 ** 400 at the 401st attempt: past any max_backoff
            grown = math.inf
        base = min(self.max_backoff, grown)
        if not self.jitter:
            return base
        u = (rng or _RNG).uniform(-1.0, 1.0)
        return max(0.0, base * (1.0 + self.jitter * u))

    def should_retry(self, error: FerryError, attempt: int) -> bool:
        """Whether failed attempt ``attempt`` (1-based) may be followed by another one."""
        return (
            attempt < self.max_attempts
            and error.code in self.retryable_codes
            and type(error).retryable
            and not _over_message_limit(error)
        )


def _over_message_limit(error: FerryError) -> bool:
    """gRPC itself answers RESOURCE_EXHAUSTED, with no kind, for a message over a size limit (its
    own or the server's); the same message will be too large next time too."""
    return error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in error.message


NO_RETRY = RetryPolicy.disabled()
_RNG = random.Random()


def client_retry(retry: object) -> RetryPolicy:
    """A client's ``retry`` argument: a RetryPolicy, or None for never retrying (as
    ``RetryPolicy.disabled()``); anything else is refused now, not at the first retryable error."""
    if retry is None:
        return RetryPolicy.disabled()
    if not isinstance(retry, RetryPolicy):
        raise InvalidArgumentError(
            f"retry must be a RetryPolicy or None, got {type(retry).__name__}"
        )
    return retry


class _Attempts:
    """The bookkeeping both retry loops share: the deadline, the attempt number, and whether (and
    how long) to pause before the next attempt. The loops differ only in how they call and sleep."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        clock: Callable[[], float],
        rng: random.Random | None,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._rng = rng
        self._deadline = None if timeout is None else clock() + timeout
        self._attempt = 1

    def remaining(self) -> float | None:
        """What is left of the budget: the next attempt's timeout (None: no deadline)."""
        return None if self._deadline is None else self._deadline - self._clock()

    def pause_after(self, error: FerryError) -> float | None:
        """Seconds to pause before retrying after ``error``; None when it is final, because the
        policy says so or no budget is left for a pause and another attempt (the last error says
        more than a bare deadline would)."""
        if not self._policy.should_retry(error, self._attempt):
            return None
        pause = self._policy.backoff(self._attempt, self._rng)
        left = self.remaining()
        if left is not None and left <= pause:
            return None
        self._attempt += 1
        return pause


def call_with_retry(
    attempt_fn: Callable[[float | None], T],
    policy: RetryPolicy,
    timeout: float | None,
    *,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Run ``attempt_fn(per_attempt_timeout)`` until it returns, within ``timeout`` in total.

    ``attempt_fn`` raises FerryError on failure. When no budget is left for a pause and another
    attempt, the last error is raised as it was: it says more than a bare deadline would.
    """
    attempts = _Attempts(policy, timeout, clock, rng)
    while True:
        try:
            return attempt_fn(attempts.remaining())
        except FerryError as exc:
            pause = attempts.pause_after(exc)
            if pause is None:
                raise
            sleep(pause)


async def acall_with_retry(
    attempt_fn: Callable[[float | None], Awaitable[T]],
    policy: RetryPolicy,
    timeout: float | None,  # noqa: ASYNC109 - a budget spanning attempts, not one await
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """The asyncio twin of :func:`call_with_retry`; pauses with ``asyncio.sleep``."""
    attempts = _Attempts(policy, timeout, clock, rng)
    while True:
        try:
            return await attempt_fn(attempts.remaining())
        except FerryError as exc:
            pause = attempts.pause_after(exc)
            if pause is None:
                raise
            await asyncio.sleep(pause)
