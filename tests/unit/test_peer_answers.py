"""Sums over worker processes: a worker that does not answer in time adds what it answered
last, so a sum does not drop for one slow read and come back (a scrape then showed traffic
nobody sent); what a worker's previous process last reported stays in the sum after it was
started again, while the version it counted stays loaded; the kept answers are bounded."""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import pytest

from ferry.server.core.types import Duration, VersionStatistics
from ferry.server.workers import control
from ferry.server.workers import peers as peers_module
from ferry.server.workers.peers import Peers


def test_a_silent_worker_adds_its_last_answer_until_it_is_started_again(tmp_path: Path) -> None:
    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    sock = tmp_path / "worker-1.sock"
    ask = {"model": "", "version": None}
    assert peers._answered(sock, "stats", ask, grpc.RpcError()) is None  # never answered
    answer = {"process": "a", "rows": [{"count": 7}]}
    assert peers._answered(sock, "stats", ask, answer) == [{"count": 7}]
    assert peers._answered(sock, "stats", ask, TimeoutError()) == [{"count": 7}]
    assert peers._answered(sock, "stats", {"model": "m", "version": 1}, TimeoutError()) is None
    peers.retire(sock)  # it died: a new process counts from zero
    assert peers._answered(sock, "stats", ask, TimeoutError()) is None


def test_the_kept_answers_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    sock = tmp_path / "worker-1.sock"
    monkeypatch.setattr(peers_module, "MAX_KEPT", 3)
    for i in range(10):
        peers._answered(sock, "stats", {"model": f"m{i}"}, {"process": "a", "rows": [i]})
    assert len(peers._last) == 3
    assert peers._answered(sock, "stats", {"model": "m9"}, TimeoutError()) == [9]
    assert peers._answered(sock, "stats", {"model": "m0"}, TimeoutError()) is None


def _row(model: str, version: int, count: int) -> dict[str, object]:
    zero = Duration(0, 0)
    stats = VersionStatistics(
        model,
        version,
        0,
        count,
        count,
        Duration(count, count * 10),
        zero,
        zero,
        zero,
        zero,
        zero,
        (),
        0,
        0,
        queue_depth=3,
    )
    return control.stats_to_json(stats)


class _Loaded:
    """Stands in for a LoadedVersion: only its identity matters."""


def test_a_restarted_workers_old_counts_stay_in_the_sum(tmp_path: Path) -> None:
    loaded = {("m", 1): _Loaded(), ("gone", 1): _Loaded()}
    peers = Peers(tmp_path, tmp_path / "worker-0.sock", lambda m, v: loaded.get((m, v)))
    sock = tmp_path / "worker-1.sock"
    every = {"model": "", "version": None}
    first = {"process": "a", "rows": [_row("m", 1, 5), _row("gone", 1, 2)]}
    peers._answered(sock, control.STATISTICS, every, first)
    requests = [["m", 1, {"OK": 5}, [5, 0], 0.5]]
    peers._answered(sock, control.REQUESTS, {}, {"process": "a", "rows": requests})
    assert peers.retired_statistics() == []
    del loaded[("gone", 1)]  # unloaded here before the worker died: its counts leave with it
    # The next answer comes from a new process (it was killed and started again).
    again = {"process": "b", "rows": [_row("m", 1, 1)]}
    assert peers._answered(sock, control.STATISTICS, every, again) == again["rows"]
    (kept,) = peers.retired_statistics()
    assert (kept.name, kept.inference_count, kept.success.count) == ("m", 5, 5)
    assert kept.queue_depth == 0  # a dead process queues nothing
    assert peers.retired_statistics("other") == [] and peers.retired_statistics("m", 2) == []
    # Killed a second time: both dead processes' counts add up; the fleet's retire() keeps them.
    peers._answered(sock, control.STATISTICS, every, {"process": "b", "rows": [_row("m", 1, 4)]})
    peers.retire(sock)
    (kept,) = peers.retired_statistics()
    assert kept.inference_count == 9
    # Request counters are since the process started: they stay whatever is loaded.
    assert [row[2] for row in peers._retired_requests.values()] == [{"OK": 5}]
    # The version loaded again here: a new load counts from zero, the old counts go.
    loaded[("m", 1)] = _Loaded()
    assert peers.retired_statistics() == []


def test_a_version_unloaded_before_the_restart_is_not_retired(tmp_path: Path) -> None:
    """Only the versions the last answers still showed are kept: a per-model question replaces
    that model's rows."""
    loaded = {("m", 1): _Loaded(), ("m", 2): _Loaded()}
    peers = Peers(tmp_path, tmp_path / "worker-0.sock", lambda m, v: loaded.get((m, v)))
    sock = tmp_path / "worker-1.sock"
    one_model = {"model": "m", "version": None}
    peers._answered(
        sock,
        control.STATISTICS,
        one_model,
        {"process": "a", "rows": [_row("m", 1, 1), _row("m", 2, 2)]},
    )
    peers._answered(
        sock, control.STATISTICS, one_model, {"process": "a", "rows": [_row("m", 2, 3)]}
    )
    peers.retire(sock)
    assert [(s.version, s.inference_count) for s in peers.retired_statistics()] == [(2, 3)]


def test_only_the_first_worker_keeps_the_dead_and_the_others_add_its_answer(
    tmp_path: Path,
) -> None:
    """A worker that never read the dead one's counts could not keep them: a ModelStatistics
    answered by the restarted worker itself dropped (73 to 47). The first worker keeps them and
    sends them with its answers; the others keep none themselves (no double count)."""
    loaded = {("m", 1): _Loaded()}
    other = Peers(
        tmp_path, tmp_path / "worker-2.sock", lambda m, v: loaded.get((m, v)), keeps_retired=False
    )
    every = {"model": "", "version": None}
    dead = tmp_path / "worker-1.sock"
    other._answered(dead, control.STATISTICS, every, {"process": "a", "rows": [_row("m", 1, 5)]})
    other.retire(dead)
    assert other.retired_statistics() == []  # not kept here
    first = tmp_path / "worker-0.sock"
    answer = {"process": "p", "rows": [_row("m", 1, 2)], "retired": [_row("m", 1, 5)]}
    kept = other._answered(first, control.STATISTICS, every, answer)
    assert [row["inference_count"] for row in kept] == [2, 5]
    # ... and as what worker 0 adds should it not answer in time
    assert other._answered(first, control.STATISTICS, every, TimeoutError()) == kept


def test_a_worker_stops_adding_its_last_read_of_a_process_the_first_worker_retired(
    tmp_path: Path,
) -> None:
    """From a worker's death until its new process answers, the first worker adds the dead
    process's counts (retired at its death); another worker that still added its own last read
    of that process counted it twice. The first worker's answers name the retired processes."""
    loaded = {("m", 1): _Loaded()}
    other = Peers(
        tmp_path, tmp_path / "worker-2.sock", lambda m, v: loaded.get((m, v)), keeps_retired=False
    )
    every = {"model": "", "version": None}
    dead, first = tmp_path / "worker-1.sock", tmp_path / "worker-0.sock"
    other._answered(dead, control.STATISTICS, every, {"process": "a", "rows": [_row("m", 1, 5)]})
    answer = {"process": "p", "rows": [_row("m", 1, 2)], "retired": [_row("m", 1, 5)]}
    kept = other._answered(first, control.STATISTICS, every, {**answer, "gone": ["a"]})
    assert [row["inference_count"] for row in kept] == [2, 5]
    assert other._answered(dead, control.STATISTICS, every, TimeoutError()) is None


def test_the_first_worker_retires_a_dead_process_once_and_names_it(tmp_path: Path) -> None:
    loaded = {("m", 1): _Loaded()}
    peers = Peers(tmp_path, tmp_path / "worker-0.sock", lambda m, v: loaded.get((m, v)))
    sock = tmp_path / "worker-1.sock"
    every = {"model": "", "version": None}
    peers._answered(sock, control.STATISTICS, every, {"process": "a", "rows": [_row("m", 1, 5)]})
    peers.retire(sock)  # it died
    assert peers.gone() == ["a"]
    peers.forget(sock)  # its new process is ready: its channels go, nothing is retired again
    peers._answered(sock, control.STATISTICS, every, {"process": "b", "rows": [_row("m", 1, 1)]})
    (kept,) = peers.retired_statistics()
    assert kept.inference_count == 5


def test_a_scrape_asks_every_worker_at_once(tmp_path: Path) -> None:
    """Asked one after the other, each stuck worker added the 2 s call timeout, and three of
    them took a scrape past Prometheus' 10 s default. Here each worker answers only once all
    three have been asked: one at a time, every call timed out and the sum had no row."""
    import threading
    from concurrent import futures

    arrived = threading.Barrier(3, timeout=peers_module.SCRAPE_CALL_TIMEOUT * 2)
    buckets = [0] * 15

    class _Worker(grpc.GenericRpcHandler):
        def __init__(self, index: int) -> None:
            self.index = index

        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if details.method != control.REQUESTS:
                return None

            def answer(raw: bytes, context: grpc.ServicerContext) -> bytes:
                with contextlib.suppress(threading.BrokenBarrierError):
                    arrived.wait()
                row = [f"m{self.index}", 1, {"OK": 1}, buckets, 0.0]
                return control.encode({"process": f"p{self.index}", "rows": [row]})

            return grpc.unary_unary_rpc_method_handler(answer)

    servers = []
    for index in (1, 2, 3):
        server = grpc.server(futures.ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers((_Worker(index),))
        server.add_insecure_port(f"unix:{tmp_path / f'worker-{index}.sock'}")
        server.start()
        servers.append(server)
    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    try:
        rows = peers.requests_sync()
    finally:
        peers.close_sync()
        for server in servers:
            server.stop(None)
    assert sorted(row[0] for row in rows) == ["m1", "m2", "m3"]


def test_an_answer_older_than_the_one_recorded_is_not_recorded(tmp_path: Path) -> None:
    """Two scrapes at once: the older answer arrived last and was kept, and had the worker died
    then, the sum would have kept its lower counts (a counter going down)."""
    loaded = {("m", 1): _Loaded()}
    peers = Peers(tmp_path, tmp_path / "worker-0.sock", lambda m, v: loaded.get((m, v)))
    sock = tmp_path / "worker-1.sock"
    every = {"model": "", "version": None}
    newer = {"process": "a", "seq": 8, "rows": [_row("m", 1, 9)]}
    older = {"process": "a", "seq": 7, "rows": [_row("m", 1, 7)]}
    assert peers._answered(sock, control.STATISTICS, every, newer) == newer["rows"]
    assert peers._answered(sock, control.STATISTICS, every, older) == older["rows"]  # its caller's
    assert peers._answered(sock, control.STATISTICS, every, TimeoutError()) == newer["rows"]
    peers.retire(sock)
    assert [s.inference_count for s in peers.retired_statistics()] == [9]
    # A process started again counts its own order from 1: not older than the last one's.
    fresh = {"process": "b", "seq": 1, "rows": [_row("m", 1, 1)]}
    assert peers._answered(sock, control.STATISTICS, every, fresh) == fresh["rows"]
    assert peers._answered(sock, control.STATISTICS, every, TimeoutError()) == fresh["rows"]
