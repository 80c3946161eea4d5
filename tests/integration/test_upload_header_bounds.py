"""What an upload header may carry, over real gRPC: a built-in's size kwargs, the nesting and size
of kwargs (JSON text or Struct), the architecture name, and the model filter of the listings. A
header the server cannot use later is refused at upload with INVALID_ARGUMENT naming what to fix,
so no stored upload can break ListUploads or Convert for other clients; a full state disk is
RESOURCE_EXHAUSTED, never INTERNAL."""

from __future__ import annotations

import base64
import errno
import io
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from serverutil import ConversionServers, ServerThread

from ferry.client import ConversionClient, InvalidInputError, LimitExceededError
from ferry.proto.v1 import model_conversion_pb2 as pb
from ferry.proto.v1 import model_conversion_pb2_grpc as pb_grpc
from ferry.server.convert import service as service_module
from ferry.server.convert import uploads as uploads_module
from ferry.server.convert.store import UploadRecord, now_ms
from ferry.server.convert.uploads import MAX_KWARGS_DEPTH, MAX_KWARGS_JSON
from ferry.server.examples import mlp_model


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ConversionServers]:
    servers = ConversionServers(tmp_path / "repo")
    yield servers
    servers.close()


@pytest.fixture
def server(servers: ConversionServers) -> tuple[ServerThread, ConversionClient]:
    srv, conv = servers.start()
    return srv, conv


def stub(srv: ServerThread) -> pb_grpc.ModelConversionStub:
    return pb_grpc.ModelConversionStub(grpc.insecure_channel(srv.management_target))


def state_dict_bytes() -> bytes:
    """A zip with data.pkl: passes the upload's format check (nothing is unpickled there)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", b"never read by the server")
    return buffer.getvalue()


def raw_upload(
    srv: ServerThread, data: bytes, fmt: int = pb.SOURCE_FORMAT_STATE_DICT, **header: Any
) -> pb.Upload:
    requests = [
        pb.UploadModelRequest(header=pb.UploadHeader(model="m", format=fmt, **header)),
        pb.UploadModelRequest(chunk=data),
    ]
    return stub(srv).UploadModel(iter(requests), timeout=60)


def refused(srv: ServerThread, data: bytes, **header: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        raw_upload(srv, data, **header)
    return info.value


def uploads_left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "repo.ferry" / "uploads").iterdir())


# ---- a built-in's size kwargs ----
@pytest.mark.parametrize(
    ("kwargs_json", "shown"),
    [
        ('{"in_features": "abc"}', '"abc"'),
        ('{"in_features": [1]}', "a list"),
        ('{"in_features": 1e400}', "Infinity"),
        ('{"in_features": null}', "null"),
        ('{"in_features": true}', "true"),
        ('{"in_features": 0}', "0"),
        ('{"in_features": 64.5}', "64.5"),
        ('{"in_features": 100000000000000000000000000}', "100000000000000000000000000"),
    ],
)
def test_builtin_sizes_that_are_not_sizes_are_refused_and_listing_still_works(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path, kwargs_json: str, shown: str
) -> None:
    srv, conv = server
    err = refused(srv, state_dict_bytes(), architecture="mlp", architecture_kwargs_json=kwargs_json)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    message = err.details()
    assert "'in_features'" in message and f"is {shown};" in message
    assert "whole number from 1 to" in message and '{"in_features": 64}' in message
    assert uploads_left(tmp_path) == []
    assert conv.list_uploads() == []


def test_good_builtin_sizes_give_the_default_inputs(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    srv, conv = server
    up = conv.upload(
        "m",
        state_dict_bytes(),
        format="state_dict",
        architecture="mlp",
        architecture_kwargs={"in_features": 12, "hidden": [8]},
    )
    assert [i.shape for i in up.inputs] == [(-1, 12)]
    # A Struct's numbers are doubles: 12.0 is the whole number 12.
    s = struct_pb2.Struct()
    s.update({"seq_len": None, "d_model": 12})
    reply = raw_upload(
        srv, state_dict_bytes(), architecture="transformer_encoder", architecture_kwargs=s
    )
    assert [list(i.shape) for i in reply.inputs] == [[-1, 16, 12]]
    s = struct_pb2.Struct()
    s.update({"in_features": 1.5})
    err = refused(srv, state_dict_bytes(), architecture="mlp", architecture_kwargs=s)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "is 1.5;" in err.details()
    assert len(conv.list_uploads()) == 2


def test_a_bad_record_already_stored_breaks_neither_listing_nor_convert(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    """An older server stored such kwargs unchecked: its upload lists without known inputs,
    and its Convert says what to do, while every other upload lists as before."""
    srv, conv = server
    good = conv.upload("m", state_dict_bytes(), format="state_dict", architecture="seed")
    assert srv.app is not None
    service = srv.app.conversion
    path = Path(service.state_dir) / "uploads" / "stored-by-an-older-server.pt"
    path.write_bytes(state_dict_bytes())
    for n, kwargs in enumerate(['{"in_features": "abc"}', "[1]", '{"in_features": 1e999}']):
        record = UploadRecord(
            upload_id=f"{n:032x}",
            model="m",
            format="state_dict",
            path=str(path),
            sha256="0" * 64,
            size_bytes=path.stat().st_size,
            architecture="mlp",
            architecture_kwargs=kwargs,
            description="",
            created_ms=now_ms(),
        )

        async def add(record: UploadRecord = record) -> None:
            service.store.add_upload(record)

        srv.call(add)
    listed = {u.upload_id: u for u in conv.list_uploads()}
    assert len(listed) == 4 and [i.shape for i in listed[good.upload_id].inputs] == [(-1, 3)]
    assert all(listed[f"{n:032x}"].inputs == () for n in range(3))
    for n, what in ((0, "'in_features' is \"abc\""), (1, "unreadable"), (2, "Infinity")):
        with pytest.raises(InvalidInputError) as info:
            conv.convert(f"{n:032x}")
        assert what in info.value.message and "upload" in info.value.message
        assert "delete it" in info.value.message


# ---- nesting and size ----
def test_deeply_nested_kwargs_json_is_invalid_argument(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    srv, _ = server
    for depth in (30_000, MAX_KWARGS_DEPTH + 1):
        text = '{"a":' + "[" * depth + "]" * depth + "}"
        assert len(text) <= MAX_KWARGS_JSON
        err = refused(srv, state_dict_bytes(), architecture="mlp", architecture_kwargs_json=text)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"nested deeper than {MAX_KWARGS_DEPTH} levels" in err.details()
    assert uploads_left(tmp_path) == []


def test_a_deeply_nested_safetensors_header_is_invalid_argument(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    """json.loads raises RecursionError, not ValueError, past the interpreter's nesting limit:
    it was INTERNAL, in the serving process (small files) or as a crashed check (large)."""
    _, conv = server
    for size in (20_000, 200_000):  # checked in the serving process, then in its own
        for text in (b"[" * size + b"]" * size, b'{"a":' * size + b"1" + b"}" * size):
            data = len(text).to_bytes(8, "little") + text
            with pytest.raises(InvalidInputError) as info:
                conv.upload("m", data, format="safetensors", architecture="seed")
            assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert "nests JSON deeper" in info.value.message, info.value.message
    assert uploads_left(tmp_path) == []


def _patched_zip(offset: int, value: bytes, name: bytes = b"archive/data.pkl") -> bytes:
    """A torch-like zip whose central directory entry has ``value`` at ``offset`` (and ``name``
    as its member name, same length)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    data = bytearray(buffer.getvalue())
    at = data.index(b"PK\x01\x02")
    data[at + offset : at + offset + len(value)] = value
    data[at + 46 : at + 46 + len(name)] = name
    return bytes(data)


def test_a_zip_that_zipfile_cannot_read_is_invalid_argument(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    """zipfile raises more than BadZipFile on a hostile archive: these were INTERNAL."""
    _, conv = server
    for data, what in (
        (_patched_zip(6, b"\x4d\x00"), "zip file version 7.7"),  # NotImplementedError
        (_patched_zip(8, b"\x00\x08", b"archive/data.\xff\xfe"), "codec"),  # UnicodeDecodeError
    ):
        with pytest.raises(InvalidInputError) as info:
            conv.upload("m", data, format="state_dict", architecture="seed")
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "corrupt or truncated zip archive" in info.value.message, info.value.message
        assert what in info.value.message, info.value.message
    assert uploads_left(tmp_path) == []


def test_struct_kwargs_have_the_json_limit(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    srv, conv = server
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    s = struct_pb2.Struct()
    s.update({"pad": "x" * MAX_KWARGS_JSON})
    err = refused(srv, onnx, fmt=pb.SOURCE_FORMAT_ONNX, architecture_kwargs=s)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"over the limit of {MAX_KWARGS_JSON}" in err.details()
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(MAX_KWARGS_DEPTH):
        inner["a"] = {}
        inner = inner["a"]
    s = struct_pb2.Struct()
    s.update(nested)
    err = refused(srv, onnx, fmt=pb.SOURCE_FORMAT_ONNX, architecture_kwargs=s)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "nested deeper" in err.details()
    assert uploads_left(tmp_path) == []
    s = struct_pb2.Struct()
    s.update({"pad": "x" * (MAX_KWARGS_JSON - 100)})
    raw_upload(srv, onnx, fmt=pb.SOURCE_FORMAT_ONNX, architecture_kwargs=s)
    (kept,) = conv.list_uploads()
    assert len(kept.architecture_kwargs["pad"]) == MAX_KWARGS_JSON - 100


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_struct_kwargs_with_a_number_json_cannot_hold_are_invalid_argument(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path, number: float
) -> None:
    """protobuf's Struct -> dict refuses NaN and infinities with a ValueError, which was
    INTERNAL with a traceback in the server log."""
    srv, _ = server
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    s = struct_pb2.Struct()
    s.update({"scale": number})
    err = refused(srv, onnx, fmt=pb.SOURCE_FORMAT_ONNX, architecture_kwargs=s)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "architecture_kwargs_json" in err.details()
    assert uploads_left(tmp_path) == []


@pytest.mark.parametrize("name", ["x" * 129, "x" * 100_000, "../x", "a b", "a\0b", "-x"])
def test_architecture_names_are_bounded(
    server: tuple[ServerThread, ConversionClient], name: str
) -> None:
    srv, conv = server
    err = refused(srv, state_dict_bytes(), architecture=name)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid architecture name" in err.details() and "[A-Za-z0-9_.-]" in err.details()
    assert len(err.details()) < 1000
    assert conv.list_uploads() == []


def test_listings_stay_under_the_message_limit_and_go_on_by_page(
    servers: ConversionServers,
) -> None:
    """However many big records are kept, a listing answers: newest first, as many as fit,
    and a page token to the rest (they were out of reach, and `ferry uploads delete --all`
    deleted only the first page's)."""
    srv, conv = servers.start(max_message_bytes=200_000)
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    pad = "x" * (MAX_KWARGS_JSON - 100)
    ids = [
        conv.upload("m", onnx, format="onnx", architecture_kwargs={"pad": pad}).upload_id
        for _ in range(5)
    ]
    first = stub(srv).ListUploads(pb.ListUploadsRequest(limit=100), timeout=30)
    listed = [u.upload_id for u in first.uploads]
    assert 1 <= len(listed) < 5 and first.next_page_token
    assert listed == ids[::-1][: len(listed)]
    # The SDK follows the pages: every record once, newest first, and never more than asked.
    assert [u.upload_id for u in conv.list_uploads(limit=100)] == ids[::-1]
    assert [u.upload_id for u in conv.list_uploads(limit=None)] == ids[::-1]
    assert [u.upload_id for u in conv.list_uploads("m", limit=4)] == ids[::-1][:4]
    assert conv.list_uploads("m", limit=1)[0].upload_id == ids[-1]


def test_pages_neither_repeat_nor_skip_when_records_come_and_go(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    srv, conv = server
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    ids = [conv.upload("m", onnx, format="onnx").upload_id for _ in range(5)]
    rpc = stub(srv).ListUploads
    page = rpc(pb.ListUploadsRequest(model="m", limit=2), timeout=30)
    assert [u.upload_id for u in page.uploads] == [ids[4], ids[3]] and page.next_page_token
    newer = conv.upload("m", onnx, format="onnx").upload_id  # before the next page
    conv.delete_upload(ids[2])  # the next page's first record
    rest = rpc(pb.ListUploadsRequest(model="m", page_token=page.next_page_token), timeout=30)
    assert [u.upload_id for u in rest.uploads] == [ids[1], ids[0]]
    assert rest.next_page_token == ""
    assert newer in {u.upload_id for u in conv.list_uploads("m")}


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "x" * 5000,
        "WzEsMiwzXQ",  # [1,2,3]: base64 of another shape
    ],
)
def test_a_page_token_the_server_did_not_give_is_invalid_argument(
    server: tuple[ServerThread, ConversionClient], token: str
) -> None:
    srv, _ = server
    for rpc, request in (
        (stub(srv).ListUploads, pb.ListUploadsRequest),
        (stub(srv).ListJobs, pb.ListJobsRequest),
    ):
        with pytest.raises(grpc.RpcError) as info:
            rpc(request(model="m", page_token=token), timeout=30)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not one this server gave" in (info.value.details() or "")


def test_an_empty_page_token_asks_for_the_first_page(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    srv, _ = server
    answer = stub(srv).ListJobs(pb.ListJobsRequest(model="m", page_token=""), timeout=30)
    assert list(answer.jobs) == [] and answer.next_page_token == ""
    answer = stub(srv).ListUploads(pb.ListUploadsRequest(model="m", page_token=""), timeout=30)
    assert list(answer.uploads) == [] and answer.next_page_token == ""


def test_a_page_token_is_for_the_model_filter_it_was_given_for(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    srv, conv = server
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    for _ in range(2):
        conv.upload("m", onnx, format="onnx")
    page = stub(srv).ListUploads(pb.ListUploadsRequest(model="m", limit=1), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        stub(srv).ListUploads(pb.ListUploadsRequest(page_token=page.next_page_token), timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "belongs to the listing of model 'm'" in (info.value.details() or "")


def test_a_page_token_is_for_the_listing_it_was_given_by(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    """A ListUploads token given to ListJobs was read as a position among jobs (a page from
    the upload's time on: newer jobs skipped, silently); and the reverse."""
    srv, conv = server
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    for _ in range(2):
        conv.upload("m", onnx, format="onnx")
    page = stub(srv).ListUploads(pb.ListUploadsRequest(model="m", limit=1), timeout=30)
    assert page.next_page_token
    with pytest.raises(grpc.RpcError) as info:
        stub(srv).ListJobs(
            pb.ListJobsRequest(model="m", page_token=page.next_page_token), timeout=30
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "belongs to the listing of uploads, not of jobs" in (info.value.details() or "")
    following = stub(srv).ListUploads(
        pb.ListUploadsRequest(model="m", limit=1, page_token=page.next_page_token), timeout=30
    )
    assert [u.upload_id for u in following.uploads] != [u.upload_id for u in page.uploads]
    # A token of the earlier form, which named no listing, is not one this server gives.
    old = base64.urlsafe_b64encode(b'[1,1796689599497,3,"m"]').decode().rstrip("=")
    with pytest.raises(grpc.RpcError) as info:
        stub(srv).ListJobs(pb.ListJobsRequest(model="m", page_token=old), timeout=30)
    assert "not one this server gave" in (info.value.details() or "")


# ---- the listings' model filter ----
@pytest.mark.parametrize("model", ["../x", "a\0b", "x" * 100_000, "a/b"])
def test_listing_with_an_invalid_model_filter_is_invalid_argument(
    server: tuple[ServerThread, ConversionClient], model: str
) -> None:
    srv, _ = server
    for call in (
        lambda: stub(srv).ListUploads(pb.ListUploadsRequest(model=model), timeout=30),
        lambda: stub(srv).ListJobs(pb.ListJobsRequest(model=model), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid model name" in info.value.details()
        assert len(info.value.details()) < 1000
    assert stub(srv).ListUploads(pb.ListUploadsRequest(model="fine"), timeout=30).uploads == []


# ---- a full state disk ----
@pytest.mark.parametrize("where", ["write", "sync"])
def test_a_full_state_disk_is_resource_exhausted_and_keeps_nothing(
    server: tuple[ServerThread, ConversionClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    _, conv = server

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uploads_module._Sink, where, full)
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    with pytest.raises(LimitExceededError) as info:
        conv.upload("m", onnx, format="onnx")
    err = info.value
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "state disk is full (No space left on device)" in err.message
    assert "--state-dir" in err.message and "upload again" in err.message
    assert uploads_left(tmp_path) == []
    monkeypatch.undo()
    assert conv.upload("m", onnx, format="onnx").size_bytes == len(onnx)


def test_a_full_job_database_is_resource_exhausted_and_keeps_nothing(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, conv = server
    assert srv.app is not None
    store = srv.app.conversion.store

    def full(_: UploadRecord) -> None:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # what sqlite3 sets on SQLITE_FULL
        raise exc

    monkeypatch.setattr(store, "add_upload", full)
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    with pytest.raises(LimitExceededError) as info:
        conv.upload("m", onnx, format="onnx")
    assert "state disk is full (the job database could not grow)" in info.value.message
    assert uploads_left(tmp_path) == []
    assert conv.list_uploads() == []


@pytest.mark.parametrize("where", ["files", "database"])
def test_a_full_state_disk_at_convert_is_resource_exhausted_and_queues_nothing(
    server: tuple[ServerThread, ConversionClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """Convert writes the job's contract and tensors into the state folder and its row into the
    database: a full disk there was INTERNAL ("the server log has the traceback")."""
    srv, conv = server
    assert srv.app is not None
    onnx = mlp_model(sizes=(4, 4), seed=0).SerializeToString()
    upload = conv.upload("m", onnx, format="onnx")
    if where == "files":

        def full(*_: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(service_module, "_write_tensors", full)
    else:

        def full(*_: object) -> None:
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise exc

        monkeypatch.setattr(srv.app.conversion.store, "add_job", full)
    with pytest.raises(LimitExceededError) as info:
        conv.convert(upload)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "state disk is full" in info.value.message and "--state-dir" in info.value.message
    assert info.value.message.endswith("then convert again")
    assert conv.list_jobs() == []
    assert list((tmp_path / "repo.ferry" / "jobs").iterdir()) == []
