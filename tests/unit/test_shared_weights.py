"""The aligned, shared copy of a large model's weights (onnxruntime.share_weights)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ferry.server.core.config import OnnxRuntimeConfig
from ferry.server.runtime import shared_weights
from ferry.server.runtime.session import OrtSession

# Small weights and a threshold of 0 in tests: what is checked is the copy, not its size.
WIDTH = 64


def _model(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, os.fspath(path))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "state"
    shared_weights.set_cache_dir(folder)
    monkeypatch.setattr(shared_weights, "MIN_SHARED_BYTES", 0)
    yield folder
    shared_weights.set_cache_dir(None)


def test_copy_is_made_once_and_reused(tmp_path: Path, cache: Path) -> None:
    model = _model(tmp_path / "repo" / "m" / "1" / "model.onnx", 0)
    first = shared_weights.shared_copy(model)
    assert first is not None and first.parent.parent == cache / "weights"
    stamp = first.stat().st_mtime_ns
    again = shared_weights.shared_copy(model)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert len(list((cache / "weights").iterdir())) == 1
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]  # version untouched


def test_aligned_offsets(tmp_path: Path, cache: Path) -> None:
    copy = shared_weights.shared_copy(_model(tmp_path / "m" / "1" / "model.onnx", 0))
    assert copy is not None
    graph = onnx.load_model(os.fspath(copy), load_external_data=False).graph
    offsets = [
        int(e.value) for t in graph.initializer for e in t.external_data if e.key == "offset"
    ]
    assert offsets and all(o % shared_weights.ALIGN == 0 for o in offsets)


def test_changed_model_gets_a_new_copy(tmp_path: Path, cache: Path) -> None:
    one = shared_weights.shared_copy(_model(tmp_path / "m" / "1" / "model.onnx", 0))
    two = shared_weights.shared_copy(_model(tmp_path / "m" / "2" / "model.onnx", 1))
    assert one is not None and two is not None and one != two


def test_a_file_replaced_in_place_gets_a_new_copy(tmp_path: Path, cache: Path) -> None:
    # Digests are remembered per file identity: a new file at the same path is hashed again.
    model = _model(tmp_path / "m" / "1" / "model.onnx", 0)
    one = shared_weights.shared_copy(model)
    os.replace(_model(tmp_path / "other" / "model.onnx", 1), model)
    two = shared_weights.shared_copy(model)
    assert one is not None and two is not None and one != two


def test_a_file_rewritten_keeping_its_size_and_time_gets_a_new_copy(
    tmp_path: Path, cache: Path
) -> None:
    """The digest was remembered per (device, inode, size, mtime): model.onnx rewritten in
    place by a retrained model of the same shape with its time kept (``cp -p`` onto it) kept
    the old digest, and a reload served the old weights' copy. Its change time is part of it."""
    model = _model(tmp_path / "m" / "1" / "model.onnx", 0)
    one = shared_weights.shared_copy(model)
    st = model.stat()
    with open(model, "r+b") as f:  # the same inode
        f.write(_model(tmp_path / "other" / "model.onnx", 1).read_bytes())
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model.stat().st_size == st.st_size
    two = shared_weights.shared_copy(model)
    assert one is not None and two is not None and one != two


def test_outputs_equal_the_embedded_models(tmp_path: Path, cache: Path) -> None:
    model = _model(tmp_path / "m" / "1" / "model.onnx", 0)
    plain = OrtSession(model, OnnxRuntimeConfig(intra_op_threads=1))
    shared = OrtSession(model, OnnxRuntimeConfig(intra_op_threads=1, share_weights=True))
    assert shared.weights_shared and not plain.weights_shared
    x = np.random.default_rng(2).standard_normal((3, WIDTH)).astype(np.float32)
    # Prepacked and plain MatMul kernels may sum in another order: equal to float precision.
    np.testing.assert_allclose(
        plain.run({"x": x})[0], shared.run({"x": x})[0], rtol=1e-6, atol=1e-6
    )


def _with_external_bias(path: Path, slot: str) -> Path:
    """The MLP plus a bias read from ``model.onnx.data`` beside it (the operator's own data
    file, where onnx.save puts it), held by a Constant node or a sparse initializer: not a
    graph initializer, yet external data all the same."""
    bias = np.arange(WIDTH, dtype=np.float32) + 100
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "model.onnx.data").write_bytes(bias.tobytes())
    tensor = TensorProto(name="b", data_type=TensorProto.FLOAT, dims=[WIDTH])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "model.onnx.data"), ("offset", "0"), ("length", "256")):
        tensor.external_data.add(key=key, value=value)
    model = onnx.load_model(os.fspath(_model(path, 0)))
    model.graph.node[0].output[0] = "h"
    model.graph.node.append(helper.make_node("Add", ["h", "b"], ["y"]))
    if slot == "Constant":
        model.graph.node.insert(0, helper.make_node("Constant", [], ["b"], value=tensor))
    else:
        indices = numpy_helper.from_array(np.arange(WIDTH, dtype=np.int64), "i")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(tensor, indices, [WIDTH]))
    onnx.save_model(model, os.fspath(path))
    return path


@pytest.mark.parametrize("slot", ["Constant", "sparse initializer"])
def test_a_model_with_external_data_anywhere_is_opened_from_its_own_folder(
    tmp_path: Path, cache: Path, slot: str
) -> None:
    """The copy is opened from the cache: a tensor outside the graph's initializers naming
    ``model.onnx.data`` resolved there and read the copy's own data file (the MatMul weights)
    as the bias. Such a model is opened as it is, from its version folder."""
    model = _with_external_bias(tmp_path / "m" / "1" / "model.onnx", slot)
    assert shared_weights.shared_copy(model) is None
    shared = OrtSession(model, OnnxRuntimeConfig(intra_op_threads=1, share_weights=True))
    assert not shared.weights_shared
    y = shared.run({"x": np.zeros((1, WIDTH), np.float32)})[0]
    np.testing.assert_array_equal(y[0], np.arange(WIDTH, dtype=np.float32) + 100)


def test_unwritable_cache_falls_back_with_a_log_line(
    tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the folder should be")  # unwritable for any user, root too
    model = _model(tmp_path / "m" / "1" / "model.onnx", 0)
    with caplog.at_level(logging.WARNING, logger=shared_weights.__name__):
        session = OrtSession(model, OnnxRuntimeConfig(intra_op_threads=1, share_weights=True))
    assert not session.weights_shared
    assert "weights not shared" in caplog.text
    assert session.run({"x": np.ones((1, WIDTH), np.float32)})[0].shape == (1, WIDTH)


def test_small_model_is_opened_as_is(tmp_path: Path) -> None:
    shared_weights.set_cache_dir(tmp_path / "state")
    try:
        assert shared_weights.shared_copy(_model(tmp_path / "m" / "1" / "model.onnx", 0)) is None
    finally:
        shared_weights.set_cache_dir(None)


def test_prune_removes_copies_no_loaded_version_uses_once_unused_for_a_while(
    tmp_path: Path, cache: Path
) -> None:
    kept_model = _model(tmp_path / "repo" / "m" / "1" / "model.onnx", 0)
    gone_model = _model(tmp_path / "repo" / "m" / "2" / "model.onnx", 1)
    kept = shared_weights.shared_copy(kept_model)
    gone = shared_weights.shared_copy(gone_model)
    assert kept is not None and gone is not None
    writing = cache / "weights" / ".tmp-being-written"
    writing.mkdir()
    abandoned = cache / "weights" / ".tmp-abandoned"
    abandoned.mkdir()
    day_ago = time.time() - shared_weights.ABANDONED_AFTER - 60
    os.utime(abandoned, (day_ago, day_ago))
    # Just used: a version unloaded and loaded again soon (or a worker opening it) keeps it.
    assert shared_weights.prune([kept_model]) == [abandoned.name]
    removed = shared_weights.prune([kept_model], unused_for=0)
    assert removed == [gone.parent.name]
    assert kept.is_file() and not gone.parent.exists() and writing.is_dir()
    # Opened again after its copy went: made anew, never a failed load.
    again = shared_weights.shared_copy(gone_model)
    assert again is not None and again.is_file()


def test_prune_without_a_cache_does_nothing(tmp_path: Path) -> None:
    shared_weights.set_cache_dir(None)
    assert shared_weights.prune([tmp_path / "missing.onnx"], unused_for=0) == []
    shared_weights.set_cache_dir(tmp_path / "never-made")
    try:
        assert shared_weights.prune([], unused_for=0) == []
    finally:
        shared_weights.set_cache_dir(None)


def test_the_server_removes_a_copy_when_its_version_is_unloaded(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first process prunes after every repository change: an unloaded model's copy goes,
    a loaded one's stays (here with no quiet period, so the test need not wait one out)."""
    from helpers import wait_for, write_config
    from serverutil import ServerThread

    from ferry.client import InferenceClient, RepositoryClient

    root = tmp_path / "repo"
    for name, seed in (("a", 0), ("b", 1)):
        _model(root / name / "1" / "model.onnx", seed)
        write_config(root, name, {"onnxruntime": {"share_weights": True}})
    with ServerThread(root, state_dir=str(cache)) as srv:
        copies = cache / "weights"
        assert len(list(copies.iterdir())) == 2  # both loaded, both shared
        monkeypatch.setattr(shared_weights, "UNUSED_FOR", 0.0)  # after the loads it raced
        with RepositoryClient(srv.management_target) as repo:
            repo.unload_model("b")
        wait_for(lambda: len(list(copies.iterdir())) == 1, "the unloaded model's copy to go")
        (left,) = copies.iterdir()
        assert (left / "model.onnx").is_file()
        x = np.ones((2, WIDTH), np.float32)
        with InferenceClient(srv.target) as client:
            assert client.infer("a", {"x": x})["y"].shape == (2, WIDTH)


def test_a_models_own_ort_config_never_sets_its_session_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ORT_LOAD_CONFIG_FROM_MODEL=1 in the server's environment, onnxruntime took session
    options from the model's metadata ("ort_config"): an uploaded model chose its own threads
    (or profiling, which writes files). The server's options stand."""
    import json

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    config = {"session_options": {"intra_op_num_threads": 3, "inter_op_num_threads": 5}}
    helper.set_model_props(model, {"ort_config": json.dumps(config)})
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    monkeypatch.setenv("ORT_LOAD_CONFIG_FROM_MODEL", "1")
    options = OrtSession(path, OnnxRuntimeConfig(intra_op_threads=1)).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) != (3, 5)


def test_prune_keeps_the_copy_a_loaded_version_maps_its_external_data_from(
    tmp_path: Path, cache: Path
) -> None:
    """A version with external data maps a copy in the cache (runtime.external_files). Pruned
    10 minutes after its opening though still loaded, a worker started again later made a
    copy of its own, holding the weights apart from the others (and the disk twice)."""
    from ferry.server.runtime import external_files

    loaded, other = tmp_path / "m" / "1", tmp_path / "m" / "2"
    for folder, seed in ((loaded, 0), (other, 1)):
        folder.mkdir(parents=True)
        table = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Gather", ["table", "ids"], ["rows"])],
            "g",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
            [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 64])],
            [numpy_helper.from_array(table, "table")],
        )
        onnx.save_model(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
            str(folder / "model.onnx"),
            save_as_external_data=True,
            location="model.onnx.data",
            size_threshold=0,
        )
        OrtSession(folder / "model.onnx", OnnxRuntimeConfig(intra_op_threads=1)).release()
    copies = sorted(p.name for p in (cache / "weights").iterdir())
    assert len(copies) == 2
    keep = external_files.copies_of([loaded / "model.onnx"])
    removed = shared_weights.prune([], unused_for=0, keep=keep)
    assert [sorted([*keep, *removed])] == [copies] and len(removed) == 1
    assert (cache / "weights" / next(iter(keep)) / "model.onnx.data").is_file()
