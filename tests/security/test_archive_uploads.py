"""Hostile onnx_archive uploads: the route for models over 2 GiB (model.onnx with its external
data, in one tar) must not open what plain ONNX uploads keep shut.

An archive is extracted into the upload's own folder, and its graph may read only the files that
came in it. Each hostile archive here is refused with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for
a bound) naming the member or the tensor and the path, and leaves nothing in the uploads folder;
the conversion child re-checks the extracted folder when the upload check is bypassed; and the
serving side's onnxruntime refuses a version whose graph reaches outside its own folder.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from serverutil import ServerThread

from ferry.client import ConversionClient, InvalidInputError, JobFailedError
from ferry.server.convert import onnx_archive, uploads
from ferry.server.errors import ErrorKind, FerryError, LimitExceeded

DATA = np.arange(4, dtype=np.float32)


def model(location: str = "model.onnx.data", offset: int = 0, length: int | None = 16) -> bytes:
    """out = x + w, with w (4 floats) in ``location`` at ``offset``."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["out"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def with_entries(*entries: tuple[str, str], dtype: int = TensorProto.FLOAT) -> bytes:
    """``model()`` whose tensor w has these external_data entries (and type) instead."""
    proto = onnx.load_model_from_string(model())
    w = proto.graph.initializer[0]
    w.data_type = dtype
    del w.external_data[:]
    for key, value in entries:
        w.external_data.add(key=key, value=value)
    return proto.SerializeToString()


LOCATION = ("location", "model.onnx.data")


def tar(*members: tuple[str, bytes | str | None], kind: bytes = tarfile.REGTYPE) -> bytes:
    """An archive of (name, bytes) members; (name, "link:target") makes a symlink, (name, None)
    a folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as out:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                out.addfile(info)
            elif isinstance(data, str):
                info.type = tarfile.SYMTYPE if data.startswith("link:") else tarfile.LNKTYPE
                info.linkname = data.split(":", 1)[1]
                out.addfile(info)
            else:
                info.size = len(data)
                info.type = kind
                out.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pax(records: dict[str, str]) -> bytes:
    """One pax extended header (its header block and records), as a hostile writer lays it."""
    body = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        size = len(record) + len(str(len(record) + len(str(len(record)))))
        body += str(size).encode() + record
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)


def raw_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    block = info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)
    return block + b"\0" * 1024


def sparse_member(name: str) -> bytes:
    """A GNU sparse member (type 'S'), which Python's tarfile reads but cannot write."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    return info.tobuf(format=tarfile.GNU_FORMAT) + b"a" * 512


GOOD = (("model.onnx", model()), ("model.onnx.data", DATA.tobytes()))
# name -> (archive, words the refusal must contain)
HOSTILE: dict[str, tuple[bytes, list[str]]] = {
    "dot-dot member": (tar(*GOOD, ("../escape.bin", b"x")), ["'../escape.bin'", "'..'"]),
    "absolute member": (tar(*GOOD, ("/tmp/abs.bin", b"x")), ["'/tmp/abs.bin'", "absolute"]),
    "nested member": (tar(*GOOD, ("sub/w.bin", b"x")), ["'sub/w.bin'", "no folders"]),
    "folder member": (tar(*GOOD, ("sub", None)), ["'sub' is a folder"]),
    "symlink": (tar(*GOOD, ("link.bin", "link:/etc/passwd")), ["'link.bin' is a link"]),
    "hardlink": (tar(*GOOD, ("hard.bin", "hard:model.onnx.data")), ["'hard.bin' is a link"]),
    "dot file": (tar(*GOOD, (".hidden", b"x")), ["'.hidden'", "not accepted"]),
    "twice": (tar(*GOOD, ("model.onnx.data", b"y")), ["'model.onnx.data' twice"]),
    "no model": (tar(("weights.bin", DATA.tobytes())), ["no model.onnx", "weights.bin"]),
    "not in the archive": (
        tar(("model.onnx", model("other.bin")), ("model.onnx.data", DATA.tobytes())),
        ["initializer 'w'", "'other.bin'", "carries no such file"],
    ),
    "outside the folder": (
        tar(("model.onnx", model("../victim.safetensors")), ("model.onnx.data", DATA.tobytes())),
        ["initializer 'w'", "'../victim.safetensors'", "not a plain file name"],
    ),
    "absolute reference": (
        tar(("model.onnx", model("/etc/passwd")), ("model.onnx.data", DATA.tobytes())),
        ["initializer 'w'", "'/etc/passwd'"],
    ),
    "offset beyond the end": (
        tar(("model.onnx", model(offset=8)), ("model.onnx.data", DATA.tobytes())),
        ["initializer 'w'", "bytes 8..24", "a file of 16 bytes"],
    ),
    "length beyond the end": (
        tar(("model.onnx", model(length=None)), ("model.onnx.data", DATA.tobytes()[:12])),
        ["initializer 'w'", "bytes 0..16", "a file of 12 bytes"],
    ),
    "length unlike the tensor": (
        tar(("model.onnx", model(length=8)), ("model.onnx.data", DATA.tobytes())),
        ["initializer 'w'", "reads 8 bytes", "need 16"],
    ),
    # Entries each reader reads its own way: the check read the last of a key given twice and
    # an empty value as absent, Python's int() " 0"; onnxruntime refuses them all, so the
    # upload was accepted and its conversion failed later, FAILED_PRECONDITION.
    "a key twice": (
        tar(("model.onnx", with_entries(LOCATION, ("offset", "8"), ("offset", ""))), GOOD[1]),
        ["initializer 'w'", "gives 'offset' twice"],
    ),
    "an empty value": (
        tar(("model.onnx", with_entries(LOCATION, ("offset", ""))), GOOD[1]),
        ["initializer 'w'", "'offset' is empty"],
    ),
    "an unknown key": (
        tar(("model.onnx", with_entries(LOCATION, ("basepath", "/etc"))), GOOD[1]),
        ["initializer 'w'", "key 'basepath' is not one of location, offset, length, checksum"],
    ),
    "an offset not in plain digits": (
        tar(("model.onnx", with_entries(LOCATION, ("offset", " 0"))), GOOD[1]),
        ["initializer 'w'", "offset ' 0'", "decimal digits only"],
    ),
    "a string tensor": (
        tar(("model.onnx", with_entries(LOCATION, dtype=TensorProto.STRING)), GOOD[1]),
        ["initializer 'w'", "type STRING cannot keep its data in an external file"],
    ),
    "not a model": (tar(("model.onnx", b"\xff" * 64)), ["does not parse"]),
    "compressed": (b"\x1f\x8b" + b"\0" * 600, ["uncompressed tar"]),
    # tarfile reads each extended header one call deeper: RecursionError, which was INTERNAL.
    "extended headers chained": (
        pax({"path": "model.onnx"}) * 5000 + raw_member("model.onnx", model()),
        ["corrupt", "chained"],
    ),
    # A sparse member writes out holes: more bytes on disk than the upload carried.
    "sparse member": (
        sparse_member("model.onnx.data") + raw_member("model.onnx", model()),
        ["sparse"],
    ),
    # A member that claims more bytes than the archive holds after its header.
    "size past the end": (
        raw_member("model.onnx", bytes(4096))[:1024],
        ["claims", "truncated or corrupt"],
    ),
    # A GNU sparse 1.0 map that ends early: tarfile's ValueError, which was INTERNAL.
    "malformed sparse map": (
        pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "model.onnx"})
        + raw_member("x", b"999999999\n1\n".ljust(512, b"\0")),
        ["corrupt"],
    ),
}


def unpack(archive: Path, folder: Path) -> Path:
    """The server's receive step for an archive: extract, check the graph, rename."""
    return asyncio.run(uploads._unpack(archive, folder, archive.stat().st_size, 0, 0.0))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_and_leaves_nothing(tmp_path: Path, name: str) -> None:
    archive, words = HOSTILE[name]
    folder = tmp_path / "uploads"
    folder.mkdir()
    (folder / "tmp-archive").write_bytes(archive)
    with pytest.raises(FerryError) as info:  # InvalidArgument, or its kind from the check process
        unpack(folder / "tmp-archive", folder / "abc")
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT, (name, info.value.message)
    for word in words:
        assert word in info.value.message, (name, info.value.message)
    assert sorted(p.name for p in folder.iterdir()) == ["tmp-archive"]


def test_the_bounds_hold(tmp_path: Path) -> None:
    many = tar(*GOOD, *((f"f{i}", b"") for i in range(5)))
    (tmp_path / "many.tar").write_bytes(many)
    with pytest.raises(LimitExceeded, match="more than 4 members"):
        onnx_archive.extract(tmp_path / "many.tar", tmp_path / "out", limit=1 << 20, max_files=4)
    assert not (tmp_path / "out").exists()
    big = tar(*GOOD, ("pad.bin", b"\0" * 4096))
    (tmp_path / "big.tar").write_bytes(big)
    with pytest.raises(LimitExceeded, match="more than the limit of 4000 bytes"):
        onnx_archive.extract(tmp_path / "big.tar", tmp_path / "out", limit=4000)
    assert not (tmp_path / "out").exists()


def test_a_good_archive_is_extracted_flat(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(tar(("./", None), *GOOD))
    path = unpack(tmp_path / "a.tar", tmp_path / "abc")
    assert path == tmp_path / "abc" / "model.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.zeros((1, 4), np.float32)})
    assert np.array_equal(out[0], DATA)


def test_every_entry_onnx_writes_is_accepted(tmp_path: Path) -> None:
    """The strict reading of external_data refuses only what readers disagree on."""
    entries = (LOCATION, ("offset", "0"), ("length", "16"), ("checksum", "0" * 40))
    (tmp_path / "a.tar").write_bytes(tar(("model.onnx", with_entries(*entries)), GOOD[1]))
    path = unpack(tmp_path / "a.tar", tmp_path / "abc")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.zeros((1, 4), np.float32)})
    assert np.array_equal(out[0], DATA)


def test_the_sdk_packs_a_data_file_named_anywhere_in_the_schema(tmp_path: Path) -> None:
    """The SDK finds data files from the wire format with a schema of its own: it must reach
    every place onnx's schema lets a tensor sit, as the server's check does (a local function's
    default attribute and the training graphs were missed: the file stayed behind and the
    server refused the archive for lacking it)."""
    from test_external_data import SCHEMA_PATHS, _base, _mark

    from ferry.client._archive import external_locations

    missed = []
    for path in SCHEMA_PATHS:
        model: Any = _base()
        message = model
        for name in path:
            field = message.DESCRIPTOR.fields_by_name[name]
            message = getattr(message, name).add() if field.is_repeated else getattr(message, name)
        _mark(message, "both", "data.bin")
        (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
        if external_locations(tmp_path / "model.onnx") != ["data.bin"]:
            missed.append(".".join(path))
    assert missed == []


# ---- through the server ----
def test_the_server_refuses_them_with_invalid_argument(
    conversion_server: tuple[ServerThread, ConversionClient],
) -> None:
    srv, conv = conversion_server
    assert srv.app is not None
    folder = srv.app.conversion.state_dir.resolve() / "uploads"
    before = sorted(p.name for p in folder.iterdir())
    for name in (
        "dot-dot member",
        "symlink",
        "outside the folder",
        "offset beyond the end",
        "a key twice",
        "extended headers chained",
    ):
        archive, words = HOSTILE[name]
        with pytest.raises(InvalidInputError) as info:
            conv.upload("thief", archive, format="onnx_archive")
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, name
        assert all(w in info.value.message for w in words), (name, info.value.message)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert conv.list_uploads() == []


def test_a_plain_onnx_upload_with_external_data_names_the_archive_route(
    conversion_server: tuple[ServerThread, ConversionClient],
) -> None:
    _, conv = conversion_server
    with pytest.raises(InvalidInputError) as info:
        conv.upload("thief", model(), format="onnx")
    message = info.value.message
    assert message.startswith("model reads external data from graph 'g' > initializer 'w'")
    assert "self-contained" in message and "onnx_archive" in message


def test_an_archive_reads_no_other_uploads_file(
    conversion_server: tuple[ServerThread, ConversionClient],
) -> None:
    """The archive's folder is its own: naming another upload's file by id is refused."""
    _srv, conv = conversion_server
    other = conv.upload("victim", tar(*GOOD), format="onnx_archive")
    for location in (f"../{other.upload_id}/model.onnx.data", f"{other.upload_id}"):
        hostile = tar(("model.onnx", model(location)), ("model.onnx.data", DATA.tobytes()))
        with pytest.raises(InvalidInputError) as info:
            conv.upload("thief", hostile, format="onnx_archive")
        assert repr(location) in info.value.message


def test_the_child_checks_again_when_the_upload_check_is_bypassed(
    conversion_server: tuple[ServerThread, ConversionClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, conv = conversion_server
    monkeypatch.setattr(onnx_archive, "check", lambda folder, files: None)
    hostile = tar(("model.onnx", model("../../../victim.bin")), ("model.onnx.data", b"\0" * 16))
    up = conv.upload("thief", hostile, format="onnx_archive")
    with pytest.raises(JobFailedError) as info:
        conv.convert(up).wait(progress=False)
    err = info.value
    assert (err.code, err.kind) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert "'../../../victim.bin'" in err.message and err.job.stage == "load"
    assert not (srv.settings.repository / "thief").exists()


def test_a_version_cannot_read_another_versions_data(tmp_path: Path) -> None:
    """The serving side: onnxruntime confines external data to the model file's folder (the
    version's own); a graph naming ``../1/model.onnx.data``, a symlink out, or an absolute path
    fails to load. Ferry relies on it (its publish writes only relative names inside the
    version), so this guards against an onnxruntime that stops doing so."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx.data").write_bytes(DATA.tobytes())
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "link.bin").symlink_to(tmp_path / "1" / "model.onnx.data")
    for i, location in enumerate(
        ["../1/model.onnx.data", str(tmp_path / "1" / "model.onnx.data"), "link.bin"]
    ):
        path = tmp_path / "2" / f"model{i}.onnx"
        path.write_bytes(model(location))
        with pytest.raises(Exception, match="External data path"):
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
