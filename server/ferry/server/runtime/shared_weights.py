"""One memory-mapped copy of a large model's weights for every worker of a server.

``ferry serve --workers N`` opens each model in N processes. With the weights embedded in
model.onnx every process holds its own copy (onnxruntime parses them into its own buffers).
onnxruntime memory-maps external data whose offset is a multiple of the allocation
granularity, and the mapped pages of one file are shared between processes; its MatMul/Gemm
weight prepacking copies them into per-session buffers again, so sharing needs
``session.disable_prepacking`` too (bench/shared_weights.py: three sessions of a 128 MiB MLP
hold 493 MiB PSS with aligned external data alone, 237 MiB with prepacking off as well).

A published version folder is immutable, so the aligned copy goes to a cache outside the
repository, named by a hash of model.onnx: workers reuse it, a changed model gets a new one.
Any failure here falls back to the normal load.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ferry.server.onnx_walk import external_tensors

log = logging.getLogger(__name__)

# Offsets aligned to 64 KiB: Windows' allocation granularity, a multiple of any page size.
ALIGN = 64 * 1024
# Models whose embedded initializers total less are opened as they are (little to share).
MIN_SHARED_BYTES = 16 * 2**20
DATA_NAME = "model.onnx.data"

# A copy that no loaded version uses is removed once it has gone unused this long (seconds), so
# that a version unloaded and loaded again soon, or one a worker is opening right now, keeps it.
UNUSED_FOR = 600.0
# A partial copy (``.tmp-*``) may be a large model being written right now: it only goes when
# its writer must be long gone.
ABANDONED_AFTER = 24 * 3600.0

_CACHE: dict[str, Path | None] = {"dir": None}
# Digests of models found not worth a copy, so that they are parsed once, not per opening.
_UNSHAREABLE: set[str] = set()


def set_cache_dir(folder: Path | None) -> None:
    """Where the server keeps aligned copies (its state folder, shared by its workers)."""
    _CACHE["dir"] = folder


def cache_dir() -> Path | None:
    """The folder set by ``set_cache_dir`` (None: no copies are made)."""
    return _CACHE["dir"]


@functools.lru_cache(maxsize=256)
def _digest(path: str, _dev: int, _ino: int, _size: int, _mtime_ns: int, _ctime_ns: int) -> str:
    """The SHA-256 of ``path``, hashed once per file: one load opens a model several times
    (the auto-threads probe, each planned batch size, each device), and a published version
    never changes in place, so its identity (device, inode, size, mtime, change time) stands
    for its bytes. The change time, which ``utime`` cannot set back: a file rewritten in place
    keeping its size and mtime (``cp -p`` onto it) kept the old digest, and its reload served
    the old weights' copy."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest_of(path: Path, st: os.stat_result) -> str:
    """The name of ``path``'s copy in the cache: what shared_copy makes and prune keeps."""
    return _digest(
        os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
    )


def write_aligned(model: Any, folder: Path) -> None:
    """``model`` with every initializer of 1 KiB and more moved to one aligned data file."""
    import onnx

    offset = 0
    with open(folder / DATA_NAME, "wb") as data:
        for tensor in model.graph.initializer:
            raw = tensor.raw_data
            if len(raw) < 1024:
                continue
            pad = -offset % ALIGN
            data.write(b"\0" * pad)
            data.write(raw)
            offset += pad
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (
                ("location", DATA_NAME),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    onnx.save_model(model, os.fspath(folder / "model.onnx"))


def shared_copy(path: Path) -> Path | None:
    """The cached aligned copy of ``path`` (made if missing), or None: no cache folder, a
    model with external data anywhere (its version folder is where it resolves) or small
    weights, or a cache that cannot be written."""
    root = _CACHE["dir"]
    if root is None:
        return None
    try:
        st = path.stat()
        if st.st_size < MIN_SHARED_BYTES:
            return None  # embedded weights cannot outweigh their file
        # A hit opens the copy without parsing the model here: parsing holds every weight in
        # this process' heap, the copy the cache is there to avoid (measured: +25 MiB each).
        digest = _digest_of(path, st)
        target = root / "weights" / digest
        if (target / "model.onnx").is_file():
            os.utime(target)  # in use: prune() leaves a copy alone for UNUSED_FOR after this
            return target / "model.onnx"
        if digest in _UNSHAREABLE:
            return None  # parsed once already: the next opening of this load skips it
        import onnx

        model = onnx.load_model(os.fspath(path), load_external_data=False)
        inits = model.graph.initializer
        # Any tensor naming external data, not only a graph initializer: the copy is opened from
        # the cache, so a Constant's (a subgraph's, a sparse tensor's) "model.onnx.data" would
        # resolve there and read the copy's own data file, serving other weights as its values.
        if next(external_tensors(model), None) is not None or (
            sum(len(t.raw_data) for t in inits) < MIN_SHARED_BYTES
        ):
            # Already external (its own files, opened as they are), or small raw weights.
            _UNSHAREABLE.add(digest)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            write_aligned(model, tmp)
            os.rename(tmp, target)  # a racing worker's rename wins: both files are equal
        except OSError:
            if not (target / "model.onnx").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: weights shared from %s", path, target)
        return target / "model.onnx"
    except Exception as exc:  # sharing is an optimisation: it never fails the load
        log.warning("%s: weights not shared between workers, loading as is (%s)", path, exc)
        return None


def has_copies() -> bool:
    """Whether the cache holds anything prune() could remove (cheap: one stat)."""
    root = _CACHE["dir"]
    return root is not None and (root / "weights").is_dir()


def prune(
    loaded_models: Iterable[Path], *, unused_for: float | None = None, keep: Iterable[str] = ()
) -> list[str]:
    """Remove the cached copies (and abandoned partial ones) that none of ``loaded_models``
    uses, not named in ``keep`` (external data's copies that loaded versions map:
    runtime.external_files), and that nobody opened for ``unused_for`` seconds
    (``UNUSED_FOR``); returns what was removed.

    Run by the first process, whose loaded set the workers follow. A worker that still maps a
    removed copy keeps its pages (an unlinked file stays mapped), and one that opens it again
    finds it missing and makes it anew, so a removal never fails a load."""
    root = _CACHE["dir"]
    if root is None or not has_copies():
        return []
    folder = root / "weights"
    kept: set[str] = set(keep)
    for path in loaded_models:
        try:
            st = path.stat()
            if st.st_size >= MIN_SHARED_BYTES:
                kept.add(_digest_of(path, st))
        except OSError:
            continue  # gone meanwhile: nothing of it to keep
    quiet = UNUSED_FOR if unused_for is None else unused_for
    now = time.time()
    removed = []
    for entry in folder.iterdir():
        if entry.name in kept:
            continue
        try:
            partial = entry.name.startswith(".tmp-")
            if now - entry.stat().st_mtime < (ABANDONED_AFTER if partial else quiet):
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed
