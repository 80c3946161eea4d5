"""Sums over worker processes: a worker that does not answer in time adds what it answered
last, so a sum does not drop for one slow read and come back (a scrape then showed traffic
nobody sent); a worker started again adds nothing until it answers, and the kept answers are
bounded."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from ferry.server.workers import peers as peers_module
from ferry.server.workers.peers import Peers


def test_a_silent_worker_adds_its_last_answer_until_it_is_started_again(tmp_path: Path) -> None:
    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    sock = tmp_path / "worker-1.sock"
    ask = {"model": "", "version": None}
    assert peers._answered(sock, "stats", ask, grpc.RpcError()) is None  # never answered
    assert peers._answered(sock, "stats", ask, [{"count": 7}]) == [{"count": 7}]
    assert peers._answered(sock, "stats", ask, TimeoutError()) == [{"count": 7}]
    assert peers._answered(sock, "stats", {"model": "m", "version": 1}, TimeoutError()) is None
    peers.forget(sock)  # a new process: it counts from zero
    assert peers._answered(sock, "stats", ask, TimeoutError()) is None


def test_the_kept_answers_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    sock = tmp_path / "worker-1.sock"
    monkeypatch.setattr(peers_module, "MAX_KEPT", 3)
    for i in range(10):
        peers._answered(sock, "stats", {"model": f"m{i}"}, [i])
    assert len(peers._last) == 3
    assert peers._answered(sock, "stats", {"model": "m9"}, TimeoutError()) == [9]
    assert peers._answered(sock, "stats", {"model": "m0"}, TimeoutError()) is None
