"""The one error table: every domain kind has exactly one status code and SDK class, and the SDK
raises that class for it. Checked both ways, so neither side can drift alone."""

from __future__ import annotations

import grpc
import pytest

from ferry.client import _errors as sdk
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.grpc.status import ERROR_TABLE, status_of, trailing


def test_every_kind_has_a_row() -> None:
    assert set(ERROR_TABLE) == set(ErrorKind)


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.value)
def test_sdk_class_matches_the_table(kind: ErrorKind) -> None:
    code, cls = ERROR_TABLE[kind]
    assert sdk.KIND_CLASSES[kind.value] is cls
    # A caller catching by status code still catches the finer class.
    assert issubclass(cls, sdk.CODE_CLASSES[code])


def test_sdk_knows_no_kind_the_server_lacks() -> None:
    assert set(sdk.KIND_CLASSES) == {k.value for k in ErrorKind}


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.value)
def test_round_trip_from_server_error_to_sdk_exception(kind: ErrorKind) -> None:
    code, message, wire_kind = status_of(FerryError("what to fix", kind=kind))
    assert (code, message, wire_kind) == (ERROR_TABLE[kind][0], "what to fix", kind.value)
    assert trailing(wire_kind) == ((sdk.ERROR_KIND_METADATA, kind.value),)
    error = sdk.from_status(code, message, wire_kind)
    assert type(error) is ERROR_TABLE[kind][1]
    assert (error.code, error.message, error.kind) == (code, "what to fix", kind.value)


def test_unexpected_exceptions_are_internal_and_do_not_leak() -> None:
    code, message, kind = status_of(KeyError("/secret/path"))
    assert code is grpc.StatusCode.INTERNAL
    assert kind == "INTERNAL"
    assert "secret" not in message
    assert "KeyError" in message


def test_long_messages_are_bounded() -> None:
    _, message, _ = status_of(FerryError("x" * 100_000, kind=ErrorKind.INVALID_INPUT))
    assert len(message) <= 2000


def test_a_long_message_keeps_its_beginning_and_its_end() -> None:
    text = f"input {'n' * 5000!r} appears twice in the request"
    _, message, _ = status_of(FerryError(text, kind=ErrorKind.INVALID_ARGUMENT))
    assert len(message) == 2000
    assert message.startswith("input 'nnn") and message.endswith("' appears twice in the request")
    assert " [...] " in message
    _, message, _ = status_of(FerryError("y" * 2000, kind=ErrorKind.INVALID_ARGUMENT))
    assert message == "y" * 2000


def test_codes_without_a_kind_map_to_the_base_classes() -> None:
    assert type(sdk.from_status(grpc.StatusCode.NOT_FOUND, "m")) is sdk.NotFoundError
    assert type(sdk.from_status(grpc.StatusCode.INTERNAL, "m")) is sdk.ServerError
    assert type(sdk.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "m")) is (
        sdk.ResourceExhaustedError
    )
    assert type(sdk.from_status(None, "m")) is sdk.FerryError
