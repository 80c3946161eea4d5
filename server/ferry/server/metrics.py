"""Prometheus metrics on their own HTTP port.

Counters that the core already keeps (queue/compute time, batch sizes, queue depth) are read at
scrape time through the core's door (statistics snapshots), so the request path pays nothing for
them; only per-request latency and status are observed as they happen, by the core calling
``observe`` once per request, through cached label children.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ferry.server.core.dataplane import DataPlane
from ferry.server.core.types import State
from ferry.server.errors import FerryError
from ferry.server.grpc.status import code_of
from ferry.server.metrics_http import MetricsServer, ReadyFlag

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _CoreCollector(Collector):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]
        queue = CounterMetricFamily(
            "ferry_queue_seconds", "Time requests spent queued", labels=labels
        )
        compute = CounterMetricFamily(
            "ferry_compute_seconds", "Per-request compute time by stage", labels=[*labels, "stage"]
        )
        inferences = CounterMetricFamily("ferry_inferences", "Batch elements served", labels=labels)
        executions = CounterMetricFamily("ferry_executions", "Model executions", labels=labels)
        rejected = CounterMetricFamily(
            "ferry_rejected", "Requests rejected: queue full", labels=labels
        )
        expired = CounterMetricFamily(
            "ferry_expired", "Deadlines passed while queued", labels=labels
        )
        depth = GaugeMetricFamily("ferry_queue_depth", "Requests waiting", labels=labels)
        batch = HistogramMetricFamily("ferry_batch_size", "Executed batch sizes", labels=labels)
        for s in self.dataplane.statistics():
            lab = [s.name, str(s.version)]
            queue.add_metric(lab, s.queue.ns / 1e9)
            compute.add_metric([*lab, "input"], s.compute_input.ns / 1e9)
            compute.add_metric([*lab, "infer"], s.compute_infer.ns / 1e9)
            compute.add_metric([*lab, "output"], s.compute_output.ns / 1e9)
            inferences.add_metric(lab, s.inference_count)
            executions.add_metric(lab, s.execution_count)
            rejected.add_metric(lab, s.rejected)
            expired.add_metric(lab, s.expired)
            depth.add_metric(lab, s.queue_depth)
            buckets = []
            total = 0
            size_sum = 0
            counts = {b.batch_size: b.compute_infer.count for b in s.batches}
            for bound in BATCH_BUCKETS:
                total_le = sum(c for size, c in counts.items() if size <= bound)
                buckets.append((str(bound), total_le))
            total = sum(counts.values())
            size_sum = sum(size * c for size, c in counts.items())
            buckets.append(("+Inf", total))
            batch.add_metric(lab, buckets, size_sum)
        state = GaugeMetricFamily(
            "ferry_model_state",
            "1 for the state each model version is in",
            labels=[*labels, "state"],
        )
        for st in self.dataplane.list_models():
            for candidate in State:
                state.add_metric(
                    [st.name, str(st.version), candidate.value],
                    1.0 if st.state is candidate else 0.0,
                )
        yield from (queue, compute, inferences, executions, rejected, expired, depth, batch, state)


class Metrics:
    def __init__(self, dataplane: DataPlane) -> None:
        # ``*_created`` series are noise for a scraper that sees counters from process start.
        disable_created_metrics()
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.prometheus.register(_CoreCollector(dataplane))
        ProcessCollector(registry=self.prometheus)  # process_* (CPU, RSS, fds, start time)
        self.ready = ReadyFlag()
        self._requests = Counter(
            "ferry_requests",
            "Inference requests by status",
            ["model", "version", "code"],
            registry=self.prometheus,
        )
        self._latency = Histogram(
            "ferry_request_seconds",
            "Inference request latency in the server",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.prometheus,
        )
        self._children: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        self._dataplane = dataplane

    def observe(
        self, model: str, version: int, outcome: BaseException | None, seconds: float
    ) -> None:
        """The core's observer: called once per inference request, whatever the protocol."""
        code = "OK" if outcome is None else code_of(outcome).name
        key = (model, version, code)
        pair = self._children.get(key)
        if pair is None:
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
            key = (model, version, code)
            pair = self._children.get(key)
            if pair is None:
                v = str(version)
                pair = (self._requests.labels(model, v, code), self._latency.labels(model, v))
                self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics and the HTTP health paths (metrics_http) on their own thread."""
        self._http = MetricsServer(self.prometheus, self.ready)
        return self._http.start(host, port)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.close()
