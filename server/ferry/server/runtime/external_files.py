"""A version's external data never mapped from the version folder: a copy of Ferry's own, or
bytes read at load.

onnxruntime memory-maps a model's external data files (``model.onnx.data``) and serves the
initializers from the mapped pages. A file rewritten in place while its version is served (``cp
new.data model.onnx.data`` truncates it first, and docs/configuration.md promises that such a
rewrite reloads the version) then leaves those pages past the file's end: the next inference
that read them was SIGBUS, and the whole server died, every model with it.

So the session opens a copy of ``model.onnx`` and its data files in the server's weights cache
(``snapshot``), which nothing rewrites: mapped, its pages are held once for every session and
worker of the version. Without one (no cache folder, a full disk), the files are read here and
given through ``add_external_initializers_from_files_in_memory`` (``read_into``), which
onnxruntime copies from while the session is built: each session then holds its own copy, three
times the files at the load's peak, and onnxruntime takes only the main graph's initializers
from these buffers (a subgraph's or a Constant's tensor is still read from its file).

Only files inside the version's folder are copied or read, as onnxruntime's own rule for
external data (no ``..``, no absolute path, no link that leaves the folder): a model naming one
outside is opened as it is, for onnxruntime to refuse.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ferry.server.onnx_walk import external_tensors
from ferry.server.runtime import shared_weights

log = logging.getLogger("ferry.runtime")


# Files of a version folder that are never a model's data: a folder holding nothing else has
# none to read (a graph naming a file elsewhere is onnxruntime's to refuse), and its model.onnx,
# which may hold gigabytes of embedded weights, is not parsed here a second time.
NOT_DATA = frozenset({"model.onnx", "config.toml", "config.json", "report.json"})

# The copy each model path was last opened from here (resolved path -> its folder's name in
# the cache): the first process's prune keeps those of its loaded versions, so a worker started
# again later maps the same copy as the others, not a new one of its own.
_OPENED: dict[str, str] = {}


def copies_of(model_paths: list[Path]) -> set[str]:
    """The cache folders the versions at ``model_paths`` were last opened from here."""
    names = set()
    for path in model_paths:
        try:
            name = _OPENED.get(os.fspath(path.resolve()))
        except OSError:
            continue
        if name is not None:
            names.add(name)
    return names


def _data_files(model_path: Path) -> dict[str, Path]:
    """The data files the model at ``model_path`` reads, by location; {} when it reads none,
    when one lies outside its folder, or when the graph does not parse (each left to
    onnxruntime, which says what is wrong)."""
    try:
        if all(entry.name in NOT_DATA for entry in model_path.parent.iterdir()):
            return {}
        import onnx

        model = onnx.load(os.fspath(model_path), load_external_data=False)
    except Exception:  # DecodeError, OSError: onnxruntime's load names it
        return {}
    locations: dict[str, None] = {}
    for step in external_tensors(model):
        for entry in step.message.external_data:
            if entry.key == "location":
                locations.setdefault(entry.value, None)
    folder = model_path.parent.resolve()
    files = {}
    for location in locations:
        path = (folder / location).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            return {}
        files[location] = path
    return files


def _identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def snapshot(model_path: Path) -> Path | None:
    """An immutable copy of the model at ``model_path`` and its data files, in the server's
    weights cache (the workers' shared one), for onnxruntime to map; None when it reads no
    data file, or the copy cannot be made (``read_into`` then).

    Read into memory, every session held its own copy of the weights: each worker's, each
    planned batch size's, each device's, and three times the files at the load's peak (a
    256 MiB embedding table: 877 MiB PSS for three workers, 96 MiB mapped). Mapped from the
    version folder, a ``cp`` over a data file crashed the server (SIGBUS). A copy of Ferry's
    own is never rewritten: it is named by the files' identity (device, inode, size, times,
    as the repository watches them), so a rewrite gets a copy of its own, and the workers,
    seeing the same files, map the same one."""
    root = shared_weights.cache_dir()
    if root is None:
        return None
    files = _data_files(model_path)
    if not files:
        return None
    try:
        sources = {"model.onnx": model_path.resolve(), **files}
        before = {name: _identity(path) for name, path in sources.items()}
        digest = hashlib.sha256(repr(sorted(before.items())).encode()).hexdigest()
        target = root / "weights" / f"external-{digest}"
        _OPENED[os.fspath(sources["model.onnx"])] = target.name
        if (target / "model.onnx").is_file():
            os.utime(target)  # in use: shared_weights.prune leaves it for UNUSED_FOR
            return target / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            for name, path in sources.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / name)
            if {name: _identity(path) for name, path in sources.items()} != before:
                return None  # changed while copied: the reload it triggers copies it again
            try:
                os.rename(tmp, target)
            except OSError:  # a worker's rename won: the same files, copied alike
                if not (target / "model.onnx").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a full or read-only cache: the weights are read into memory
        log.warning("%s: data files read into memory, not mapped from a copy (%s)", model_path, exc)
        return None
    log.info("%s: data files mapped from their copy %s", model_path, target)
    return target / "model.onnx"


def read_into(options: Any, model_path: Path) -> list[bytes]:
    """Give ``options`` (an ``ort.SessionOptions``) the contents of the data files the model at
    ``model_path`` reads; returns the buffers, which must live until its sessions are built.
    [] when it reads none, when one lies outside its folder, or when the graph does not parse
    (each left to onnxruntime, which says what is wrong)."""
    located = _data_files(model_path)
    if not located:
        return []
    locations, files = list(located), list(located.values())
    try:
        buffers = [path.read_bytes() for path in files]
    except OSError:  # removed or unreadable meanwhile: onnxruntime's load says so
        return []
    options.add_external_initializers_from_files_in_memory(
        list(locations), buffers, [len(b) for b in buffers]
    )
    log.debug("%s: %d external data file(s) read into memory", model_path, len(buffers))
    return buffers
