"""Models over 2 GiB: model.onnx with its external data, uploaded as one archive, converted in
every mode, published as model.onnx + model.onnx.data and served.

The code path does not depend on the size, so the models here are small MLPs saved with external
data (a real server, real conversion children, real onnxruntime); the 2 GiB limit itself is
reached by lowering the job's threshold (``external_data_threshold_bytes``), which makes a
self-contained source publish with external data exactly as a 2.5 GiB one would.
"""

from __future__ import annotations

import itertools
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from serverutil import ServerThread

from ferry.client import (
    ConversionClient,
    InferenceClient,
    InvalidInputError,
    Quantization,
    Validation,
)

pytestmark = pytest.mark.timeout(600)
SIZES = (16, 64, 8)


def mlp(seed: int = 0) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """x -> relu(x W1 + b1) W2 + b2, batch dim dynamic; the weights, for numpy's answer."""
    rng = np.random.default_rng(seed)
    arrays, nodes, inits = [], [], []
    current = "input"
    for i, (n, m) in enumerate(itertools.pairwise(SIZES)):
        w = (rng.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32)
        b = (rng.standard_normal(m) * 0.1).astype(np.float32)
        arrays += [w, b]
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        last = i == len(SIZES) - 2
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["output" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", SIZES[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", SIZES[-1]])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), arrays


def expected(arrays: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    w0, b0, w1, b1 = arrays
    return np.maximum(x @ w0 + b0, 0) @ w1 + b1


def save_external(model: onnx.ModelProto, folder: Path, *, one_file: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="weights.bin" if one_file else None,
        size_threshold=0,
    )
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerThread, ConversionClient]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    with (
        ServerThread(repo, external_data_threshold_bytes=4096) as srv,
        ConversionClient(srv.management_target, timeout=300) as conv,
    ):
        yield srv, conv


def served(srv: ServerThread, model: str, x: np.ndarray, version: int) -> np.ndarray:
    with InferenceClient(srv.target, timeout=60) as client:
        return np.asarray(client.infer(model, {"input": x}, version=version)["output"])


def test_an_archive_converts_in_every_mode_publishes_model_and_data_and_serves(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    srv, conv = server
    model, arrays = mlp()
    save_external(model, tmp_path / "src", one_file=False)  # one file per tensor, as onnx can
    up = conv.upload("big", tmp_path / "src")  # a folder goes as one archive
    assert up.format == "onnx_archive"
    uploads = srv.app.conversion.state_dir.resolve() / "uploads"  # type: ignore[union-attr]
    assert sorted(p.name for p in (uploads / up.upload_id).iterdir()) == sorted(
        ["model.onnx", "w0", "b0", "w1", "b1"]
    )
    x = np.random.default_rng(1).standard_normal((5, SIZES[0])).astype(np.float32)
    calibration = {"input": np.random.default_rng(2).standard_normal((32, SIZES[0]), np.float32)}
    modes = {
        "none": Quantization("none", keep_slower=True),
        "fp16": Quantization("fp16", keep_slower=True),
        "dynamic_int8": Quantization("dynamic_int8", keep_slower=True),
        "static_int8": Quantization(
            "static_int8", calibration_inputs=calibration, keep_slower=True
        ),
    }
    jobs = {
        name: conv.convert(
            up,
            quantization=q,
            benchmark="quick",
            validation=Validation(keep_failed=True),
        )
        for name, q in modes.items()
    }
    repo = srv.settings.repository
    for name, job in jobs.items():
        job.wait(progress=False)
        assert job.succeeded, (name, job.error_message)
        folder = repo / "big" / str(job.version)
        # A dynamic int8 version states its batch (its shared per-batch scale would read as
        # rows mixing to the load-time probe): config.json beside the model.
        stated = ["config.json"] if name == "dynamic_int8" else []
        assert sorted(p.name for p in folder.iterdir()) == [
            *stated,
            "model.onnx",
            "model.onnx.data",
            "report.json",
        ], name
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        locations = {
            e.value
            for init in graph.graph.initializer
            for e in init.external_data
            if e.key == "location"
        }
        assert locations == {"model.onnx.data"}, name
        assert job.report is not None
        assert job.report.published == ("fp32" if name == "none" else name)
        got = served(srv, "big", x, job.version or 0)
        tolerance = 1e-4 if name == "none" else 0.1
        np.testing.assert_allclose(got, expected(arrays, x), atol=tolerance, rtol=tolerance)
    assert "model.onnx.data" in (jobs["none"].report_json or "")


def test_an_onnx_file_with_data_beside_it_goes_as_an_archive(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    """``upload(name, path/to/model.onnx)``: the SDK finds the data files the graph names."""
    srv, conv = server
    model, arrays = mlp(seed=3)
    path = save_external(model, tmp_path / "src")
    (tmp_path / "src" / "unrelated.txt").write_text("not sent")
    up = conv.upload("big", path)
    assert up.format == "onnx_archive"
    uploads = srv.app.conversion.state_dir.resolve() / "uploads"  # type: ignore[union-attr]
    assert sorted(p.name for p in (uploads / up.upload_id).iterdir()) == [
        "model.onnx",
        "weights.bin",
    ]
    job = conv.convert(up, benchmark="off").wait(progress=False)
    assert job.succeeded
    x = np.ones((2, SIZES[0]), np.float32)
    np.testing.assert_allclose(
        served(srv, "big", x, job.version or 0), expected(arrays, x), atol=1e-4, rtol=1e-4
    )
    conv.delete_upload(up)
    assert not (uploads / up.upload_id).exists()


def test_an_archive_whose_constant_reads_its_data_file_converts_and_serves(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    """External data is not only the main graph's initializers: onnx.save(convert_attribute=
    True) puts a Constant node's tensor in the data file too. The check stage turned only the
    initializers into inputs and checked the rest in memory, where onnx.checker looks for the
    data file in the process's working folder: such an archive failed FAILED_PRECONDITION ("should
    be stored in weights.bin, but it is not regular file")."""
    srv, conv = server
    model, arrays = mlp(seed=6)
    (b1,) = [t for t in model.graph.initializer if t.name == "b1"]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["b1"], value=b1))
    model.graph.initializer.remove(b1)
    folder = tmp_path / "src"
    folder.mkdir()
    onnx.save_model(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
        convert_attribute=True,
    )
    saved = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert saved.graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    job = conv.convert(conv.upload("big", folder), benchmark="off").wait(progress=False)
    assert job.succeeded, job.error_message
    x = np.ones((2, SIZES[0]), np.float32)
    np.testing.assert_allclose(
        served(srv, "big", x, job.version or 0), expected(arrays, x), atol=1e-4, rtol=1e-4
    )


def test_weights_over_the_threshold_publish_with_external_data(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    """The 2 GiB route for a self-contained source: the server's threshold is 4 KiB here, so
    this model's 4.6 KiB of weights stand for a model over 2 GiB."""
    srv, conv = server
    model, arrays = mlp(seed=4)
    up = conv.upload("big", model.SerializeToString(), format="onnx")
    job = conv.convert(up, quantization="fp16", benchmark="off").wait(progress=False)
    assert job.succeeded, job.error_message
    folder = srv.settings.repository / "big" / str(job.version)
    assert (folder / "model.onnx.data").is_file()
    assert "exceed 4096 bytes" in job.report_json
    x = np.ones((3, SIZES[0]), np.float32)
    np.testing.assert_allclose(
        served(srv, "big", x, job.version or 0), expected(arrays, x), atol=0.05, rtol=0.05
    )


def test_a_small_self_contained_model_stays_one_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    model, _ = mlp(seed=5)
    with ServerThread(repo) as srv, ConversionClient(srv.management_target, timeout=300) as conv:
        up = conv.upload("small", model.SerializeToString(), format="onnx")
        job = conv.convert(up, benchmark="off").wait(progress=False)
        assert job.succeeded
        folder = repo / "small" / str(job.version)
        assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "report.json"]


def test_the_archive_is_a_plain_tar_of_the_folder(tmp_path: Path) -> None:
    """What the SDK sends is what ``tar cf model.tar -C folder .`` gives: flat, regular files."""
    from ferry.client._archive import pack_folder

    model, _ = mlp()
    save_external(model, tmp_path / "src")
    archive = pack_folder(tmp_path / "src")
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
        assert sorted(m.name for m in members) == ["model.onnx", "weights.bin"]
        assert all(m.isreg() for m in members)
    finally:
        archive.unlink()


def test_a_folder_sends_the_model_and_its_data_files_only(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    """Every regular file of the folder went: a .DS_Store or 'notes copy.txt' beside the model
    made the server refuse the whole upload (names it does not take), and a checkpoint beside it
    was sent for nothing. The folder now sends model.onnx and the data files its graph names."""
    from ferry.client._archive import pack_folder

    _, conv = server
    model, _ = mlp()
    save_external(model, tmp_path / "src")
    (tmp_path / "src" / ".DS_Store").write_bytes(b"\0" * 64)
    (tmp_path / "src" / "notes copy.txt").write_text("exported on Monday")
    (tmp_path / "src" / "checkpoint.pt").write_bytes(b"x" * 4096)
    (tmp_path / "src" / ".git").mkdir()
    archive = pack_folder(tmp_path / "src")
    try:
        with tarfile.open(archive) as tar:
            assert sorted(tar.getnames()) == ["model.onnx", "weights.bin"]
    finally:
        archive.unlink()
    up = conv.upload("big", tmp_path / "src")
    assert up.format == "onnx_archive"


def test_a_file_linking_out_of_the_models_folder_is_refused_before_sending(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    """A model folder's files went as the files their links name, wherever those were: a
    folder whose graph names ``weights.bin``, a link to any file of the machine (a key, a
    password file), sent that file to the server. A link out of the folder is refused naming
    it, before anything is sent; a link to a file inside the folder still goes."""
    _, conv = server
    model, _ = mlp()
    save_external(model, tmp_path / "elsewhere")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((tmp_path / "elsewhere" / "model.onnx").read_bytes())
    (folder / "weights.bin").symlink_to(tmp_path / "elsewhere" / "weights.bin")
    for source in (folder, folder / "model.onnx"):
        with pytest.raises(InvalidInputError, match=r"weights\.bin is a link to .*outside"):
            conv.upload("leak", source)
    (folder / "weights.bin").unlink()
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(tmp_path / "elsewhere" / "model.onnx")
    (folder / "weights.bin").write_bytes((tmp_path / "elsewhere" / "weights.bin").read_bytes())
    with pytest.raises(InvalidInputError, match=r"model\.onnx is a link to .*outside"):
        conv.upload("leak", folder)
    assert conv.list_uploads("leak") == []
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").write_bytes((tmp_path / "elsewhere" / "model.onnx").read_bytes())
    (folder / "weights.bin").rename(folder / "blob")
    (folder / "weights.bin").symlink_to("blob")  # inside the folder: fine
    assert conv.upload("kept", folder).format == "onnx_archive"


def test_a_folder_of_symlinks_goes_as_the_files_they_name(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path
) -> None:
    """A snapshot whose files are symlinks to blobs (Hugging Face's cache): naming its
    model.onnx sent link members, which the server refuses, and naming the folder said it
    held no model.onnx. Both send the linked files' bytes as regular members now."""
    from ferry.client._archive import pack_folder

    _, conv = server
    model, _ = mlp()
    cache = tmp_path / "models--org--mlp"  # Hugging Face's cache layout
    save_external(model, cache / "blobs")
    snap = cache / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for name in ("model.onnx", "weights.bin"):
        (snap / name).symlink_to(Path("..", "..", "blobs", name))
    archive = pack_folder(snap)
    try:
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers()}
            assert sorted(members) == ["model.onnx", "weights.bin"]
            assert all(m.isreg() for m in members.values())
            data = tar.extractfile(members["weights.bin"])
            assert data is not None
            assert data.read() == (cache / "blobs" / "weights.bin").read_bytes()
    finally:
        archive.unlink()
    assert conv.upload("snap", snap).format == "onnx_archive"
    assert conv.upload("snap", snap / "model.onnx").format == "onnx_archive"


def test_the_cli_uploads_a_folder_and_converts_it(
    server: tuple[ServerThread, ConversionClient],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ferry.cli import main

    srv, _ = server
    model, arrays = mlp(seed=6)
    save_external(model, tmp_path / "src")
    target = ("--target", srv.management_target)
    code = main(["upload", "big", str(tmp_path / "src"), "--json", *target])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["format"] == "onnx_archive"
    code = main(["convert", str(tmp_path / "src"), "--model", "big", "--no-progress", *target])
    out = capsys.readouterr().out
    assert code == 0 and "published as big version 1" in out
    x = np.ones((2, SIZES[0]), np.float32)
    np.testing.assert_allclose(served(srv, "big", x, 1), expected(arrays, x), atol=1e-4)


@pytest.mark.slow
def test_a_module_over_the_threshold_uploads_as_an_archive(
    server: tuple[ServerThread, ConversionClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's module route: a module whose weights exceed the threshold (lowered here) is
    exported with external data and sent as one archive."""
    import torch

    from ferry.client import _archive

    srv, conv = server
    monkeypatch.setattr(_archive, "EXTERNAL_DATA_THRESHOLD", 1024)
    module = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    example = torch.randn(4, 16)
    up = conv.upload("big", module.eval(), example_inputs=example)
    assert up.format == "onnx_archive"
    job = conv.convert(up, benchmark="off").wait(progress=False)
    folder = srv.settings.repository / "big" / str(job.version)
    assert (folder / "model.onnx.data").is_file()
    with torch.no_grad():
        want = module(example).numpy()
    with InferenceClient(srv.target, timeout=60) as client:
        got = np.asarray(client.infer("big", {"input": example.numpy()})["output"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_state_dict_over_the_threshold_exports_with_external_data(
    server: tuple[ServerThread, ConversionClient],
) -> None:
    """The server-side export (state_dict + architecture) of weights over the threshold."""
    import io

    import torch

    from ferry.server.convert.worker import nets

    srv, conv = server
    kwargs = {"in_features": 16, "hidden": [64], "out_features": 8}
    torch.manual_seed(0)
    module = nets.mlp(**kwargs).eval()
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    up = conv.upload(
        "big",
        buffer.getvalue(),
        format="state_dict",
        architecture="mlp",
        architecture_kwargs=kwargs,
    )
    job = conv.convert(up, quantization="dynamic_int8", benchmark="off").wait(progress=False)
    folder = srv.settings.repository / "big" / str(job.version)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",  # its batch, stated (jobs.batching_of_published)
        "model.onnx",
        "model.onnx.data",
        "report.json",
    ]
    # dynamic int8 shares one activation scale per run: each request runs alone
    assert json.loads((folder / "config.json").read_text()) == {
        "batching": {"combine_requests": False, "max_batch_size": 32}
    }
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = module(x).numpy()
    with InferenceClient(srv.target, timeout=60) as client:
        got = np.asarray(client.infer("big", {"input": x.numpy()})["output"])
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0.05)


def test_the_sdk_finds_data_files_anywhere_in_the_graph_without_onnx(tmp_path: Path) -> None:
    """The SDK reads locations from the wire format (it does not depend on onnx): initializers,
    a Constant inside an If branch, a sparse tensor, a local function."""
    from ferry.client._archive import external_locations

    def ext(name: str, location: str) -> TensorProto:
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)
        return tensor

    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=ext("c", "in_branch.bin"))],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
    )
    sparse = helper.make_sparse_tensor(
        ext("v", "sparse.bin"), helper.make_tensor("i", TensorProto.INT64, [4], [0, 1, 2, 3]), [4]
    )
    nodes = [
        helper.make_node("If", ["cond"], ["s"], then_branch=branch, else_branch=branch),
        helper.make_node("Constant", [], ["sp"], sparse_value=sparse),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
        initializer=[ext("w", "weights.bin")],
    )
    function = helper.make_function(
        "local",
        "F",
        [],
        ["y"],
        [helper.make_node("Constant", [], ["y"], value=ext("f", "function.bin"))],
        [helper.make_opsetid("", 17)],
    )
    model = helper.make_model(graph, functions=[function])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    assert sorted(external_locations(path)) == [
        "function.bin",
        "in_branch.bin",
        "sparse.bin",
        "weights.bin",
    ]
    assert external_locations(tmp_path / "missing.onnx") == []


def test_a_version_with_external_data_and_bf16_outputs_serves(tmp_path: Path) -> None:
    """Serving re-opens a model with BF16 outputs from bytes (its outputs cast to float32):
    the bytes carry the graph, and its data is found in the version's own folder."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = np.arange(1024, dtype=np.float32) / 8
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["input", "w"], ["sum"]),
            helper.make_node("Cast", ["sum"], ["output"], to=TensorProto.BFLOAT16),
        ],
        "bf16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("output", TensorProto.BFLOAT16, ["batch", 1024])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "repo" / "bf16" / "1"
    folder.mkdir(parents=True)
    onnx.save_model(
        model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data"
    )
    x = np.ones((2, 1024), np.float32)
    with ServerThread(tmp_path / "repo") as srv, InferenceClient(srv.target) as client:
        out = client.infer("bf16", {"input": x})["output"]
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), (x + w).astype(ml_dtypes.bfloat16))
