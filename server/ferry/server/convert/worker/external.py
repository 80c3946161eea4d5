"""Graphs whose weights live beside them: writing, copying and publishing external data.

An ONNX file is one protobuf message, and protobuf cannot serialize more than 2 GiB; a bigger
model keeps its tensors in a data file next to the graph, found by a relative location. Each
stage that writes a variant writes ``<variant>.onnx`` plus one ``<variant>.onnx.data`` when the
job's variants are external (``Pipeline.external``); publishing renames the pair to
``model.onnx`` + ``model.onnx.data``, rewriting the locations in the graph, so a version folder
is self-contained and reads nothing outside itself.

Memory: only the graph is parsed wherever the data is not needed (``load_external_data=False``:
the tensors keep their references), so moving or inspecting a 10 GiB model costs its graph.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ferry.server.convert import onnx_safety
from ferry.server.convert.external_data import save
from ferry.server.core.repository import MODEL_DATA_FILE, MODEL_FILE


def graph_only(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def locations(model: onnx.ModelProto) -> list[str]:
    """The data files ``model``'s tensors read, in order of first use."""
    seen: dict[str, None] = {}
    for ref in onnx_safety.external_refs(model):
        seen.setdefault(ref.location, None)
    return list(seen)


def files(path: Path) -> list[Path]:
    """The model file and the data files it reads (what its size and its copy are made of)."""
    return [path, *(path.parent / name for name in locations(graph_only(path)))]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in files(path))


def copy(source: Path, target: Path, external: bool) -> None:
    """``target`` becomes a copy of ``source`` and its data, its data in one file of its own
    (a source may read several); a self-contained source is copied as it is."""
    model = graph_only(source)
    if not locations(model):
        shutil.copyfile(source, target)
        return
    onnx.load_external_data_for_model(model, str(source.parent))
    save(model, target, external=True)


def publish(source: Path, folder: Path, edit: Callable[[onnx.ModelProto], bool]) -> None:
    """Move variant ``source`` (and its data file) into ``folder`` as ``model.onnx`` (and
    ``model.onnx.data``), after ``edit`` (which returns whether it changed the graph:
    ``graph.prepare_model``). Only the graph is rewritten: the data file is renamed, never
    read (unless the variant reads several, which one copy gathers into one)."""
    model = graph_only(source)
    changed = edit(model)
    names = locations(model)
    if len(names) > 1:  # not written by this package: one copy makes it one file
        onnx.load_external_data_for_model(model, str(source.parent))
        save(model, folder / MODEL_FILE, external=True)  # model.onnx.data: MODEL_DATA_FILE
        if source != folder / MODEL_FILE:
            source.unlink()
        return
    if names:
        os.replace(source.parent / names[0], folder / MODEL_DATA_FILE)
        _relocate(model, MODEL_DATA_FILE)
    if changed or names:
        onnx.save_model(model, str(folder / MODEL_FILE))
        if source != folder / MODEL_FILE:
            source.unlink()
    else:
        os.replace(source, folder / MODEL_FILE)


def _relocate(model: onnx.ModelProto, location: str) -> None:
    for step in onnx_safety.external_tensors(model):
        for entry in step.message.external_data:
            if entry.key == "location":
                entry.value = location


def weight_sparsity(path: Path) -> float:
    """Fraction of exact zeros among weight initializers (2-D and up), one tensor at a time:
    an external tensor is read through a memory map of its data file, never the whole model."""
    model = graph_only(path)
    zeros = total = 0
    for init in model.graph.initializer:
        if len(init.dims) < 2:
            continue
        array = _array(init, path.parent)
        zeros += int(array.size - np.count_nonzero(array))
        total += int(array.size)
        del array
    return zeros / total if total else 0.0


def _array(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    entries = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(
        folder / entries["location"],
        dtype=dtype,
        mode="r",
        offset=int(entries.get("offset", "0") or 0),
        shape=(count,),
    )
