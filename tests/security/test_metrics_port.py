"""The metrics port is open to anyone who can reach it: no client may hold its threads.

Each connection has a thread; before the bounds, a client that opened connections and sent
nothing held one thread each for ever, without limit, in the serving process."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator

import pytest

from ferry.server import metrics_http
from ferry.server.metrics_http import MetricsServer, ReadyFlag


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 4)
    server = MetricsServer(lambda: b"up 1\n", "text/plain", ReadyFlag())
    yield server.start("127.0.0.1", 0)
    server.close()


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(30)  # a bound for a broken server, not a timing assertion
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_past_the_bound_are_closed_and_add_no_thread(port: int) -> None:
    before = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    try:
        assert all(_closed_by_server(s) for s in extra)
        assert threading.active_count() <= before + 4
    finally:
        for s in held + extra:
            s.close()


def test_a_connection_that_sends_nothing_is_closed_and_frees_its_slot(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_http, "IDLE_TIMEOUT", 0.5)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        assert all(_closed_by_server(s) for s in held)  # after the idle timeout
    finally:
        for s in held:
            s.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(10):  # a slot freed by a closed connection is free again
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"up 1\n")
            conn.close()
    finally:
        conn.close()


def test_a_request_head_that_trickles_in_is_cut_off(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every few seconds kept the idle timeout from ever firing: 64 such connections
    held every slot, and Prometheus and every HTTP probe of this port were turned away."""
    monkeypatch.setattr(metrics_http, "IDLE_TIMEOUT", 30.0)
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT", 0.5)
    trickle = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 100
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        closed = False
        for byte in trickle:  # about 25 s at most: a bound for a broken server
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.2)  # the pace of the trickle, well within IDLE_TIMEOUT
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            break
        assert closed, "the server kept reading a head that never ended"
    finally:
        sock.close()
