"""Prometheus metrics on their own HTTP port.

Counters that the core already keeps (queue/compute time, batch sizes, queue depth) are read at
scrape time through the core's door (statistics snapshots), so the request path pays nothing for
them; only per-request latency and status are observed as they happen, by the core calling
``observe`` once per request.

The text is written here, not by prometheus_client's generic families: at 200 models a scrape
rendered 335 KB through them in ~80 ms of Python on the metrics thread, holding the GIL the event
loop needs (p99 of other requests 1.8x idle during 1 Hz scrapes). Label text is escaped once per
model version and cached; the request counters and latency histograms are plain integers updated
on the event loop. prometheus_client still provides the ``process_*`` collector.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from ferry.server.core.dataplane import DataPlane
from ferry.server.core.stats_merge import sum_request_rows
from ferry.server.core.types import State, VersionStatistics, VersionStatus
from ferry.server.errors import FerryError
from ferry.server.grpc.status import code_of
from ferry.server.memory import KINDS, process_memory
from ferry.server.metrics_carry import Carried, ShadowCarried
from ferry.server.metrics_http import MetricsServer, ReadyFlag

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


_LATENCY_LE = [_num(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
_BATCH_LE = [str(b) for b in BATCH_BUCKETS] + ["+Inf"]


class _Requests:
    """One model version's requests: counts by status code and a latency histogram."""

    __slots__ = ("buckets", "codes", "seconds")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # last: above every bound
        self.seconds = 0.0


class PeerCounters(Protocol):
    def statistics_sync(self) -> list[VersionStatistics]: ...

    def requests_sync(self) -> list[Any]: ...


def _summed(rows: list[Any]) -> dict[tuple[str, int], _Requests]:
    """Request counter rows (``requests_snapshot``'s, this process's and every other worker's)
    added up per model version."""
    total: dict[tuple[str, int], _Requests] = {}
    for model, version, codes, buckets, seconds in sum_request_rows(rows):
        mine = total[(model, version)] = _Requests()
        mine.codes, mine.buckets, mine.seconds = codes, buckets, seconds
    return total


class Metrics:
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane
        self.ready = ReadyFlag()
        self.process = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.process)  # process_* (CPU, RSS, fds, start time)
        self._requests: dict[tuple[str, int], _Requests] = {}
        self._labels: dict[tuple[str, int], str] = {}
        self._peers: PeerCounters | None = None
        self._worker_pids: Callable[[], list[int]] = lambda: [os.getpid()]
        self._worker_restarts: Callable[[], int] | None = None
        # What earlier loads of a version loaded again in place counted (metrics_carry).
        self._carried = Carried()
        self._shadows_carried = ShadowCarried()  # and a shadow comparison started afresh

    def workers(
        self, pids: Callable[[], list[int]], restarts: Callable[[], int] | None = None
    ) -> None:
        """The serving processes whose memory a scrape reports, the first one's (this) first,
        and how many times one was started again."""
        self._worker_pids = pids
        self._worker_restarts = restarts

    def sum_with(self, peers: PeerCounters) -> None:
        """With several worker processes a scrape shows their sum (read on the metrics thread)."""
        self._peers = peers

    def requests_snapshot(self) -> list[list[Any]]:
        """This process's request counters, as rows: its own scrape and the other workers' add
        them up. The dict is copied in one step first, so the loop may go on counting."""
        return [
            [m, v, s.codes.copy(), s.buckets.copy(), s.seconds]
            for (m, v), s in list(self._requests.items())
        ]

    def observe(
        self, model: str, version: int, outcome: BaseException | None, seconds: float
    ) -> None:
        """The core's observer: called once per inference request, whatever the protocol."""
        code = "OK" if outcome is None else code_of(outcome).name
        series = self._requests.get((model, version))
        if series is None:
            series = self._series_for(model, version)
        series.codes[code] = series.codes.get(code, 0) + 1
        series.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series.seconds += seconds

    def _series_for(self, model: str, version: int) -> _Requests:
        # Client-chosen names and version numbers must not grow memory or label sets: the
        # labels are those of a served model and version, or the placeholders.
        try:
            served = {s.version for s in self._dataplane.list_models(model)} if model else None
        except FerryError:
            served = None
        if served is None:
            model, version = "_unknown", 0
        elif version not in served:
            version = 0
        series = self._requests.get((model, version))
        if series is None:
            series = self._requests[(model, version)] = _Requests()
        return series

    def _label(self, model: str, version: int) -> str:
        key = (model, version)
        text = self._labels.get(key)
        if text is None:
            text = self._labels[key] = f'model="{_escape(model)}",version="{version}"'
        return text

    def render(self) -> bytes:
        """The whole scrape, Prometheus text format 0.0.4."""
        # The registry's views copy what they iterate: safe to read from this thread.
        read = self._carried.begin()
        own = self._dataplane.statistics()
        statuses = self._dataplane.list_models()
        rows = self.requests_snapshot()
        others: list[VersionStatistics] = []
        if self._peers is not None:
            others = self._peers.statistics_sync()
            rows += self._peers.requests_sync()
        stats = self._carried.add(own, others, read)
        lines: list[str] = []
        self._render_requests(lines, _summed(rows))
        self._render_core(lines, stats, statuses)
        self._render_memory(lines)
        return "\n".join(lines).encode("utf-8") + b"\n" + generate_latest(self.process)

    def _render_requests(self, out: list[str], requests: dict[tuple[str, int], _Requests]) -> None:
        """``requests`` are copies (``_summed``): the loop may go on counting meanwhile."""
        labeled = [(self._label(m, v), s) for (m, v), s in requests.items()]
        out += [
            "# HELP ferry_requests_total Inference requests by status",
            "# TYPE ferry_requests_total counter",
        ]
        for lab, s in labeled:
            out += [f'ferry_requests_total{{{lab},code="{c}"}} {n}' for c, n in s.codes.items()]
        out += [
            "# HELP ferry_request_seconds Inference request latency in the server",
            "# TYPE ferry_request_seconds histogram",
        ]
        for lab, s in labeled:
            total = 0
            for le, n in zip(_LATENCY_LE, s.buckets, strict=True):
                total += n
                out.append(f'ferry_request_seconds_bucket{{{lab},le="{le}"}} {total}')
            out.append(f"ferry_request_seconds_count{{{lab}}} {total}")
            out.append(f"ferry_request_seconds_sum{{{lab}}} {_num(s.seconds)}")

    def _render_core(
        self, out: list[str], stats: list[VersionStatistics], statuses: list[VersionStatus]
    ) -> None:
        labels = [(self._label(s.name, s.version), s) for s in stats]

        def family(
            name: str, kind: str, help_text: str, value: Callable[[VersionStatistics], float]
        ) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{{{lab}}} {_num(value(s))}" for lab, s in labels)

        family(
            "ferry_queue_seconds_total",
            "counter",
            "Time successful requests spent queued (failed ones and shadow runs add none)",
            lambda s: s.queue.ns / 1e9,
        )
        out.append(
            "# HELP ferry_compute_seconds_total Per-request compute time by stage, of successful "
            "requests (failed ones and shadow runs add none)"
        )
        out.append("# TYPE ferry_compute_seconds_total counter")
        for lab, s in labels:
            for stage, stat in (
                ("input", s.compute_input),
                ("infer", s.compute_infer),
                ("output", s.compute_output),
            ):
                out.append(
                    f'ferry_compute_seconds_total{{{lab},stage="{stage}"}} {_num(stat.ns / 1e9)}'
                )
        family(
            "ferry_inferences_total",
            "counter",
            "Batch elements served",
            lambda s: s.inference_count,
        )
        family("ferry_executions_total", "counter", "Model executions", lambda s: s.execution_count)
        family(
            "ferry_rejected_total", "counter", "Requests rejected: queue full", lambda s: s.rejected
        )
        family(
            "ferry_expired_total", "counter", "Deadlines passed while queued", lambda s: s.expired
        )
        family("ferry_queue_depth", "gauge", "Requests waiting", lambda s: s.queue_depth)
        out.append("# HELP ferry_batch_size Executed batch sizes")
        out.append("# TYPE ferry_batch_size histogram")
        for lab, s in labels:
            counts = {b.batch_size: b.compute_infer.count for b in s.batches}
            for le, bound in zip(_BATCH_LE, (*BATCH_BUCKETS, None), strict=True):
                n = sum(c for size, c in counts.items() if bound is None or size <= bound)
                out.append(f'ferry_batch_size_bucket{{{lab},le="{le}"}} {n}')
            out.append(f"ferry_batch_size_count{{{lab}}} {sum(counts.values())}")
            out.append(f"ferry_batch_size_sum{{{lab}}} {sum(k * c for k, c in counts.items())}")
        planned = [(lab, s) for lab, s in labels if s.planned_executions]
        if planned:
            out.append("# HELP ferry_planned_executions_total Executions per planned batch size")
            out.append("# TYPE ferry_planned_executions_total counter")
            for lab, s in planned:
                out.extend(
                    f'ferry_planned_executions_total{{{lab},size="{size}"}} {n}'
                    for size, n in s.planned_executions
                )
            out.append(
                "# HELP ferry_plan_changes_total Executions whose shape differed from the "
                "previous one of their planned size (0 in steady state)"
            )
            out.append("# TYPE ferry_plan_changes_total counter")
            out.extend(f"ferry_plan_changes_total{{{lab}}} {s.plan_changes}" for lab, s in planned)
        placed = [(lab, s) for lab, s in labels if s.device_executions]
        if placed:
            out.append(
                "# HELP ferry_device_executions_total Executions per GPU (instances.device_ids)"
            )
            out.append("# TYPE ferry_device_executions_total counter")
            for lab, s in placed:
                out.extend(
                    f'ferry_device_executions_total{{{lab},device="{device}"}} {n}'
                    for device, n in s.device_executions
                )
        self._render_shadows(out)
        out.append(
            "# HELP ferry_rollout_decision_pending 1 while a rollout rule's decision could not "
            "be written (a full or read-only disk) and is being tried again"
        )
        out.append("# TYPE ferry_rollout_decision_pending gauge")
        out.extend(
            f'ferry_rollout_decision_pending{{model="{_escape(model)}"}} 1'
            for model in sorted(self._dataplane.unapplied_decisions())
        )
        out.append("# HELP ferry_model_state 1 for the state each model version is in")
        out.append("# TYPE ferry_model_state gauge")
        for st in statuses:
            lab = self._label(st.name, st.version)
            for candidate in State:
                one = 1 if st.state is candidate else 0
                out.append(f'ferry_model_state{{{lab},state="{candidate.value}"}} {one}')

    def _render_memory(self, out: list[str]) -> None:
        """Each worker's memory (memory.py): sum the pss series for what the workers cost."""
        if self._worker_restarts is not None:
            out.append(
                "# HELP ferry_worker_restarts_total Worker processes that exited and were started "
                "again; the sums keep what each had counted, so no counter goes down"
            )
            out.append("# TYPE ferry_worker_restarts_total counter")
            out.append(f"ferry_worker_restarts_total {self._worker_restarts()}")
        out.append(
            "# HELP ferry_worker_memory_bytes Memory of each serving process: rss (all it "
            "maps), pss (shared pages divided among their sharers; sums to the total), private"
        )
        out.append("# TYPE ferry_worker_memory_bytes gauge")
        for index, pid in enumerate(self._worker_pids()):
            m = process_memory(pid)
            if m is None:
                continue
            out.extend(
                f'ferry_worker_memory_bytes{{worker="{index}",kind="{kind}"}} {m[kind]}'
                for kind in KINDS
            )

    def _render_shadows(self, out: list[str]) -> None:
        """Shadow comparisons (core.shadow), summed over the worker processes as the first
        one last read them (workers.shadow_pull): docs/rollout.md."""
        read = self._shadows_carried.begin()
        shadows = self._dataplane.shadow_statistics()
        counted = self._shadows_carried.add(shadows, read)
        if not shadows:
            return
        families = (
            ("ferry_shadow_compared_total", "counter", "Shadowed requests compared", "compared"),
            ("ferry_shadow_errors_total", "counter", "Shadow runs the candidate failed", "errors"),
            ("ferry_shadow_shed_total", "counter", "Shadow runs skipped: candidate busy", "shed"),
            (
                "ferry_shadow_cosine_min",
                "gauge",
                "Lowest cosine against the served outputs",
                "cosine_min",
            ),
            (
                "ferry_shadow_cosine_mean",
                "gauge",
                "Mean cosine against the served outputs",
                "mean_cosine",
            ),
            (
                "ferry_shadow_max_abs_diff",
                "gauge",
                "Largest absolute output difference",
                "max_abs_diff",
            ),
            (
                "ferry_shadow_rel_error",
                "gauge",
                "Size of the output difference: ||served - shadow|| / ||served||",
                "rel_error",
            ),
            (
                "ferry_shadow_spread_error",
                "gauge",
                "Output difference of one-value outputs against the served values' spread",
                "spread_error",
            ),
            (
                "ferry_shadow_label_agreement",
                "gauge",
                "Share of integer and boolean output elements equal to the served ones",
                "label_agreement",
            ),
        )
        counters = {"compared": 0, "errors": 1, "shed": 2}
        for name, kind, help_text, attr in families:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for s in shadows:
                lab = f'model="{_escape(s.model)}",candidate="{s.candidate}"'
                if attr in counters:  # with the comparisons before it (metrics_carry)
                    value = counted[(s.model, s.candidate)][counters[attr]]
                else:  # a gauge: the comparison in force
                    value = getattr(s, attr)
                out.append(f"{name}{{{lab}}} {_num(value)}")

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics and the HTTP health paths (metrics_http) on their own thread."""
        self._http = MetricsServer(self.render, CONTENT_TYPE, self.ready)
        return self._http.start(host, port)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.close()
