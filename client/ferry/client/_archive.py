"""Packing an ONNX model with external data into the one upload that carries it (onnx_archive).

A model over 2 GiB is saved as ``model.onnx`` plus data files its tensors name by relative
location, side by side (Triton's and KServe's version-folder layout). The server accepts that
folder as an uncompressed tar of flat, regular files; this module writes it from a folder, or
from a ``.onnx`` file and the data files its graph names (read from the protobuf wire format:
the SDK does not depend on onnx).
"""

from __future__ import annotations

import mmap
import os
import tarfile
import tempfile
from pathlib import Path

from ferry.client._errors import InvalidInputError

MODEL_FILE = "model.onnx"
ARCHIVE_FORMAT = "onnx_archive"
# A module whose weights exceed this is exported with external data and sent as an archive:
# an ONNX file cannot exceed 2 GiB, and the graph needs room beside the weights.
EXTERNAL_DATA_THRESHOLD = int(1.8 * (1 << 30))


def external_locations(model_path: Path) -> list[str]:
    """The data files the graph at ``model_path`` reads, in order of first use; [] when it
    reads none or is not a readable ONNX file (the server judges the bytes).

    Read from protobuf's wire format through a memory map, without onnx (the SDK does not
    depend on it) and without reading the tensors' bytes: a self-contained file of any size
    costs a walk over its field headers. Tensors are found where onnx keeps them: initializers,
    sparse initializers, node attributes, subgraphs and local functions (their default
    attributes too) at any depth, training graphs."""
    try:
        with open(model_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            found: dict[str, None] = {}
            _walk(m, 0, len(m), "model", found)
            return list(found)
    except (OSError, ValueError, IndexError, RecursionError):
        # RecursionError: subgraphs nested past Python's stack (a 5 KB file can), which was
        # a traceback out of upload(); no real model nests so deep.
        return []


Buffer = bytes | mmap.mmap  # indexing gives an int, slicing bytes

# message kind -> {field number: kind of the message in it}: every onnx.proto field that leads
# to a TensorProto (the server's check walks them all; a data file missed here was left out of
# the archive, and the server refused the upload for lacking it).
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto: initialization, algorithm
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},  # attribute_proto: the attributes' defaults
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}


def _walk(buf: Buffer, start: int, end: int, kind: str, found: dict[str, None]) -> None:
    if kind == "entry":
        entry = dict(_strings(buf, start, end))
        if entry.get(1) == "location" and 2 in entry:
            found.setdefault(entry[2], None)
        return
    inner = _SCHEMA[kind]
    for field, lo, hi in _delimited(buf, start, end):
        if field in inner:
            _walk(buf, lo, hi, inner[field], found)


def _strings(buf: Buffer, start: int, end: int) -> list[tuple[int, str]]:
    return [(f, buf[lo:hi].decode("utf-8", "replace")) for f, lo, hi in _delimited(buf, start, end)]


def _delimited(buf: Buffer, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buf[start:end]."""
    out = []
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated field")
            out.append((tag >> 3, pos, pos + size))
            pos += size
        else:
            raise ValueError(f"wire type {wire}")
    return out


def _varint(buf: Buffer, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def pack_folder(folder: Path) -> Path:
    """A temporary tar of ``folder``'s model.onnx and the data files its graph names, as for a
    ``.onnx`` file named directly; the caller removes it.

    Only those: every regular file went, so a folder with a ``.DS_Store``, notes or a
    checkpoint beside the model was refused whole (the server takes plain names only) or sent
    gigabytes the model never reads."""
    model = folder / MODEL_FILE
    if not model.is_file():
        raise InvalidInputError(
            f"{folder} holds no {MODEL_FILE}: a model folder holds model.onnx and the data files "
            "its tensors name"
        )
    _inside(folder, MODEL_FILE)
    return pack_model(model, external_locations(model))


def pack_model(model_path: Path, locations: list[str]) -> Path:
    """A temporary tar of ``model_path`` (as model.onnx) and the data files it names, each of
    them in the model's folder (``_inside``)."""
    folder = model_path.parent
    for location in locations:
        path = folder / location
        if Path(location).is_absolute() or ".." in Path(location).parts or "/" in location:
            raise InvalidInputError(
                f"{model_path} reads external data from {location!r}: the server accepts only "
                "data files side by side with the model; save it again with "
                "onnx.save(model, path, save_as_external_data=True, location='model.onnx.data')"
            )
        if not path.is_file():
            raise InvalidInputError(f"{model_path} reads external data from {path}: no such file")
        _inside(folder, location)
    return _pack(folder, [model_path.name, *locations], rename={model_path.name: MODEL_FILE})


def _inside(folder: Path, name: str) -> None:
    """Refuse ``folder / name`` when it is a link to a file outside ``folder``.

    The files went as the files their links name, wherever those were: a model folder from
    elsewhere (a download, a colleague's share) whose graph names a data file that is a link to
    ``~/.ssh/id_ed25519`` or ``/etc/shadow`` sent that file's bytes to the server. A link
    inside the folder is fine, and so is Hugging Face's cache layout, where each file of
    ``<repo>/snapshots/<revision>/`` links to ``<repo>/blobs/``: the model's own files, kept
    once per content."""
    path = folder / name
    if not path.is_symlink():
        return
    target = Path(os.path.realpath(path))
    home = Path(os.path.realpath(folder))
    roots = [home]
    if home.parent.name == "snapshots":
        roots.append(home.parent.parent / "blobs")
    if any(target.is_relative_to(root) for root in roots):
        return
    raise InvalidInputError(
        f"{path} is a link to {target}, outside the model's folder {folder}: only files in the "
        "folder are sent (a link out of it could send any file on this machine); copy the file "
        "into the folder, or link to one inside it"
    )


def _pack(folder: Path, names: list[str], rename: dict[str, str] | None = None) -> Path:
    fd, tmp = tempfile.mkstemp(prefix="ferry-upload-", suffix=".tar")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                with open(folder / name, "rb") as fh:
                    # Described from the open file, so a symlink goes as the regular file it
                    # names (a Hugging Face snapshot links every file to a blob): described
                    # from the path, it went as a link member, which the server refuses.
                    info = tar.gettarinfo(arcname=(rename or {}).get(name, name), fileobj=fh)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, fh)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)
