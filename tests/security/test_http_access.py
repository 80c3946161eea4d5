"""Access on the HTTP listeners: the gRPC listeners' tokens, certificates and message limit.

Tokens are checked before any route runs (401 without or with a wrong token, 403 for the wrong
kind, health open unless asked); the body limit is checked against Content-Length before a byte
of the body is read, and while a chunked body streams in; TLS and mutual TLS use the same files.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as th
from helpers import make_repo, until_closed, wait_for
from sechelpers import Certs
from serverutil import ServerThread
from tritonclient.utils import InferenceServerException

from ferry.server.examples import identity_model
from ferry.server.http import listener

INFERENCE_TOKEN = "inf-http-5e1d0c"
MANAGEMENT_TOKEN = "mgmt-http-9a7f2b"
LIMIT = 64 * 1024
WAIT_S = 30.0  # socket timeouts: reached only when broken


def _new_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(
        tmp_path_factory.mktemp("http") / "repo", {"fixed": identity_model("FP32", (3,))}
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """token_server's. A server locks its repository's state folder, so every other server
    here, started while token_server runs, has a repository of its own (``own_repo``)."""
    return _new_repo(tmp_path_factory)


@pytest.fixture
def own_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _new_repo(tmp_path_factory)


@pytest.fixture(scope="module")
def token_server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(
        repo, inference_token=INFERENCE_TOKEN, management_token=MANAGEMENT_TOKEN
    ) as srv:
        yield srv


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def status_of(call: object) -> int:
    try:
        call()  # type: ignore[operator]
    except InferenceServerException as exc:
        return int(exc.status())
    return 200


def _infer(client: th.InferenceServerClient, headers: dict[str, str] | None = None) -> None:
    tensor = th.InferInput("input", [3], "FP32")
    tensor.set_data_from_numpy(np.arange(3, dtype=np.float32))
    client.infer("fixed", [tensor], headers=headers)


def test_the_inference_listener_wants_a_token(
    token_server: ServerThread, triton_http_clients: Any
) -> None:
    client = triton_http_clients(token_server.http_target)
    assert status_of(lambda: _infer(client)) == 401
    assert status_of(lambda: _infer(client, bearer("guess"))) == 401
    assert status_of(lambda: client.get_model_metadata("no_such_model")) == 401  # no probing
    assert status_of(lambda: _infer(client, bearer(INFERENCE_TOKEN))) == 200
    assert status_of(lambda: _infer(client, bearer(MANAGEMENT_TOKEN))) == 200
    assert client.is_server_live() and client.is_server_ready()  # probes stay open
    assert not client.is_model_ready("fixed")  # not a probe: it needs the token
    assert client.is_model_ready("fixed", headers=bearer(INFERENCE_TOKEN))


def test_refusals_say_what_to_send(token_server: ServerThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", int(token_server.http_target.split(":")[1]))
    conn.request("GET", "/v2/models/fixed")
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 401
    assert response.getheader("WWW-Authenticate") == "Bearer"
    assert response.getheader("ferry-error") == body["kind"] == "UNAUTHENTICATED"
    assert "Authorization: Bearer <token>" in body["error"]


def test_two_authorization_headers_are_refused(token_server: ServerThread) -> None:
    """Which of two counts would be a guess (a proxy in front may read the other one): the
    first was taken, so a request passed with the right token first and a wrong one after."""
    port = int(token_server.http_target.split(":")[1])
    for pair in ((INFERENCE_TOKEN, "guess"), ("guess", INFERENCE_TOKEN)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("GET", "/v2/models/fixed")
        for token in pair:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 401, pair
        assert body["kind"] == "UNAUTHENTICATED" and "2 Authorization headers" in body["error"]


def test_the_management_listener_takes_only_its_token(
    token_server: ServerThread, triton_http_clients: Any
) -> None:
    manager = triton_http_clients(token_server.management_http_target)
    assert status_of(manager.get_model_repository_index) == 401
    inference = bearer(INFERENCE_TOKEN)
    assert status_of(lambda: manager.get_model_repository_index(headers=inference)) == 403
    management = bearer(MANAGEMENT_TOKEN)
    # Past the token check: the model is what is missing.
    assert status_of(lambda: manager.load_model("no_such_model", headers=management)) == 404
    assert not manager.is_server_ready()  # as on gRPC: no open health on management


def test_health_can_require_the_token(own_repo: Path, triton_http_clients: Any) -> None:
    with ServerThread(own_repo, inference_token=INFERENCE_TOKEN, health_requires_token=True) as srv:
        client = triton_http_clients(srv.http_target)
        assert not client.is_server_ready()
        assert client.is_server_ready(headers=bearer(INFERENCE_TOKEN))


# ---- the body limit ----


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(_new_repo(tmp_path_factory), max_message_bytes=LIMIT) as srv:
        yield srv


def _raw(target: str, head: bytes, body_chunks: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    """Send ``head`` (request line and headers) and then chunks for as long as the server reads
    them; return everything it answers until it closes or goes quiet."""
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server stopped reading: its answer is what matters
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer


def test_a_large_content_length_is_refused_before_the_body_is_read(
    small_server: ServerThread,
) -> None:
    """No body is ever sent: the answer can only come from the headers."""
    head = (
        b"POST /v2/models/fixed/infer HTTP/1.1\r\nHost: ferry\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    )
    answer = _raw(small_server.http_target, head)
    assert answer.startswith(b"HTTP/1.1 413 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["kind"] == "LIMIT_EXCEEDED"
    assert f"limit of {LIMIT} bytes (max_message_bytes)" in body["error"]


def test_expect_100_continue(small_server: ServerThread) -> None:
    over = (
        b"POST /v2/models/fixed/infer HTTP/1.1\r\nHost: ferry\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    assert _raw(small_server.http_target, over).startswith(b"HTTP/1.1 413 ")  # no 100 first
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}]}
    ).encode()
    host, port = small_server.http_target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(
            b"POST /v2/models/fixed/infer HTTP/1.1\r\nHost: ferry\r\nExpect: 100-continue\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_a_chunked_body_is_cut_off_at_the_limit(small_server: ServerThread) -> None:
    head = (
        b"POST /v2/models/fixed/infer HTTP/1.1\r\nHost: ferry\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 16384
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    answer = _raw(small_server.http_target, head, [chunk] * (2 * LIMIT // len(piece)))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"more than 65536 bytes arrived" in answer


def test_a_compressed_body_is_bounded_as_it_decodes(small_server: ServerThread) -> None:
    """A 16 KiB body that decodes to 16 MiB is refused once the limit's worth is decoded, never
    held whole."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    encoded = b"".join(bomb.compress(zeros) for _ in range(16)) + bomb.flush()
    assert len(encoded) < LIMIT // 2  # what arrives is within the limit; what it decodes to is not
    head = (
        b"POST /v2/models/fixed/infer HTTP/1.1\r\nHost: ferry\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: " + str(len(encoded)).encode() + b"\r\n\r\n"
    )
    answer = _raw(small_server.http_target, head, [encoded])
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"more than 65536 bytes decoded" in answer


def test_tritonclient_sees_413_and_small_requests_pass(
    small_server: ServerThread, triton_http_clients: Any
) -> None:
    client = triton_http_clients(small_server.http_target)
    tensor = th.InferInput("input", [3], "FP32")
    tensor.set_data_from_numpy(np.arange(3, dtype=np.float32))
    assert client.infer("fixed", [tensor]).as_numpy("output").shape == (3,)
    big = th.InferInput("input", [LIMIT], "FP32")
    big.set_data_from_numpy(np.zeros(LIMIT, np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("fixed", [big])
    assert exc.value.status() == "413"


# ---- TLS ----


def _get(port: int, context: ssl.SSLContext, path: str = "/v2/health/ready") -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=WAIT_S)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _context(
    certs: Certs, client_cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(key))
    return context


def test_tls_and_mutual_tls(own_repo: Path, certs: Certs, triton_http_clients: Any) -> None:
    settings = {"tls_cert_file": str(certs.server_cert), "tls_key_file": str(certs.server_key)}
    with ServerThread(own_repo, **settings) as srv:
        assert srv.app is not None
        assert _get(srv.app.http_port, _context(certs)) == 200
        client = triton_http_clients(
            srv.http_target, ssl=True, ssl_options={"ca_certs": str(certs.ca)}
        )
        _infer(client)
        with pytest.raises(ssl.SSLError):  # a client that does not trust the CA
            _get(srv.app.http_port, ssl.create_default_context())
    with ServerThread(own_repo, **settings, tls_client_ca_file=str(certs.ca)) as srv:
        assert srv.app is not None
        good = _context(certs, certs.client_cert, certs.client_key)
        for port in (srv.app.http_port, srv.app.management_http_port):
            assert _get(port, good, "/v2") == 200
            for bad in (_context(certs), _context(certs, certs.rogue_cert, certs.rogue_key)):
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    _get(port, bad, "/v2")


def test_tls_connections_count_against_the_cap_from_their_accept(
    own_repo: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A TLS connection's protocol hears nothing until its handshake is done, so one that never
    # started its handshake held a descriptor without counting: a flood of them escaped
    # --http-max-connections for the handshake's 30 s each. The handshake bound is shortened
    # so that the test waits on it; nothing here measures time.
    monkeypatch.setattr(listener, "HEADER_TIMEOUT", 2.0)
    settings = {"tls_cert_file": str(certs.server_cert), "tls_key_file": str(certs.server_key)}
    with ServerThread(own_repo, **settings, http_max_connections=1) as srv:
        assert srv.app is not None
        port = srv.app.http_port
        http = srv.app._http[0]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S):  # no handshake
            wait_for(lambda: http._handshaking == 1, "the server to accept the connection")
            assert _get(port, _context(certs)) == 503
        # Once it is gone (nothing says when: once its handshake's bound has passed), its
        # place is free.
        wait_for(lambda: _get(port, _context(certs)) == 200, "a connection to be served again")


def test_a_tls_head_that_stops_arriving_is_answered_and_closed(
    own_repo: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The head bound holds over TLS too, on the handshake and then on the head, whose 408 is
    # written through the TLS layer. The bound is shortened so the test waits on it; nothing
    # here measures time.
    monkeypatch.setattr(listener, "HEADER_TIMEOUT", 0.2)
    settings = {"tls_cert_file": str(certs.server_cert), "tls_key_file": str(certs.server_key)}
    with ServerThread(own_repo, **settings) as srv:
        assert srv.app is not None
        # A connection that never starts its handshake is closed as well.
        idle = socket.create_connection(("127.0.0.1", srv.app.http_port), timeout=WAIT_S)
        with idle, contextlib.suppress(ConnectionResetError):  # aborted: a reset, not a close
            assert idle.recv(65536) == b""
        raw = socket.create_connection(("127.0.0.1", srv.app.http_port), timeout=WAIT_S)
        with _context(certs).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
            answer = until_closed(sock)  # the server closes the connection
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(body)["kind"] == "DEADLINE_EXCEEDED"
