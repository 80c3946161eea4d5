"""What a load test does, validated before anything is sent.

The caps are hard limits, not defaults: a load generator is a traffic cannon, and a typo (an extra
zero on the rate, a duration in milliseconds) should be refused, not obeyed. For the same reason the
target must be a loopback address unless the caller says otherwise with ``allow_remote``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry.client._channel import DEFAULT_MAX_MESSAGE_BYTES, TLSConfig, resolve_target
from ferry.client._errors import InvalidArgumentError
from ferry.client._requests import MAX_TIMEOUT_S

MAX_DURATION = 3600.0  # seconds, all levels of a sweep together (warm-up included)
MAX_REQUESTS = 10_000_000  # per level
MAX_CONCURRENCY = 4096
MAX_RATE = 200_000.0  # requests per second
MAX_LEVELS = 32
MAX_CONNECTIONS = 64

Mode = Literal["unary", "stream"]
Protocol = Literal["ferry", "kserve"]
Arrival = Literal["constant", "poisson"]


class LoadTestConfigError(InvalidArgumentError):
    """A load test was asked for something it refuses to do; the message says what to change."""


@dataclass(frozen=True)
class LoadTestConfig:
    """One load test: a closed loop over ``concurrency`` levels, or an open loop over ``rate``s.

    Each level runs for ``duration`` seconds or ``requests`` requests, whichever ends first (at
    least one must be set). ``warmup`` seconds of load at the first level run before anything is
    measured. ``inputs`` replaces the inputs generated from the model's metadata; ``shapes``
    overrides dynamic dimensions of generated ones (``batch_size`` fills a batch dimension).
    ``max_message_bytes`` bounds each request and answer as the clients' option of that name
    does (80 MiB by default); ``ferry loadtest`` leaves the bound to the server's own limit.
    """

    model: str
    target: str | Sequence[str] = "127.0.0.1:8001"
    version: int | None = None
    concurrency: tuple[int, ...] = (1,)
    rate: tuple[float, ...] | None = None
    arrival: Arrival = "constant"
    duration: float | None = 10.0
    requests: int | None = None
    warmup: float = 1.0
    mode: Mode = "unary"
    protocol: Protocol = "ferry"
    batch_size: int = 1
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    inputs: Mapping[str, Any] | None = None
    timeout: float = 30.0
    connections: int = 1
    seed: int = 0
    allow_remote: bool = False
    tls: TLSConfig | None = None
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        # One level may be given as a bare number (concurrency=4, rate=100): it raised
        # TypeError ("'int' object is not iterable") from deep inside.
        if isinstance(self.concurrency, int | float):
            object.__setattr__(self, "concurrency", (self.concurrency,))
        if isinstance(self.rate, int | float):
            object.__setattr__(self, "rate", (self.rate,))

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def levels(self) -> tuple[float, ...]:
        """The swept values: requests per second (open loop) or concurrencies (closed loop)."""
        if self.rate is not None:
            return tuple(self.rate)
        return tuple(float(c) for c in self.concurrency)

    def validate(self) -> None:
        """Raise LoadTestConfigError for anything out of bounds or contradictory."""
        _check(bool(self.model), "a model name is required")
        _check(self.mode in ("unary", "stream"), f"mode must be unary or stream, not {self.mode!r}")
        _check(
            self.protocol in ("ferry", "kserve"),
            f"protocol must be ferry or kserve, not {self.protocol!r}",
        )
        _check(
            self.arrival in ("constant", "poisson"),
            f"arrival must be constant or poisson, not {self.arrival!r}",
        )
        levels = self.levels
        _check(0 < len(levels) <= MAX_LEVELS, f"give 1 to {MAX_LEVELS} load levels")
        if self.rate is not None:
            for r in self.rate:
                _check(0 < r <= MAX_RATE, f"rate must be within (0, {MAX_RATE:g}] req/s, got {r:g}")
        else:
            for c in self.concurrency:
                _check(
                    isinstance(c, int) and 1 <= c <= MAX_CONCURRENCY,
                    f"concurrency must be within [1, {MAX_CONCURRENCY}], got {c}",
                )
        _check(
            self.duration is not None or self.requests is not None,
            "set a duration or a request count (or both: whichever ends first)",
        )
        if self.duration is not None:
            _check(self.duration > 0, f"duration must be > 0 seconds, got {self.duration:g}")
        if self.requests is not None:
            _check(
                isinstance(self.requests, int) and not isinstance(self.requests, bool),
                f"requests must be a whole number, got {self.requests!r}",
            )
            _check(
                1 <= self.requests <= MAX_REQUESTS,
                f"requests must be within [1, {MAX_REQUESTS:,}] per level, got {self.requests:,}",
            )
        _check(self.warmup >= 0, f"warmup must be >= 0 seconds, got {self.warmup:g}")
        planned = self.warmup + sum(self._level_seconds(level) for level in levels)
        _check(
            planned <= MAX_DURATION,
            f"the run would last {planned:g} s (warm-up + each level's duration, or its "
            f"requests / rate in an open loop); the cap is {MAX_DURATION:g} s: shorten the "
            "duration or the sweep, or raise the rate",
        )
        # Each of these was taken as given and failed later with a bare ValueError or
        # TypeError (timeout=1e20 from the client, batch_size=1.5 after the metadata call).
        _check(
            0 < self.timeout < MAX_TIMEOUT_S,
            f"timeout must be a number of seconds within (0, {MAX_TIMEOUT_S:g}), got "
            f"{self.timeout!r}",
        )
        _check(
            _whole(self.batch_size) and self.batch_size >= 1,
            f"batch size must be a whole number >= 1, got {self.batch_size!r}",
        )
        _check(
            _whole(self.connections) and 1 <= self.connections <= MAX_CONNECTIONS,
            f"connections must be a whole number within [1, {MAX_CONNECTIONS}], got "
            f"{self.connections!r}",
        )
        _check(
            _whole(self.max_message_bytes) and 0 < self.max_message_bytes < 2**31,
            f"max_message_bytes must be a whole number within 1..{2**31 - 1}, got "
            f"{self.max_message_bytes!r}",
        )
        _check(
            _whole(self.seed) and 0 <= self.seed < 2**32,
            f"seed must be a whole number within [0, 2**32), got {self.seed!r}",
        )
        if not self.allow_remote:
            check_loopback(self.target)

    def _level_seconds(self, level: float) -> float:
        """How long a level is planned to last. An open loop's request count fixes its length
        too (``-n 10 --rate 0.001`` sends for 9,000 s), so it counts against the cap as a
        duration does; a closed loop's count lasts as long as the server takes."""
        seconds = self.duration if self.duration is not None else 0.0
        if self.rate is not None and self.requests is not None:
            by_count = (self.requests - 1) / level  # the first arrival goes at once
            seconds = by_count if self.duration is None else min(seconds, by_count)
        return seconds


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LoadTestConfigError(message)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_loopback(target: str | Sequence[str]) -> None:
    """Refuse a target that is not on this machine: load against someone else's server should
    take a deliberate flag, not a pasted address."""
    resolved, _ = resolve_target(target)
    if resolved.startswith(("unix:", "unix-abstract:")):
        return
    body = resolved
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if body.startswith(scheme):
            body = body[len(scheme) :]
            break
    for endpoint in body.split(","):
        host = endpoint.rpartition(":")[0] if ":" in endpoint else endpoint
        if not _is_loopback(host):
            raise LoadTestConfigError(
                f"target {endpoint!r} is not a loopback address: load-testing another machine "
                "needs allow_remote=True (--allow-remote), and only against servers you operate"
            )
