"""Packing an ONNX model with external data into the one upload that carries it (onnx_archive).

A model over 2 GiB is saved as ``model.onnx`` plus data files its tensors name by relative
location, side by side (Triton's and KServe's version-folder layout). The server accepts that
folder as an uncompressed tar of flat, regular files; this module writes it from a folder, or
from a ``.onnx`` file and the data files its graph names (read with ``onnx`` when it is
installed: the SDK's base install does not need it).
"""

from __future__ import annotations

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
    """The data files the graph at ``model_path`` reads; [] when it reads none, or when
    ``onnx`` is not installed to tell (the server then says what to send)."""
    try:
        import onnx
    except ImportError:
        return []
    try:
        model = onnx.load(os.fspath(model_path), load_external_data=False)
    except Exception:  # not parseable here: the server judges the bytes
        return []
    from onnx.external_data_helper import _get_all_tensors  # every tensor, subgraphs included

    found: dict[str, None] = {}
    for tensor in _get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                found.setdefault(entry.value, None)
    return list(found)


def pack_folder(folder: Path) -> Path:
    """A temporary tar of ``folder``'s regular files (it must hold model.onnx); the caller
    removes it."""
    names = sorted(
        entry.name for entry in folder.iterdir() if entry.is_file() and not entry.is_symlink()
    )
    if MODEL_FILE not in names:
        raise InvalidInputError(
            f"{folder} holds no {MODEL_FILE}: a model folder holds model.onnx and the data files "
            "its tensors name"
        )
    return _pack(folder, names)


def pack_model(model_path: Path, locations: list[str]) -> Path:
    """A temporary tar of ``model_path`` (as model.onnx) and the data files it names."""
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
    return _pack(folder, [model_path.name, *locations], rename={model_path.name: MODEL_FILE})


def _pack(folder: Path, names: list[str], rename: dict[str, str] | None = None) -> Path:
    fd, tmp = tempfile.mkstemp(prefix="ferry-upload-", suffix=".tar")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                info = tar.gettarinfo(str(folder / name), arcname=(rename or {}).get(name, name))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(folder / name, "rb") as fh:
                    tar.addfile(info, fh)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)
