"""Request inputs for load tests and ``ferry infer``: generated from a model's metadata or read
from .npy, .npz and JSON files.

JSON carries no dtype, so JSON values take the dtype the model declares for that input; a .npy or
.npz keeps its own dtype, and a mismatch is left for the server to report, since silently casting
a float64 file would hide a bug in whatever wrote it.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from ferry.client._requests import MAX_TENSOR_BYTES, as_array
from ferry.client._types import ModelMetadata, TensorInfo
from ferry.codec import CodecError, datatype_from_name, numpy_dtype
from ferry.codec._tensor import nesting_mismatch

# A JSON input file's size: parsed, each number becomes a Python object some 16 times its text
# (a file of "0," many times its size in memory, before anything was checked). Larger inputs are
# arrays: .npy/.npz are read as they are, up to what one request carries.
MAX_JSON_INPUT_BYTES = 16 << 20


class InputError(ValueError):
    """Inputs could not be built or read; the message says which input and what to fix."""


def _dtype(info: TensorInfo) -> np.dtype[Any]:
    try:
        return numpy_dtype(datatype_from_name(info.datatype))
    except CodecError as exc:
        raise InputError(f"input {info.name!r}: {exc}") from None


def input_shape(
    info: TensorInfo, *, batched: bool, batch_size: int, override: Sequence[int] | None
) -> tuple[int, ...]:
    """The concrete shape to generate for ``info``: an override wins; otherwise the batch dim
    (the first, when the model batches) becomes ``batch_size`` and every other dim must be fixed."""
    if override is not None:
        shape = tuple(int(d) for d in override)
        if len(shape) != len(info.shape):
            raise InputError(
                f"input {info.name!r} has {len(info.shape)} dims {list(info.shape)}, "
                f"the override gives {len(shape)}: {list(shape)}"
            )
        if any(d < 0 for d in shape):
            raise InputError(f"input {info.name!r}: shape {list(shape)} has a negative dimension")
        return shape
    dims = list(info.shape)
    if batched and dims:
        dims[0] = batch_size
    elif batch_size != 1:
        raise InputError(
            f"model input {info.name!r} has no batch dimension: use batch size 1, or give "
            f"its full shape with --shape {info.name}=..."
        )
    if any(d < 0 for d in dims):
        raise InputError(
            f"input {info.name!r} has dynamic dimensions {list(info.shape)}: give a concrete shape "
            f"with --shape {info.name}={','.join('N' if d < 0 else str(d) for d in info.shape)}"
        )
    return tuple(dims)


def _check_size(info: TensorInfo, shape: Sequence[int]) -> None:
    """Refuse a shape no request can carry before allocating it: ``--shape x=99999999,99999999``
    raised numpy's MemoryError (petabytes) with a traceback."""
    size = math.prod(shape) * max(_element_bytes(info), 1)
    if size > MAX_TENSOR_BYTES:
        raise InputError(
            f"input {info.name!r}: shape {list(shape)} is {size:,} bytes; one gRPC message "
            f"carries at most {MAX_TENSOR_BYTES:,}: give a smaller shape"
        )


def _element_bytes(info: TensorInfo) -> int:
    return 8 if info.datatype == "BYTES" else _dtype(info).itemsize


def generate_inputs(
    meta: ModelMetadata,
    *,
    batch_size: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs that the model accepts: normal floats, small non-negative integers (valid
    as indices and lengths), random booleans and short byte strings."""
    shapes = shapes or {}
    unknown = set(shapes) - {t.name for t in meta.inputs}
    if unknown:
        raise InputError(
            f"--shape names {sorted(unknown)}, but the model's inputs are "
            f"{[t.name for t in meta.inputs]}"
        )
    rng = np.random.default_rng(seed)
    batched = meta.batching.max_batch_size > 0
    out: dict[str, np.ndarray] = {}
    for info in meta.inputs:
        shape = input_shape(
            info, batched=batched, batch_size=batch_size, override=shapes.get(info.name)
        )
        _check_size(info, shape)
        if info.datatype == "BYTES":
            arr = np.empty(shape, dtype=object)
            arr.fill(b"ferry")
        elif info.datatype == "BOOL":
            arr = rng.random(shape) < 0.5
        elif info.datatype.startswith(("FP", "BF")):
            arr = rng.standard_normal(shape).astype(_dtype(info))
        else:
            arr = rng.integers(0, 8, size=shape).astype(_dtype(info))
        out[info.name] = arr
    return out


def _json_inputs(path: Path, meta: ModelMetadata | None) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JSON_INPUT_BYTES + 1)
        if len(raw) > MAX_JSON_INPUT_BYTES:
            raise InputError(
                f"{path}: a JSON input file may hold at most {MAX_JSON_INPUT_BYTES >> 20} MiB; "
                "save larger inputs as .npy or .npz (np.save / np.savez)"
            )
        doc = json.loads(raw.decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON: {exc}") from None
    except RecursionError:  # arrays nested deeper than Python's parser goes
        raise InputError(f"{path}: not readable JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InputError(f'{path}: expected an object {{"input name": values, ...}}')
    declared = {t.name: t for t in meta.inputs} if meta is not None else {}
    out: dict[str, np.ndarray] = {}
    for name, value in doc.items():
        data, datatype, shape = value, None, None
        if isinstance(value, dict):  # {"data": [...], "datatype": "FP32", "shape": [..]}
            data = value.get("data")
            datatype, shape = value.get("datatype"), value.get("shape")
        info = declared.get(name)
        if datatype is None and info is not None:
            datatype = info.datatype
        try:
            dtype = numpy_dtype(datatype_from_name(datatype)) if datatype else None
            # The SDK's rules for Python values: cast only where every number fits, never a
            # float to an integer (a plain cast sent 1.7 as 1, 1e300 as inf, 0.5 as true).
            arr = as_array(data, name, dtype)
            if shape is not None:
                problem = nesting_mismatch(arr.shape, _json_shape(shape, arr.size), "")
                if problem:
                    raise ValueError(problem)
                arr = arr.reshape(shape)
        except (CodecError, TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"{path}: input {name!r}: {exc}") from None
        out[name] = arr
    return out


def _json_shape(shape: object, size: int) -> list[int]:
    """A JSON input's ``shape``: every dimension given, as the protocol's JSON requires. numpy
    took a negative one as "work it out", so ``[1, -3]`` was sent as ``[1, 3]``."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape must be a list of dimensions >= 0, got {shape!r}"[:200])
    if math.prod(shape) != size:
        raise ValueError(f"shape {shape} holds {math.prod(shape)} elements, but data has {size}")
    return shape


def _single_input_name(meta: ModelMetadata | None, path: Path) -> str:
    if meta is not None and len(meta.inputs) == 1:
        return meta.inputs[0].name
    names = [t.name for t in meta.inputs] if meta is not None else []
    raise InputError(
        f"{path}: a .npy holds one array; name the input it feeds with NAME={path} "
        f"(the model's inputs: {names})"
    )


def _read_array(f: IO[bytes], size: int, where: str, budget: int) -> np.ndarray:
    """One .npy array from ``f`` (``size`` bytes long), its header checked before numpy reads
    it: an empty file raised EOFError, and a header that declares 10**11 elements had numpy
    allocate them (MemoryError, or the memory) before finding 16 bytes of data."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise InputError(f"{where}: .npy format version {version} is not supported")
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{where}: not a .npy array ({exc}); write it with np.save") from None
    if dtype.hasobject:
        raise InputError(
            f"{where}: holds Python objects, which are never unpickled here; save numbers, "
            "or str/bytes as a fixed-width array"
        )
    needed = math.prod(shape) * dtype.itemsize
    if needed > budget:
        raise InputError(
            f"{where}: its header declares shape {list(shape)} of {dtype}, {needed:,} bytes: "
            f"more than one request carries ({MAX_TENSOR_BYTES:,} bytes in all)"
        )
    left = size - f.tell()
    if left < needed:
        raise InputError(
            f"{where}: its header declares shape {list(shape)} of {dtype}, {needed:,} bytes, "
            f"but {left:,} follow: the file is truncated"
        )
    f.seek(0)
    array: np.ndarray = npy_format.read_array(f, allow_pickle=False)
    return array


def read_npy(path: Path, budget: int = MAX_TENSOR_BYTES) -> np.ndarray:
    """The array of a .npy file, refused with InputError when it is not one or cannot fit a
    request; never unpickled."""
    with path.open("rb") as f:
        return _read_array(f, path.stat().st_size, str(path), budget)


def read_npz(path: Path, budget: int = MAX_TENSOR_BYTES) -> dict[str, np.ndarray]:
    """The arrays of a .npz file by name, as ``np.load`` names them, each checked as a .npy
    and all together within ``budget`` bytes (a member that was not an array came back from
    np.load as raw bytes, and was sent as a BYTES tensor)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                array = _read_array(member, info.file_size, f"{path}: {info.filename}", budget)
            budget -= array.nbytes
            out[info.filename.removesuffix(".npy")] = array
    return out


def load_inputs(specs: Sequence[str], meta: ModelMetadata | None = None) -> dict[str, np.ndarray]:
    """Read inputs from ``specs``: ``FILE.npz`` (one array per input, by name), ``FILE.json``,
    ``FILE.npy`` (a single-input model) or ``NAME=FILE.npy``. Later specs override earlier ones."""
    out: dict[str, np.ndarray] = {}
    budget = MAX_TENSOR_BYTES  # what the arrays read so far leave of one request
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = "", spec
        path = Path(file)
        if not path.is_file():
            # A device or a pipe (/dev/zero, <(...)) was said not to exist.
            what = (
                "is a folder, not a file"
                if path.is_dir()
                else "is not a regular file"
                if path.exists()
                else "does not exist"
            )
            raise InputError(f"input file {str(path)!r} {what}")
        suffix = path.suffix.lower()
        try:
            if suffix == ".npz":
                if name:
                    raise InputError(f"{spec}: a .npz names its arrays itself; drop the NAME=")
                out.update(read_npz(path, budget))
            elif suffix == ".npy":
                out[name or _single_input_name(meta, path)] = read_npy(path, budget)
            elif suffix == ".json":
                if name:
                    raise InputError(f"{spec}: a JSON file names its inputs itself; drop NAME=")
                out.update(_json_inputs(path, meta))
            else:
                raise InputError(f"{path}: unsupported input file type; use .npy, .npz or .json")
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{path}: cannot read: {exc}") from None
        budget = MAX_TENSOR_BYTES - sum(a.nbytes for a in out.values())
    return out
