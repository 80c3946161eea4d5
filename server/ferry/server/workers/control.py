"""The private control channel between the worker processes of one ``ferry serve --workers N``.

Every worker process (the first, which also owns management and conversion, included) listens on
a unix socket in the run folder (mode 0700: only this user reaches it). Over it the first worker
tells the others of each repository change (load, unload, explicit refresh, its poll) and when a started
worker may join the inference ports (JOIN), and any worker
answering ModelStatistics or a scrape asks the others for their own counters to add them up.
The first worker also reads the others' shadow comparisons, to judge a rollout's rules on
their sum (workers.shadow_pull).

The messages are small JSON documents on raw gRPC methods: the channel is internal, never
exposed, and both ends are this same code, so it needs no schema of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc import aio

from ferry.server.core.dataplane import DataPlane, shadow_to_row
from ferry.server.core.types import BatchStatistics, Duration, State, VersionStatistics
from ferry.server.errors import FerryError

log = logging.getLogger(__name__)

SERVICE = "ferry.internal.WorkerControl"
STATISTICS = f"/{SERVICE}/Statistics"
REQUESTS = f"/{SERVICE}/Requests"
APPLY = f"/{SERVICE}/Apply"
READY = f"/{SERVICE}/Ready"
SHADOWS = f"/{SERVICE}/Shadows"
JOIN = f"/{SERVICE}/Join"
OPS = ("load", "unload", "refresh", "poll")  # poll: the first's periodic scan, followed
MAX_MESSAGE = 64 << 20


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def decode(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"))


def stats_to_json(s: VersionStatistics) -> dict[str, Any]:
    return dataclasses.asdict(s)


def _duration(d: dict[str, int]) -> Duration:
    return Duration(int(d["count"]), int(d["ns"]))


def stats_from_json(d: dict[str, Any]) -> VersionStatistics:
    return VersionStatistics(
        name=str(d["name"]),
        version=int(d["version"]),
        last_inference_ms=int(d["last_inference_ms"]),
        inference_count=int(d["inference_count"]),
        execution_count=int(d["execution_count"]),
        success=_duration(d["success"]),
        fail=_duration(d["fail"]),
        queue=_duration(d["queue"]),
        compute_input=_duration(d["compute_input"]),
        compute_infer=_duration(d["compute_infer"]),
        compute_output=_duration(d["compute_output"]),
        batches=tuple(
            BatchStatistics(
                int(b["batch_size"]),
                _duration(b["compute_input"]),
                _duration(b["compute_infer"]),
                _duration(b["compute_output"]),
            )
            for b in d["batches"]
        ),
        rejected=int(d["rejected"]),
        expired=int(d["expired"]),
        queue_depth=int(d["queue_depth"]),
        planned_executions=tuple((int(s), int(n)) for s, n in d.get("planned_executions", ())),
        plan_changes=int(d.get("plan_changes", 0)),
        device_executions=tuple((int(i), int(n)) for i, n in d.get("device_executions", ())),
        load=str(d.get("load", "")),
    )


def serving(dataplane: DataPlane, model: str) -> dict[str, list[int]]:
    """The READY versions of ``model`` (of every model for ""): what a worker answers after it
    applied a change, and what the first process compares with its own (fleet.follow)."""
    try:
        statuses = dataplane.list_models(model)
    except FerryError:  # not known here: it serves no version of it
        return {}
    out: dict[str, list[int]] = {}
    for s in statuses:
        if s.state is State.READY:
            out.setdefault(s.name, []).append(s.version)
    return out


# Why a worker started again lacks a version the first process serves from a load it made
# before that version's files or config changed (a failed reload keeps the earlier load).
_STALE = (
    "the first process serves the load it made before the version's files or config changed "
    "on disk, and a new process can load only what is there now, which does not load: {why}; "
    "restore the files, or publish ones that load and refresh"
)


def earlier(dataplane: DataPlane, model: str) -> dict[str, list[int]]:
    """The versions of ``serving`` that serve an earlier load because their reload failed here
    (out of memory in this process, say): the same version number as the first process's,
    other weights. A worker answers them with ``serving``, and one whose reload failed where
    the first's did not is judged as lacking them (fleet.follow): counted as serving, it
    answered requests with the old weights while the first answered with the new."""
    try:
        return dataplane.earlier_loads(model)
    except FerryError:  # not known here: it serves no version of it
        return {}


def files(dataplane: DataPlane, model: str) -> dict[str, dict[str, Any]]:
    """model -> READY version (as text, a JSON key) -> the signature of the files it was
    loaded from (DataPlane.served_files): the first process compares a worker's with its own
    (fleet.follow, JOIN), since the version numbers alone agreed when a file changed on disk
    between the first's load and the worker's, and the two answered with other weights."""
    try:
        served = dataplane.served_files(model)
    except FerryError:
        return {}
    return {name: {str(v): sig for v, sig in versions.items()} for name, versions in served.items()}


def other_files(
    mine: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]
) -> list[tuple[str, int]]:
    """The versions both ``files`` answers serve, each from other files."""
    return [
        (name, int(v))
        for name, versions in sorted(mine.items())
        for v, sig in sorted(versions.items(), key=lambda kv: int(kv[0]))
        if v in (theirs.get(name) or {}) and theirs[name][v] != sig
    ]


# Why a worker lacks a version both serve: its load read other files than the first's.
OTHER_FILES = (
    "loaded from other files than the first process's: they changed on disk between the two "
    "loads (the model's file, its config or its rollout)"
)


def lacking(mine: dict[str, list[int]], theirs: dict[str, list[int]]) -> list[tuple[str, int]]:
    """The versions ``mine`` serves that ``theirs`` does not (both ``serving`` answers)."""
    return [
        (name, v)
        for name, versions in sorted(mine.items())
        for v in sorted(set(versions) - set(theirs.get(name) or ()))
    ]


def describe(missing: list[str]) -> str:
    """A bounded list for a log line: the first five, and how many more."""
    return ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")


class Retired(Protocol):
    """What the first worker keeps of workers that died (peers.Peers)."""

    def retired_statistics(
        self, model: str = "", version: int | None = None
    ) -> list[VersionStatistics]: ...

    def retired_requests(self) -> list[Any]: ...

    def gone(self) -> list[str]: ...


class ControlService(grpc.GenericRpcHandler):
    """What one worker answers on its control socket: its own counters, never the sum."""

    def __init__(
        self,
        dataplane: DataPlane,
        requests: Callable[[], list[Any]],
        retired: Retired | None = None,
        join: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._dataplane = dataplane
        # A started worker's (None in the first): binds the inference ports, once the first
        # process has seen that it serves what the first serves (JOIN).
        self._join = join
        # The first worker's peers.Peers (None elsewhere): what workers that died last
        # reported, which it alone keeps and every other worker adds through its answers.
        self._retired = retired
        # Which process answers: a worker started again counts from zero, and the others tell
        # its new counters from the old ones by this (peers.Peers keeps the old ones).
        self._process = uuid.uuid4().hex
        # Each answer's place in this process's order: two scrapes (threads of the metrics
        # listener) or a scrape and the loop's ModelStatistics ask at once, and the older answer
        # could be recorded after the newer; had the worker then died, the sum kept the older
        # counts and a counter went down. peers.Peers records an answer only if it is newer.
        self._seq = itertools.count(1)
        self._requests = requests  # () -> this process's request counters (metrics)
        self._methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            STATISTICS: grpc.unary_unary_rpc_method_handler(self._statistics),
            REQUESTS: grpc.unary_unary_rpc_method_handler(self._requests_counts),
            APPLY: grpc.unary_unary_rpc_method_handler(self._apply),
            READY: grpc.unary_unary_rpc_method_handler(self._ready),
            SHADOWS: grpc.unary_unary_rpc_method_handler(self._shadows),
            JOIN: grpc.unary_unary_rpc_method_handler(self._joining),
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._methods.get(handler_call_details.method)

    def _stamped(self, rows: list[Any]) -> dict[str, Any]:
        """A counts answer: its rows, which process answered and the answer's place in its order
        (peers.Peers tells a restarted worker and an older answer by these)."""
        return {"process": self._process, "seq": next(self._seq), "rows": rows}

    async def _statistics(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        ask = decode(raw)
        try:
            stats = self._dataplane.statistics(ask.get("model", ""), ask.get("version"))
        except FerryError:  # not served by this worker (yet): it has nothing to add
            stats = []
        answer = self._stamped([stats_to_json(s) for s in stats])
        if self._retired is not None:
            retired = self._retired.retired_statistics(ask.get("model", ""), ask.get("version"))
            answer["retired"] = [stats_to_json(s) for s in retired]
            answer["gone"] = self._retired.gone()
        return encode(answer)

    async def _requests_counts(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        answer = self._stamped(self._requests())
        if self._retired is not None:
            answer["retired"] = self._retired.retired_requests()
            answer["gone"] = self._retired.gone()
        return encode(answer)

    async def _shadows(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        """This process's own shadow comparisons, every model's: one small row each, and its
        counts of the splits a max_error_rate rules. Only the
        first worker asks, and it alone keeps what dead workers last answered, so no answer
        carries retired rows."""
        rows = [shadow_to_row(s) for s in self._dataplane.own_shadow_statistics()]
        answer = self._stamped(rows)
        # With them, its counts of each split a max_error_rate rules (core.split_sum).
        answer["split"] = self._dataplane.own_split_counts()
        return encode(answer)

    async def _ready(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        return encode({"ready": self._dataplane.ready()})

    async def _joining(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        """Join the inference ports if this worker serves every version the first process
        names (what it serves), else answer what it lacks and why, and stay off the ports: a
        worker whose own load failed (out of memory here, a file it could not read) joined
        anyway, and 1 connection in N was refused a model the others served."""
        if self._join is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not a started worker")
        ask = decode(raw)
        self._dataplane.follow_kept(ask.get("kept") or [])
        await self._dataplane.follow_failures(ask.get("failed") or [])
        # Before judging what it serves: the first's rollout may need versions loaded here.
        await self._dataplane.follow_rollouts(ask.get("rollouts") or {})
        mine = ask.get("serving") or {}
        missing = lacking(mine, serving(self._dataplane, ""))
        # Only of the versions the first names (those it has yet to follow a change of are
        # left out, as from "serving").
        theirs = {n: v for n, v in (ask.get("files") or {}).items() if n in mine}
        other = other_files(theirs, files(self._dataplane, ""))
        if missing or other:
            reasons = {(s.name, s.version): s.reason for s in self._dataplane.list_models()}
            # A version the first serves although its load failed there: a reload of it
            # failed and the first serves its earlier load, from files (or a config) no longer
            # on disk. "its load failed in the first worker process" read as a contradiction
            # of "which the first process serves", and did not say what to do.
            stale = {(str(n), int(v)): str(why) for n, v, why, *_ in ask.get("failed") or []}
            lines = [
                f"{name} version {v} ("
                + (
                    _STALE.format(why=stale[(name, v)])
                    if (name, v) in stale
                    else reasons.get((name, v)) or "not loaded"
                )
                + ")"
                for name, v in missing
            ]
            lines += [f"{name} version {v} ({OTHER_FILES})" for name, v in other]
            return encode({"joined": False, "lacks": describe(lines)})
        assert self._join is not None
        await self._join()
        return encode({"joined": True})

    async def _apply(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        ask = decode(raw)
        op, model = ask.get("op"), ask.get("model", "")
        if op not in OPS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown op {op!r}")
        try:
            # Set first: what failed to load in the first process fails here too, so this
            # op loads no version the first does not serve (Registry.follow_failures).
            self._dataplane.follow_kept(ask.get("kept") or [])
            await self._dataplane.follow_failures(ask.get("failed") or [])
            if op == "load":
                await self._dataplane.load(model)
            elif op == "unload":
                await self._dataplane.unload(model)
            else:
                await self._dataplane.refresh(retry_failed=op == "refresh")
            # Again after: a version loaded before the first's load of it failed goes now.
            await self._dataplane.follow_failures(ask.get("failed") or [])
        except FerryError as exc:  # the first worker reports its own outcome; this is a log line
            log.warning("worker could not %s %s: %s", op, model or "the repository", exc.message)
            return encode(
                {
                    "ok": False,
                    "message": exc.message,
                    "serving": serving(self._dataplane, model),
                    "earlier": earlier(self._dataplane, model),
                    "files": files(self._dataplane, model),
                }
            )
        return encode(
            {
                "ok": True,
                "serving": serving(self._dataplane, model),
                "earlier": earlier(self._dataplane, model),
                "files": files(self._dataplane, model),
            }
        )


async def start_control(socket_path: str, service: ControlService) -> aio.Server:
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    server.add_generic_rpc_handlers((service,))
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise OSError(f"cannot listen on the worker control socket {socket_path}")
    await server.start()
    return server
