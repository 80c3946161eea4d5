"""grpc.aio's ERROR for a stream response written to a call the client already ended is dropped
(kept at DEBUG when Ferry's gRPC adapters log DEBUG); every other record passes untouched.
The server end to end: a stream of 5,000 unread requests cancelled by its client logged two
such tracebacks before, none after (the hostile-input repro, run by hand)."""

from __future__ import annotations

import logging

import pytest

from ferry.server.grpc._base import PeerGoneFilter


class ExecuteBatchError(Exception):
    """Named as grpc's Cython class is (grpc._cython.cygrpc.ExecuteBatchError)."""


def _record(exc: BaseException | None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, "m", (), info)


def test_a_write_to_an_ended_call_is_dropped() -> None:
    assert PeerGoneFilter().filter(_record(ExecuteBatchError("Failed execute_batch"))) is False


def test_other_errors_pass_untouched() -> None:
    for exc in (RuntimeError("boom"), None):
        record = _record(exc)
        assert PeerGoneFilter().filter(record) is True
        assert record.levelno == logging.ERROR


def test_kept_at_debug_where_debug_is_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ferry.server.grpc._base")
    record = _record(ExecuteBatchError("x"))
    assert PeerGoneFilter().filter(record) is True
    assert record.levelno == logging.DEBUG
