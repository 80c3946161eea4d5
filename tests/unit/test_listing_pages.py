"""The SDK's listings go on by page (``next_page_token``) and always end, whatever the server
answers: the server here is a stand-in stub whose pages and tokens the test chooses."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.client import ConversionClient, InvalidInputError
from ferry.proto.v1 import model_conversion_pb2 as pb


class _Server:
    """ListUploads answering page after page from ``pages``, (records, next token) each, and
    round again from the first; at most ``most`` calls, so that a client that loops fails
    instead of hanging."""

    def __init__(self, pages: list[tuple[int, str]], most: int = 50) -> None:
        self.pages = pages
        self.tokens: list[str] = []
        self.most = most

    def ListUploads(self, request: pb.ListUploadsRequest, **_: Any) -> pb.ListUploadsResponse:
        self.tokens.append(request.page_token)
        if len(self.tokens) > self.most:
            raise AssertionError("the client kept asking")
        count, token = self.pages[(len(self.tokens) - 1) % len(self.pages)]
        uploads = [pb.Upload(upload_id=f"u{len(self.tokens)}-{i}") for i in range(count)]
        return pb.ListUploadsResponse(uploads=uploads, next_page_token=token)


@pytest.fixture
def client() -> Any:
    with ConversionClient("127.0.0.1:1", timeout=5) as c:  # never connected: the stub answers
        yield c


def test_pages_are_followed_to_the_last(client: Any) -> None:
    client._stub = server = _Server([(2, "a"), (2, "b"), (1, "")])
    assert len(client.list_uploads(limit=None)) == 5
    assert server.tokens == ["", "a", "b"]


@pytest.mark.parametrize(
    ("pages", "asked"),
    [
        ([(1, "a"), (0, "b")], ["", "a"]),  # a page that brings nothing ends it
        ([(1, "a"), (1, "a")], ["", "a"]),  # the token it was asked with, again
        ([(1, "a"), (1, "b")], ["", "a", "b"]),  # tokens that come round again: a, b, a, ...
        ([(1, "a"), (1, "b"), (1, "c")], ["", "a", "b", "c"]),  # a, b, c, a, ...
    ],
)
def test_a_faulty_server_cannot_keep_a_listing_going(
    client: Any, pages: list[tuple[int, str]], asked: list[str]
) -> None:
    """A server (or a proxy replaying answers) whose tokens come round again kept
    list_uploads(limit=None) asking for ever, its list growing."""
    client._stub = server = _Server(pages)
    client.list_uploads(limit=None)
    assert server.tokens == asked  # each page asked for once, none after the loop would start


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_the_sdk_refuses_a_limit_that_is_not_a_count(client: Any, limit: Any) -> None:
    with pytest.raises(InvalidInputError, match="limit"):
        client.list_uploads(limit=limit)
    with pytest.raises(InvalidInputError, match="limit"):
        client.list_jobs(limit=limit)
