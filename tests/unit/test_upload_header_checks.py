"""The header checks behind UploadModel, without a server: a built-in's size kwargs, the kwargs'
nesting and size however they arrived, and the architecture name."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry.server.convert import architectures, uploads
from ferry.server.convert.uploads import UploadHeader, check_header
from ferry.server.errors import InvalidArgument, LimitExceeded


def header(**fields: Any) -> UploadHeader:
    fields.setdefault("model", "m")
    fields.setdefault("format", "state_dict")
    fields.setdefault("architecture", "mlp")
    return UploadHeader(**fields)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("mlp", "in_features"),
        ("linear_heavy", "in_features"),
        ("small_cnn", "in_channels"),
        ("resnet", "in_channels"),
        ("transformer_encoder", "d_model"),
        ("transformer_encoder", "seq_len"),
    ],
)
def test_every_size_the_server_reads_is_checked(name: str, key: str) -> None:
    for bad in ("8", 8.0, -1, True, {"n": 8}, architectures.MAX_SIZE + 1):
        with pytest.raises(InvalidArgument, match=f"kwarg '{key}' is "):
            architectures.check_kwargs(name, {key: bad})
        with pytest.raises(InvalidArgument, match=f"kwarg '{key}' is "):
            architectures.default_input_specs(name, {key: bad})
    architectures.check_kwargs(name, {key: 8})
    assert 8 in architectures.default_input_specs(name, {key: 8})[0].shape


def test_only_seq_len_may_be_null_and_other_kwargs_are_the_constructors() -> None:
    architectures.check_kwargs("transformer_encoder", {"seq_len": None})
    with pytest.raises(InvalidArgument, match=r"\(or null\)"):
        architectures.check_kwargs("transformer_encoder", {"seq_len": "x"})
    with pytest.raises(InvalidArgument, match="is null;"):
        architectures.check_kwargs("mlp", {"in_features": None})
    # Not read by the server: left to the constructor, in the child.
    architectures.check_kwargs("mlp", {"hidden": "x", "activation": 3})
    architectures.check_kwargs("my_plugin", {"in_features": "anything"})


def test_weights_only_headers_check_the_builtin_kwargs_other_formats_do_not() -> None:
    bad = {"in_features": "abc"}
    for fmt in ("state_dict", "safetensors"):
        with pytest.raises(InvalidArgument, match="'in_features' is \"abc\""):
            check_header(
                header(format=fmt, architecture_kwargs=bad), limit=1, allow_code_formats=False
            )
    # An ONNX upload never builds the architecture: its kwargs are only bounded.
    check_header(header(format="onnx", architecture_kwargs=bad), limit=1, allow_code_formats=False)


def test_kwargs_are_bounded_however_they_arrived() -> None:
    deep: Any = []
    for _ in range(100_000):  # deeper than any recursive check could walk
        deep = [deep]
    with pytest.raises(InvalidArgument, match="nested deeper than"):
        uploads.check_kwargs({"a": deep})
    with pytest.raises(InvalidArgument, match="nested deeper than"):
        uploads.kwargs_from_json('{"a":' + "[" * 30_000 + "]" * 30_000 + "}")
    with pytest.raises(InvalidArgument, match="over the limit of 65536"):
        uploads.check_kwargs({"pad": "x" * uploads.MAX_KWARGS_JSON})
    uploads.check_kwargs({"pad": "x" * (uploads.MAX_KWARGS_JSON - 20)})


@pytest.mark.parametrize("name", ["", "x" * 129, "a/b", "a b", "\0", ".x"])
def test_architecture_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid architecture name"):
        architectures.check_name(name)
    for good in ("mlp", "tiny_convnet", "x" * 128, "my-net.v2"):
        architectures.check_name(good)


def test_a_full_disk_while_receiving_is_a_limit_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_: object) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(uploads._Sink, "write", full)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"PK\x03\x04"

    with pytest.raises(LimitExceeded, match=r"state disk is full \(Disk quota exceeded\)"):
        asyncio.run(uploads.receive(header(), chunks(), tmp_path, limit=1 << 20))
    assert list(tmp_path.iterdir()) == []


def test_kwargs_json_naming_a_key_twice_is_refused() -> None:
    """Python's reader keeps the last value: the upload built another model than was meant."""
    with pytest.raises(InvalidArgument, match="'hidden' is given twice"):
        uploads.kwargs_from_json('{"hidden": [256], "in_features": 8, "hidden": [8]}')
    with pytest.raises(InvalidArgument, match="'k' is given twice"):
        uploads.kwargs_from_json('{"a": {"k": 1, "k": 2}}')
    assert uploads.kwargs_from_json('{"a": {"k": 1}, "k": 2}') == {"a": {"k": 1}, "k": 2}
