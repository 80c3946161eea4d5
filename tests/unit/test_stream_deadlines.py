"""A stream request whose budget runs out while it waits behind the stream's earlier writes
(grpc takes the next message only once the last one is written: flow control) is not sent,
and ``results()`` yields it with DeadlineExceededError; what is left of a budget goes with the
others. The gRPC call is a stand-in here, so the test decides when messages are taken."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ferry.client import DeadlineExceededError, FerryError, _stream
from ferry.client._stream import InferStream

X = {"input": np.ones((1, 4), np.float32)}


class _Call:
    """Answers nothing; ends when cancelled or when the test says."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        """The server's first headers: this stand-in states no limit (a server's would)."""
        return ()

    def __iter__(self) -> Iterator[bytes]:
        self.ended.wait(30)
        return iter(())

    def cancel(self) -> None:
        self.ended.set()


def test_a_request_whose_deadline_passes_behind_earlier_writes_is_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[Iterator[bytes]] = []
    call = _Call()

    def method(requests: Iterator[bytes], **options: Any) -> _Call:
        taken.append(requests)
        return call

    stream = InferStream(method, "m")
    stream.submit(X, "fresh")
    stream.submit(X, "old", timeout=1.0)
    stream.close()
    # grpc takes the messages only now, five seconds on: "old" has waited past its budget.
    later = time.monotonic() + 5.0
    monkeypatch.setattr(
        _stream, "time", SimpleNamespace(monotonic=lambda: later, perf_counter=time.perf_counter)
    )
    (requests,) = taken
    sent = list(requests)
    assert len(sent) == 1  # "fresh" only
    call.ended.set()
    got = dict(stream.results())
    stream.wait(30)
    assert isinstance(got["old"], DeadlineExceededError)
    assert "was not sent" in str(got["old"]) and "earlier writes" in str(got["old"])
    assert isinstance(got["fresh"], FerryError)  # the stand-in ended without answering it
