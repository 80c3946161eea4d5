"""HTTP/1.1 as clients put it on the wire, driven over raw sockets: what no HTTP library sends
but real clients, proxies and load balancers do."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import tritonclient.http as th
from aiohttp import web_protocol
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.test_utils import make_mocked_request
from helpers import ExecutionGate, close_on_this_thread, until_closed
from kserve_common import identity_name
from multidict import CIMultiDict, CIMultiDictProxy
from serverutil import ServerThread

from ferry.server.errors import InvalidArgument
from ferry.server.http.listener import _check_host

MODEL = identity_name("FP32")
BODY = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]}
).encode()
INFER = (
    f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n"
).encode() + BODY


def _half_closed(target: str, request: bytes) -> bytes:
    """Sends ``request``, shuts the write side (as curl's HTTP/1.0 mode and some load balancers
    do once a request is sent), and reads until the server closes."""
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return until_closed(sock)


def _answers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each answer in ``raw``, split by Content-Length."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        answers.append((head, rest[:length]))
        raw = rest[length:]
    return answers


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/health/live HTTP/1.0\r\n\r\n",
        f"GET /v2/models/{MODEL} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    ],
)
def test_a_whole_request_then_a_half_close_is_answered(
    kserve_server: ServerThread, request_bytes: bytes
) -> None:
    # The connection was closed as soon as the client shut its side: no answer at all.
    answers = _answers(_half_closed(kserve_server.http_target, request_bytes))
    assert len(answers) == 1, answers
    head, _ = answers[0]
    assert head.split(b"\r\n")[0].endswith(b" 200 OK"), head


def test_pipelined_requests_then_a_half_close_are_all_answered(
    kserve_server: ServerThread,
) -> None:
    health = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    metadata = f"GET /v2/models/{MODEL} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answers = _answers(_half_closed(kserve_server.http_target, health + metadata + health))
    assert [head.split(b"\r\n")[0] for head, _ in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert json.loads(answers[1][1])["name"] == MODEL


def test_a_half_close_while_the_inference_runs_cancels_it_and_says_so(
    kserve_server: ServerThread,
) -> None:
    """A half-close is a FIN, as a client that closed and left sends: its inference ends (a
    client that times out and retries leaves nothing running), and a client still reading is
    told why rather than left without an answer."""
    host, port = kserve_server.http_target.rsplit(":", 1)
    with (
        ExecutionGate(kserve_server, MODEL) as gate,
        socket.create_connection((host, int(port)), timeout=30) as sock,
    ):
        sock.sendall(INFER)
        gate.wait_entered()
        sock.shutdown(socket.SHUT_WR)
        answers = _answers(until_closed(sock))
        gate.release()
    assert len(answers) == 1 and answers[0][0].startswith(b"HTTP/1.1 400 "), answers
    error = json.loads(answers[0][1])
    assert error["kind"] == "CANCELLED", error
    assert "shut its side of the connection" in error["error"], error


@pytest.mark.parametrize(
    "body_start",
    [
        b"Content-Length: 100\r\n\r\n" + BODY[:10],
        b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + BODY[:5] + b"\r\n",
    ],
)
def test_a_body_cut_short_by_a_half_close_is_refused_at_once(
    kserve_server: ServerThread, body_start: bytes
) -> None:
    # It waited for the rest of the body (30 s) where it could never come.
    request = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n".encode() + body_start
    answers = _answers(_half_closed(kserve_server.http_target, request))
    assert len(answers) == 1, answers
    head, body = answers[0]
    assert head.startswith(b"HTTP/1.1 400 "), head
    # Said as the body's fault whether the half-close came while the body was read or before
    # the inference began: the second was CANCELLED, "keep the connection open", which did not
    # say that the body sent was short of its length.
    error = json.loads(body)
    assert error["kind"] == "INVALID_ARGUMENT", error
    assert "shut its side of the connection after" in error["error"], error
    assert "bytes of the body" in error["error"], error


def test_a_half_close_of_an_idle_or_half_sent_head_closes_without_an_answer(
    kserve_server: ServerThread,
) -> None:
    assert _half_closed(kserve_server.http_target, b"") == b""
    assert _half_closed(kserve_server.http_target, b"GET /v2/health/li") == b""


def _raw(target: str, request: bytes) -> bytes:
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        return until_closed(sock)


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "not valid"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request target"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "a header"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-" + b"a" * 9000 + b": 1\r\n\r\n", 431, "a header"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: a\r\n" * 200 + b"\r\n", 431, "over 128 headers"),
    ],
)
def test_what_the_parser_refuses_is_answered_in_http_1_1_with_its_own_status(
    kserve_server: ServerThread, request_bytes: bytes, status: int, says: str
) -> None:
    # All were "HTTP/1.0 400 Bad Request" (aiohttp's stand-in request is HTTP/1.0), so an
    # HTTP/1.1 client was not told the connection closes, and an over-long line was not told
    # apart from a malformed one.
    answer = _raw(kserve_server.http_target, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    assert b"\r\nConnection: close" in head, head
    assert b"\r\nDate: " in head, head
    error = json.loads(body)
    assert says in error["error"], error
    assert error["kind"] == ("INVALID_ARGUMENT" if status == 400 else "LIMIT_EXCEEDED"), error


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v2/health/live HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /v2/health/live HTTP/0.9\r\nHost: x\r\n\r\n",
        b"GET /v2/health/live HTTP/3.0\r\nHost: x\r\n\r\n",
        b"GET /v2/health/live HTTP/1.2\r\nHost: x\r\n\r\n",
        f"POST /v2/models/{MODEL}/infer HTTP/2.0\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".encode(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2's connection preface (prior knowledge)
    ],
)
def test_a_request_line_in_another_http_version_is_505_in_http_1_1(
    kserve_server: ServerThread, request_bytes: bytes
) -> None:
    # HTTP/2.0 and HTTP/0.9 were served ("HTTP/2.0 200 OK" in HTTP/1 framing), the others
    # answered "HTTP/1.0 400".
    answer = _raw(kserve_server.http_target, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), head
    assert b"\r\nConnection: close" in head, head
    error = json.loads(body)
    assert error["kind"] == "UNIMPLEMENTED"
    assert "send the request in HTTP/1.1" in error["error"], error


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/models/no_such_model/infer", b"404"),
        (f"/v2/models/{MODEL}/versions/7/infer", b"404"),
        (f"/v2/models/{MODEL}/versions/x/infer", b"400"),
    ],
)
def test_an_inference_that_cannot_be_served_is_refused_before_its_body_is_asked_for(
    kserve_server: ServerThread, path: str, status: bytes
) -> None:
    # The server answered "100 Continue" and read the whole body (up to max_message_bytes)
    # before it looked the model up; a client waiting for the 100 was asked for a body that
    # could only be refused, and one that never sent it waited for the body's timeout.
    host, port = kserve_server.http_target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            "Content-Length: 1000000\r\n\r\n".encode()
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


def test_an_http_1_0_request_with_transfer_encoding_is_answered_then_closed(
    kserve_server: ServerThread,
) -> None:
    # RFC 9112 6.1: its framing is faulty. Kept alive ("Connection: keep-alive"), the bytes
    # after its chunks were served as a next request, which a proxy may not have seen as one.
    chunked = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.0\r\nConnection: keep-alive\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunked
    answer = _raw(kserve_server.http_target, request + b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    answers = _answers(answer)
    assert len(answers) == 1, answers
    assert answers[0][0].startswith(b"HTTP/1.0 200 OK"), answers
    assert json.loads(answers[0][1])["outputs"][0]["data"] == [2.0]


@pytest.mark.parametrize("body", [BODY, b""])
def test_no_100_continue_once_the_body_has_come_or_when_there_is_none(
    kserve_server: ServerThread, body: bytes
) -> None:
    # tritonclient (geventhttpclient) sends an Expect header's body at once and reads no
    # interim answer: it took the 100 for its answer and every later answer on that
    # connection for the one before.
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = _raw(kserve_server.http_target, request + body)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n" if body else b"HTTP/1.1 400 "), answer[:200]


def test_tritonclient_with_an_expect_header_reads_each_answer(kserve_server: ServerThread) -> None:
    clients = [th.InferenceServerClient(kserve_server.http_target)]
    try:
        for value in (1.0, 2.0, 3.0):
            tensor = th.InferInput("input", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
            result = clients[0].infer(MODEL, [tensor], headers={"Expect": "100-continue"})
            assert result.as_numpy("output").tolist() == [[value]]
    finally:
        close_on_this_thread(clients)


@pytest.mark.parametrize(
    "target",
    [b"/v2/health/live#frag", b"/v2/health/live?a=1#frag", b"http://x/v2/health/live#frag"],
)
def test_a_request_target_with_a_fragment_is_400(
    kserve_server: ServerThread, target: bytes
) -> None:
    # RFC 9112 3.2: a request target has no fragment (a client strips it). One was answered
    # 404 "no endpoint at '/v2/health/live#frag'", or with a query before it, served.
    answer = _raw(
        kserve_server.http_target,
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    error = json.loads(body)
    assert error["kind"] == "INVALID_ARGUMENT", error
    assert "fragment" in error["error"], error


@pytest.mark.parametrize("expect", [b"foo", b"100-continue, foo", b"200-ok"])
def test_an_expectation_other_than_100_continue_is_417(
    kserve_server: ServerThread, expect: bytes
) -> None:
    # RFC 9110 10.1.1: an expectation the server cannot meet is answered 417. It was ignored
    # and the request served, as if it had been met.
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Length: {len(BODY)}\r\nExpect: "
    ).encode()
    answer = _raw(kserve_server.http_target, request + expect + b"\r\n\r\n" + BODY)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417 Expectation Failed\r\n"), head
    error = json.loads(body)
    assert error["kind"] == "INVALID_ARGUMENT", error
    assert "100-continue" in error["error"], error


def test_100_continue_in_any_case_is_still_met(kserve_server: ServerThread) -> None:
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Length: {len(BODY)}\r\nExpect: 100-Continue\r\n\r\n"
    ).encode()
    answer = _raw(kserve_server.http_target, request + BODY)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]


EXPECT_LISTS = [
    [b"100-continue", b"100-continue"],
    [b"100-continue, 100-continue"],
    [b"", b"100-continue"],
    [b", 100-continue"],
]


@pytest.mark.parametrize("expects", EXPECT_LISTS)
def test_100_continue_is_met_wherever_the_expect_list_holds_it(
    kserve_server: ServerThread, expects: list[bytes]
) -> None:
    # RFC 9110 10.1.1: Expect is a list, which may be split over several lines. Only the
    # first line was read, compared whole: no 100 came, and a client waiting for it sent its
    # body only at its own timeout. A model it cannot be sent to is refused before the 100.
    lines = b"".join(b"Expect: " + e + b"\r\n" for e in expects)
    host, port = kserve_server.http_target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(BODY)}\r\n".encode() + lines)
        sock.sendall(b"\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            got = sock.recv(1)
            assert got, interim
            interim += got
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        sock.sendall(BODY)
        answer = until_closed(sock)
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200 OK\r\n"), head_bytes
    assert json.loads(body)["outputs"][0]["data"] == [2.0]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/no_such_model/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000\r\n" + lines + b"\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 "), expects


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"foo, chunked", b"chunked"])
def test_a_transfer_coding_other_than_chunked_is_501(
    kserve_server: ServerThread, coding: bytes
) -> None:
    # RFC 9112 6.1: a transfer coding the server does not understand is answered 501. The
    # codings before "chunked" were dropped: a gzip-coded body was read still compressed
    # ("not valid JSON: can't decode byte 0x8b"), and one under "foo" was run as plain.
    import gzip

    body = gzip.compress(BODY) if coding.startswith(b"gzip") else BODY
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n".encode()
        + b"Transfer-Encoding: "
        + coding
        + b"\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    after = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = _answers(_raw(kserve_server.http_target, request + after))
    if coding.startswith(b"chunked"):  # chunked alone is served
        assert answers[0][0].startswith(b"HTTP/1.1 200 OK"), answers
        return
    assert [head.split(b"\r\n")[0] for head, _ in answers] == [
        b"HTTP/1.1 501 Not Implemented",
        b"HTTP/1.1 200 OK",  # the chunks were framed: the connection goes on
    ], answers
    error = json.loads(answers[0][1])
    assert error["kind"] == "UNIMPLEMENTED", error
    assert "Content-Encoding" in error["error"] and coding.split(b",")[0].decode() in error["error"]


# (request, what Ferry's own check says of it); Ferry's 400 keeps an HTTP/1.1 connection open
# (the parser's closes it), so each asks for its close, which ends the test's read.
HOSTLESS = [
    (b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n", "must carry a Host header"),
    (
        b"GET http://x/v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n",
        "must carry a Host header",
    ),
    (
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n",
        "2 Host headers: send one",
    ),
    (b"GET /v2/health/live HTTP/1.0\r\nHost: x\r\nHost: y\r\n\r\n", "2 Host headers: send one"),
]
HIDDEN_HOST = b"X-Host-Hidden-From-The-Parser"


class _HostBlindParser(HttpRequestParserPy):
    """aiohttp's request parser leaving the Host header to the handler, as the releases before
    3.14 that Ferry allows (aiohttp>=3.9) did: it refused no request for having two Host
    headers, or none in HTTP/1.1. The installed one refuses both itself, so over a socket only
    this parser lets such a request reach Ferry's own check (_check_host)."""

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        # Each Host header goes through under another name, beside a stand-in Host that the
        # parser's own check sees; the message then carries the request's Host headers alone.
        hidden = [
            HIDDEN_HOST + line[4:] if line[:5].lower() == b"host:" else line for line in lines
        ]
        message = super().parse_message([hidden[0], b"Host: stand-in", *hidden[1:]])
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in message.headers.items():
            if name.lower() != "host":
                headers.add("Host" if name == HIDDEN_HOST.decode() else name, value)
        raw = tuple(
            (b"Host" if name == HIDDEN_HOST else name, value)
            for name, value in message.raw_headers
            if name.lower() != b"host"
        )
        return message._replace(headers=CIMultiDictProxy(headers), raw_headers=raw)


@pytest.mark.parametrize("host_blind", [False, True], ids=["aiohttp-parser", "host-blind-parser"])
@pytest.mark.parametrize(("request_bytes", "says"), HOSTLESS)
def test_a_request_without_exactly_one_host_header_is_400(
    kserve_server: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    request_bytes: bytes,
    says: str,
    host_blind: bool,
) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request with no Host header, and any request with two, MUST be
    answered 400. The installed aiohttp's parser refuses them before the handler runs (its own
    words); past a parser that does not, the listener's check refuses them (Ferry's words)."""
    if host_blind:  # each connection of the listener makes its own parser
        monkeypatch.setattr(web_protocol, "HttpRequestParser", _HostBlindParser)
    answer = _raw(kserve_server.http_target, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", head
    error = json.loads(body)
    assert error["kind"] == "INVALID_ARGUMENT", error
    assert (says if host_blind else "Host") in error["error"], error


def test_the_host_blind_parser_serves_a_request_with_one_host_header(
    kserve_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test's parser passes a well-formed request as it came: the 400s above are Ferry's
    check, not the parser's doing."""
    monkeypatch.setattr(web_protocol, "HttpRequestParser", _HostBlindParser)
    answer = _raw(
        kserve_server.http_target,
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]


@pytest.mark.parametrize(
    ("version", "hosts", "refused"),
    [
        (HttpVersion11, [], True),
        (HttpVersion11, ["x", "y"], True),
        (HttpVersion10, ["x", "y"], True),
        (HttpVersion11, ["x"], False),
        (HttpVersion10, [], False),  # HTTP/1.0 has no Host requirement
    ],
)
def test_the_listener_itself_checks_the_host_header(
    version: HttpVersion, hosts: list[str], refused: bool
) -> None:
    # What reaches the handler past a parser that does not check (older aiohttp releases).
    headers = CIMultiDict(("Host", host) for host in hosts)
    request = make_mocked_request("GET", "/v2/health/live", headers=headers, version=version)
    if refused:
        with pytest.raises(InvalidArgument, match="Host"):
            _check_host(request)
    else:
        _check_host(request)


def test_an_http_1_0_request_without_a_host_header_is_served(kserve_server: ServerThread) -> None:
    answer = _raw(kserve_server.http_target, b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), answer[:200]
