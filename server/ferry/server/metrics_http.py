"""The metrics port: ``/metrics`` for Prometheus and HTTP health for probes, 404 for the rest.

prometheus_client's own server answers 200 with the metrics text on every path, so an ``httpGet``
probe pointed at any path of this port always passed. This small server answers only what it
serves: ``/metrics``, ``/v2/health/live`` (the process is up) and ``/v2/health/ready`` (the replica
is ready: the models it must serve are ready), the Open Inference Protocol's health paths, so a
probe works whether it targets this port or the protocol's HTTP port. It runs on its own thread;
readiness is a flag the server sets on its event loop at every change, never computed here.

The port is open to anyone who can reach it (0.0.0.0 by default, no token), and each connection
has a thread. So a connection that sends nothing for IDLE_TIMEOUT seconds is closed, one whose
request head has not all arrived HEAD_TIMEOUT seconds after it began is closed too, and at most
MAX_CONNECTIONS are served at once: one more is closed as soon as it is accepted. Without these a
client that opened connections and sent nothing held a thread each, for ever: thousands of them
exhausted the threads and memory of the whole serving process, not only this port's. And without
the head's own bound, one byte every few seconds reset the idle timeout for ever: MAX_CONNECTIONS
such connections held every slot, and Prometheus and the HTTP probes were turned away.
"""

from __future__ import annotations

import io
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ferry.server.addresses import bind_failure, host_port

log = logging.getLogger(__name__)

LIVE = "/v2/health/live"
READY = "/v2/health/ready"
ALLOW = "GET, HEAD, OPTIONS"
# Seconds a connection may go without a byte arriving (an idle keep-alive one included). A
# scrape's request is a few hundred bytes sent at once; Prometheus opens a new connection when
# the server has closed its idle one.
IDLE_TIMEOUT = 10.0
# Seconds a request head (request line and headers) may take in all, however it trickles in.
HEAD_TIMEOUT = 10.0
# Connections served at once; a scraper and a few probes need a handful.
MAX_CONNECTIONS = 64


class ReadyFlag:
    """Readiness as the server last computed it; read from the HTTP thread."""

    def __init__(self) -> None:
        self.ready = False


class _HeadClock(io.RawIOBase):
    """The connection's reads, each allowed IDLE_TIMEOUT and no more than what is left of the
    request head's time (``deadline``, a monotonic time; inf once the head is read)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = min(IDLE_TIMEOUT, self.deadline - time.monotonic())
        if left <= 0:
            raise TimeoutError(f"the request head took more than {HEAD_TIMEOUT:g} s")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    render: Callable[[], bytes]
    content_type: str
    flag: ReadyFlag
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(IDLE_TIMEOUT)  # a read or write past it ends the connection
        self._clock = _HeadClock(self.connection)
        self.rfile = io.BufferedReader(self._clock)

    def handle_one_request(self) -> None:
        """A request's head gets HEAD_TIMEOUT from the moment its turn begins (an idle
        keep-alive connection's wait for it included); http.server ends the connection on
        the TimeoutError."""
        self._clock.deadline = time.monotonic() + HEAD_TIMEOUT
        super().handle_one_request()

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # the headers are read by now
        self._clock.deadline = math.inf
        self.connection.settimeout(IDLE_TIMEOUT)  # the answer's writes
        return parsed

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self.send_header("Allow", ALLOW)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _not_allowed(self) -> None:
        """405 and the methods there are, for the methods HTTP defines (http.server answered
        them 501 "Unsupported method", which says the server knows no such method). Its body
        is never read, so the connection closes after the answer."""
        message = f"method {self.command} not allowed: this port answers {ALLOW}\n".encode()
        self.close_connection = True
        self.send_response(405)
        self.send_header("Allow", ALLOW)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(message)))
        self.end_headers()
        self.wfile.write(message)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_TRACE = do_CONNECT = _not_allowed

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.render(), self.content_type, body)
        elif path == LIVE:
            self._send(200, b"", "text/plain", body)
        elif path == READY:
            status = 200 if self.flag.ready else 503
            self._send(status, b"", "text/plain", body)
        else:
            message = b"not found: this port serves /metrics, /v2/health/live, /v2/health/ready\n"
            self._send(404, message, "text/plain; charset=utf-8", body)

    def _send(self, status: int, payload: bytes, content_type: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not log lines
        return None


# How often the listener's thread looks for a stop: socketserver's default, 0.5 s, was most of
# every server's stop (0.40-0.46 s of 0.43-0.48 s, the caller blocked in shutdown() meanwhile).
STOP_POLL_S = 0.05


class _Server(ThreadingHTTPServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, up to MAX_CONNECTIONS; one more is closed at once (its
        client sees the connection end and retries), so no client can add threads without
        bound."""
        if not self._slots.acquire(blocking=False):
            log.debug("metrics connection from %s closed: %d open", client_address, MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver printed a traceback to stderr (past logging, and past --log-format
        json) for every scraper that hung up before its answer was written: a client gone is
        logged at DEBUG; anything else stays an error, through logging."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):  # gone, or stopped reading
            log.debug("metrics client %s went away: %s", client_address, exc)
        else:
            log.error("metrics request from %s failed", client_address, exc_info=exc)


class MetricsServer:
    def __init__(self, render: Callable[[], bytes], content_type: str, flag: ReadyFlag) -> None:
        """``render``: the whole /metrics body, called on this server's thread per scrape."""
        handler = type(
            "Handler",
            (_Handler,),
            {"render": staticmethod(render), "content_type": content_type, "flag": flag},
        )
        self._handler = handler
        self._server: ThreadingHTTPServer | None = None

    def start(self, host: str, port: int) -> int:
        try:
            server = _Server((host, port), self._handler)
        except OSError as exc:  # one wording for every listener
            raise bind_failure(host_port(host, port), host, exc) from None
        server.daemon_threads = True
        threading.Thread(
            target=server.serve_forever, args=(STOP_POLL_S,), name="ferry-metrics", daemon=True
        ).start()
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
