"""The one door into the core: every protocol adapter calls this and nothing else.

Inference (unary and streams), metadata, statistics, readiness, listing, the repository index
and load/unload/refresh all go through here, in the core's own types (``core.types``), so
``ferry.v1``, the Open Inference Protocol over gRPC and over HTTP give the same answers, the same
errors and the same repository outcomes, and every request is counted and observed exactly once,
here. The parts that are not the request path live beside it: ``core.describe`` (metadata,
statistics), ``core.management`` (load, unload, refresh), ``core.rollout_edits`` (GetRollout,
SetRollout), ``core.split_rule`` and ``core.shadow_rules`` (what a routed request's outcome
feeds) and ``core.rule_decisions`` (a rule's change, applied).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ferry.server.batching.batcher import DEADLINE_SLACK
from ferry.server.core import describe, inputs, shadow, shadow_sum
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.management import RepositoryControl
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.rollout_edits import RolloutEdits
from ferry.server.core.rule_decisions import RuleDecisions
from ferry.server.core.shadow import ShadowStatistics
from ferry.server.core.shadow_rules import ShadowRules
from ferry.server.core.shadow_sum import add_up as add_up_shadows
from ferry.server.core.shadow_sum import from_row as shadow_from_row
from ferry.server.core.shadow_sum import to_row as shadow_to_row
from ferry.server.core.split_rule import SplitRule, SplitState
from ferry.server.core.split_sum import add_up as add_up_splits
from ferry.server.core.stats_merge import merge, sum_request_rows
from ferry.server.core.streams import SHARED_FACTOR, StreamBudget, run_stream
from ferry.server.core.types import (
    IndexEntry,
    InferenceRequest,
    InferenceResult,
    Limits,
    ModelMetadata,
    Observer,
    State,
    VersionStatistics,
    VersionStatus,
    WireRequest,
)
from ferry.server.errors import (
    DeadlineExceeded,
    FerryError,
)

log = logging.getLogger(__name__)

R = TypeVar("R")
# The other worker processes' snapshots of (model, version): see ferry.server.workers.
PeerStatistics = Callable[[str, int | None], Awaitable[list[VersionStatistics]]]
Resp = TypeVar("Resp")


def _no_observer(model: str, version: int, outcome: BaseException | None, seconds: float) -> None:
    return None


class DataPlane(SplitRule, ShadowRules, RuleDecisions, RolloutEdits, RepositoryControl):
    def __init__(
        self,
        registry: ModelRegistry,
        limits: Limits | None = None,
        *,
        max_stream_in_flight: int = 1024,
        default_timeout: float = 0.0,
    ) -> None:
        self._registry = registry
        self._draining = False  # drain(): the server is stopping
        self._stopping = asyncio.Event()  # drain(): streams stop reading (core.streams)
        self.limits = limits or Limits()
        self._observe: Observer = _no_observer  # observe_with() sets the server's metrics
        self._peers: PeerStatistics | None = None  # sum_with() sets the other workers'
        self._shadows = shadow.Shadows()
        # The other workers' comparisons (sum_shadows_with), in the first worker only.
        self._peer_shadows: shadow_sum.PeerShadows | None = None
        self._decisions: set[asyncio.Task[None]] = set()
        # model -> why a rule's decision is not in force yet (its write failed; tried again
        # until it is written or another change replaces what it judged): GetRollout, /metrics
        self._unapplied: dict[str, str] = {}
        self._closing = asyncio.Event()
        # model -> (the rollout as read, the loads its split's versions serve (weak), {version:
        # [failed, ok]} of the requests its split routed, the versions a rule took out of it,
        # the failed requests already counted): all of it starts afresh with each rollout read
        # (core.rollout, one object per read of the file), the counts also when a version is
        # loaded again from new files; see _check_split_errors.
        self._split_counts: dict[str, SplitState] = {}
        # Rollout rules are applied by the process that owns the repository's management (the
        # first of --workers, the control replica); the others serve and compare only.
        self.decides_rollouts = True
        self.max_stream_in_flight = max_stream_in_flight
        self.stream_budget = StreamBudget(SHARED_FACTOR * max_stream_in_flight)
        # Seconds a request with no deadline at all (none from the call, the request or the
        # model's default_timeout_ms) may take; 0: unbounded (only max_queue_size bounds it).
        self.default_timeout = default_timeout

    def observe_with(self, observer: Observer) -> None:
        """Set the one observer of every inference request (the server's metrics)."""
        self._observe = observer

    # ---- inference ----
    async def infer(
        self, request: InferenceRequest | WireRequest, *, deadline: float | None = None
    ) -> InferenceResult:
        """``request`` may still be in wire form (decoded here, so a request that fails to
        decode is counted like any other failure). ``deadline`` is absolute on
        ``time.monotonic()`` (the call's own deadline)."""
        start = time.perf_counter()
        # The request's own timeout counts from here, its arrival: counted after the decoding
        # (a JSON body, thousands of strings), the server waited that much longer than its
        # client, which had given up.
        arrived = time.monotonic()
        lv: LoadedVersion | None = None
        # The request reached its version's queue: a failure before it (inputs the interface
        # refuses, a deadline already past) is the client's, the same on every version of a
        # split, and never counts for its max_error_rate. Counted, a client retrying one bad
        # request under one id (which sticks to one version) rolled an identical version back.
        queued = False
        try:
            if isinstance(request, InferenceRequest):
                decoded = request
            else:
                try:
                    decoded = request.decode(self.limits)
                except FerryError:
                    # Counted against the version it asked for (or the one that answers a
                    # request naming none), as an input its version refuses is: it was in
                    # ferry_requests_total under version "0" and in no ModelStatistics fail.
                    lv = self._undecoded(request)
                    raise
            lv = self._registry.route(decoded.model, decoded.version, decoded.id)
            work = inputs.validate(lv, decoded, self.limits)
            deadline = _deadline(lv, decoded, deadline, self.default_timeout, arrived)
            priority = decoded.priority or lv.config.batching.default_priority
            queued = True
            outputs = await lv.batcher.submit(work, deadline=deadline, priority=priority)
        except asyncio.CancelledError:
            # A call the client cancelled is nobody's outcome: not observed. One cancelled by
            # its deadline (grpc ends the call then, often before the queue's own timer fires)
            # failed with DEADLINE_EXCEEDED, and is counted so: most such calls were counted
            # nowhere, neither in ModelStatistics' fail nor in ferry_requests_total.
            if lv is not None and _ended_by_deadline(deadline):
                timed_out = DeadlineExceeded(f"the deadline of a request to {lv.name!r} passed")
                self._failed(request, lv, decoded.version is None, timed_out, start)
            raise
        except Exception as exc:
            routed = queued and decoded.version is None
            self._failed(request, lv, routed, exc, start, decoded=decoded if routed else None)
            raise
        elapsed = time.perf_counter() - start
        lv.stats.record_success(int(elapsed * 1e9))
        self._observe(lv.name, lv.version, None, elapsed)
        if decoded.version is None:
            self._after(self._routed_answer, decoded, lv, outputs, elapsed)
        if decoded.outputs:
            outputs = {name: outputs[name] for name in decoded.outputs}
        return InferenceResult(decoded.model, lv.version, decoded.id, outputs)

    def _undecoded(self, request: WireRequest) -> LoadedVersion | None:
        """The served version a request that failed to decode would have reached, if there is
        one: the one it names, or else the one its id picks (a split's), or without an id the
        one that answers requests naming none. A version named but invalid is none of them (its
        label stays "0", an unknown version's)."""
        if request.version_named and not request.version_label:
            return None
        try:
            if not request.version_label and request.request_id:
                # Under a split its id picks its version, as had it decoded: it was counted on
                # the split's largest share whatever its id.
                return self._registry.route(request.model, None, request.request_id)
            version = request.version_label or self._registry.serving_version(request.model)
            return self._registry.get(request.model, version)
        except FerryError:
            return None

    def _failed(
        self,
        request: InferenceRequest | WireRequest,
        lv: LoadedVersion | None,
        routed: bool,
        exc: Exception,
        start: float,
        *,
        decoded: InferenceRequest | None = None,
    ) -> None:
        """Count and observe a request that failed (``routed``: the rollout chose its version;
        ``decoded``: the request, which the split's rule tells from its repeats)."""
        elapsed = time.perf_counter() - start
        if lv is not None and isinstance(exc, FerryError):
            lv.stats.record_failure(int(elapsed * 1e9))
            if routed:
                self._after(self._check_split_errors, lv, True, decoded)
        model = lv.name if lv is not None else request.model
        version = lv.version if lv is not None else _label(request)
        self._observe(model, version, exc, elapsed)

    def stream(
        self,
        requests: AsyncIterator[R],
        respond: Callable[[R], Awaitable[Resp]],
        *,
        ordered: bool = False,
    ) -> AsyncIterator[Resp]:
        """A bidirectional stream's requests, run concurrently under this server's bounds on
        what one stream, and every stream together, may have in flight; ``respond`` turns one
        request into its response (calling ``infer``, and turning an error into the protocol's
        error response). ``ordered``: answered in request order (``run_stream``). Once the server
        drains, a stream reads no more, answers what it read and ends UNAVAILABLE."""
        return run_stream(
            requests,
            respond,
            self.max_stream_in_flight,
            self.stream_budget,
            ordered=ordered,
            stopping=self._stopping,
        )

    # ---- what is served ----
    def metadata(self, model: str, version: int | None = None) -> ModelMetadata:
        """A version's, or with none named the version that answers requests that name none
        (a live split's largest share): core.describe."""
        return describe.metadata(self._registry, model, version, self.default_timeout)

    def statistics(self, model: str = "", version: int | None = None) -> list[VersionStatistics]:
        """Every served version (no model), a model's served versions (no version), or one."""
        return describe.statistics(self._registry, model, version)

    def sum_with(self, peers: PeerStatistics) -> None:
        """Add the other worker processes' statistics to what ``total_statistics`` answers."""
        self._peers = peers

    async def total_statistics(
        self, model: str = "", version: int | None = None
    ) -> list[VersionStatistics]:
        """What a user asks for (ModelStatistics): with several worker processes, the sum over
        all of them, as if one process had served every request; else ``statistics``."""
        local = self.statistics(model, version)
        if self._peers is None:
            return local
        return merge([*local, *(await self._peers(model, version))])

    def list_models(self, model: str = "") -> list[VersionStatus]:
        return self._registry.statuses(model)

    def served_files(self, model: str = "") -> dict[str, dict[int, Any]]:
        """model -> READY version -> what its files were when loaded (Registry.served_files)."""
        return self._registry.served_files(model)

    def earlier_loads(self, model: str = "") -> dict[str, list[int]]:
        """model -> the READY versions that serve the load made before their files changed,
        their reload having failed (with --workers, compared across processes)."""
        return describe.earlier_loads(self._registry, model)

    def versionless(self, model: str = "") -> list[tuple[str, str]]:
        """(model, why) for each model with no version (ModelRegistry.versionless)."""
        return self._registry.versionless(model)

    async def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        rows = await self._registry.index()
        return [r for r in rows if r.state is State.READY] if ready_only else rows

    # ---- health ----
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """The replica is ready: not draining, every selected version finished loading, one is
        READY."""
        return not self._draining and self._registry.all_ready()

    def drain(self) -> None:
        """The server began to stop: from now on the replica is not ready on every protocol.
        gRPC health turned NOT_SERVING at once while OIP ServerReady (gRPC, and HTTP
        /v2/health/ready, a KServe readiness probe's) still said ready, so a load balancer
        reading those kept sending to a replica already draining."""
        self._draining = True
        self._stopping.set()

    @property
    def draining(self) -> bool:
        """The server began to stop (``drain``): what a not-ready answer then says."""
        return self._draining

    def model_ready(self, model: str, version: int | None = None) -> bool:
        """Not-found and not-ready are both False: readiness is a yes/no question. Draining,
        every model is not ready, as gRPC health says of each: ModelReady said ready, so a
        client routing by model readiness kept sending to a replica going away."""
        if self._draining:
            return False
        try:
            # With none named, the version that answers (a live split's share, not the
            # configured default a pin keeps off traffic, nor a shadow candidate).
            if not version:
                self._registry.refuse_unpromoted(model, self._registry.serving_version(model))
            self._registry.get(model, version or self._registry.serving_version(model))
        except FerryError:
            return False
        return True

    def health(self) -> tuple[bool, dict[str, bool]]:
        """``ready()``, and each model the registry knows -> whether one of its versions is
        READY, in one pass (registry.health)."""
        return self._registry.health()

    # ---- after a routed request's outcome (core.split_rule, core.shadow_rules) ----

    @staticmethod
    def _after(step: Callable[..., None], *args: Any) -> None:
        """A rollout step taken after a request's outcome (shadow, rules): whatever happens in
        it (the model unloaded meanwhile, say) never changes the caller's answer or status."""
        try:
            step(*args)
        except Exception:
            log.exception("rollout step %s failed; the request's own outcome stands", step.__name__)

    def _routed_answer(
        self, request: InferenceRequest, lv: LoadedVersion, outputs: dict[str, Any], elapsed: float
    ) -> None:
        """A request the rollout routed was answered: one look at the rollout on the request
        path, and the split's rule and the shadow only when the rollout has them."""
        ro, _ = self._registry.rollout_of(lv.name)
        if ro is None:
            return
        if ro.rules.max_error_rate and len(ro.split) > 1:
            self._after(self._check_split_errors, lv, False)
        if ro.shadow is not None:
            self._after(self._maybe_shadow, request, lv, outputs, elapsed)


def _deadline(
    lv: LoadedVersion,
    request: InferenceRequest,
    deadline: float | None,
    default: float,
    arrived: float,
) -> float | None:
    """The request's deadline: the earliest of the call's and the request's own timeout (or the
    model's ``default_timeout_ms``); with neither, the server's ``default_request_timeout``, so
    no request can wait without bound and every one can be judged at the door (the batcher
    refuses one that would finish after its deadline). Timeouts count from ``arrived``."""
    now = time.monotonic()
    budget = request.timeout or (lv.config.batching.default_timeout_ms / 1000.0) or None
    if budget is not None:
        own = arrived + budget
        deadline = own if deadline is None else min(deadline, own)
    elif deadline is None and default > 0:
        deadline = arrived + default
    if deadline is not None and deadline <= now:
        raise DeadlineExceeded(
            f"the request's deadline passed before it reached model {request.model!r}"
        )
    return deadline


def _ended_by_deadline(deadline: float | None) -> bool:
    """Whether a call cancelled now was ended by its deadline (absolute, ``time.monotonic()``)
    rather than by its client: grpc's timer and this clock may differ by a little, hence the
    slack."""
    return deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK


def _label(request: InferenceRequest | WireRequest) -> int:
    if isinstance(request, InferenceRequest):
        return request.version or 0
    return request.version_label


# merge and sum_request_rows: statistics and request counters of one version from several
# processes, added up (workers.peers sums with them through this door).
# The shadow comparison of one model from several processes, added up likewise: workers.peers
# keeps and retires the other workers' figures with these, and a split's counts with
# add_up_splits.
__all__ = [
    "DataPlane",
    "InferenceRequest",
    "InferenceResult",
    "Limits",
    "ShadowStatistics",
    "add_up_shadows",
    "add_up_splits",
    "merge",
    "shadow_from_row",
    "shadow_to_row",
    "sum_request_rows",
]
