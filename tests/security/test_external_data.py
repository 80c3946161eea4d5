"""Hostile ONNX uploads that point at bytes beside them: a model reads no bytes that did not travel
with it.

Uploads sit side by side in one folder and their ids are visible to every client, so a tensor
whose external data names ``<another upload id>.safetensors`` would make onnxruntime read — and
the conversion publish and serve — another user's bytes. Each hostile model here names a real
victim file: the catalogue is first shown to be a working exploit (onnxruntime really returns the
victim's numbers), then refused at upload with INVALID_ARGUMENT naming where the tensor sits, and
refused again by the conversion child when the upload check is bypassed; the victim's bytes are
never published or served. Two sweeps make sure no variant of the same kind gets through: every
place onnx's schema lets a TensorProto sit, and (property-based) any nesting of subgraphs and
functions around any tensor slot.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from serverutil import ServerThread

from ferry.client import ConversionClient, InferenceClient, InvalidInputError, JobFailedError
from ferry.server import onnx_walk
from ferry.server.convert import onnx_safety, upload_check, uploads
from ferry.server.errors import InvalidArgument

SECRET = np.array([1.5, -2.25, 3.125, 4.0], np.float32)  # the victim's weights
REFUSED = "model reads external data from"
OPSETS = [helper.make_opsetid("", 17)]


# ---- the victim and the hostile models ----
def victim_safetensors() -> tuple[bytes, int]:
    """A safetensors file holding SECRET, and the offset of SECRET's bytes in it."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + SECRET.tobytes(), 8 + len(header)


def external(name: str, location: str, offset: int, dtype: int = TensorProto.FLOAT) -> TensorProto:
    """A tensor of 4 elements whose bytes are ``location`` at ``offset``."""
    tensor = TensorProto(name=name, data_type=dtype, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    size = 16 if dtype == TensorProto.FLOAT else 32
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def x_plus(
    nodes: list[onnx.NodeProto], value: str, out_shape: list[int] | None = None, **kw: Any
) -> onnx.ModelProto:
    """Main graph: out = x + value, where ``nodes`` compute ``value``."""
    graph_ = helper.make_graph(
        [*nodes, helper.make_node("Add", ["x", value], ["out"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape or [4])],
        initializer=kw.pop("initializer", None),
        sparse_initializer=kw.pop("sparse_initializer", None),
    )
    return helper.make_model(graph_, opset_imports=kw.pop("opsets", OPSETS), **kw)


def constant(name: str, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name="leak", **attrs)


def function_constant(loc: str, off: int) -> onnx.ModelProto:
    leak = helper.make_function(
        "local", "Leak", [], ["y"], [constant("y", value=external("secret", loc, off))], OPSETS
    )
    call = helper.make_node("Leak", [], ["s"], name="call", domain="local")
    opsets = [*OPSETS, helper.make_opsetid("local", 1)]
    return x_plus([call], "s", opsets=opsets, functions=[leak])


def sparse_value(loc: str, off: int) -> onnx.ModelProto:
    indices = helper.make_tensor("i", TensorProto.INT64, [4], [0, 1, 2, 3])
    sparse = helper.make_sparse_tensor(external("secret", loc, off), indices, [4])
    return x_plus([constant("s", sparse_value=sparse)], "s")


def if_branch(loc: str, off: int) -> onnx.ModelProto:
    then = helper.make_graph(
        [constant("t", value=external("secret", loc, off))],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
    )
    other = helper.make_graph(
        [constant("e", value=helper.make_tensor("z", TensorProto.FLOAT, [4], [0] * 4))],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])],
    )
    yes = helper.make_node(
        "Constant", [], ["c"], name="cond", value=helper.make_tensor("b", TensorProto.BOOL, [], [1])
    )
    branch = helper.make_node("If", ["c"], ["s"], name="if", then_branch=then, else_branch=other)
    return x_plus([yes, branch], "s")


def loop_body(loc: str, off: int) -> onnx.ModelProto:
    body = helper.make_graph(
        [
            constant("v", value=external("secret", loc, off)),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [4]),
        ],
    )
    trips = helper.make_tensor("m", TensorProto.INT64, [], [1])
    go = helper.make_tensor("go", TensorProto.BOOL, [], [1])
    nodes = [
        helper.make_node("Constant", [], ["m"], name="trips", value=trips),
        helper.make_node("Constant", [], ["go"], name="go", value=go),
        helper.make_node("Loop", ["m", "go"], ["s"], name="loop", body=body),
    ]
    return x_plus(nodes, "s", out_shape=[1, 4])


def attribute_tensors(loc: str, off: int) -> onnx.ModelProto:
    clean = helper.make_tensor("clean", TensorProto.FLOAT, [4], [0] * 4)
    node = helper.make_node("Identity", ["x"], ["s"], name="carrier")
    node.attribute.append(helper.make_attribute("extra", [clean, external("secret", loc, off)]))
    return x_plus([node], "s")


def sparse_initializer(loc: str, off: int) -> onnx.ModelProto:
    indices = helper.make_tensor("i", TensorProto.INT64, [4], [0, 1, 2, 3])
    sparse = helper.make_sparse_tensor(external("secret", loc, off), indices, [4])
    return x_plus([], "secret", sparse_initializer=[sparse])


def sparse_indices(loc: str, off: int) -> onnx.ModelProto:
    values = helper.make_tensor("secret", TensorProto.FLOAT, [4], [1] * 4)
    indices = external("idx", loc, off, TensorProto.INT64)
    sparse = helper.make_sparse_tensor(values, indices, [4])
    return x_plus([], "secret", sparse_initializer=[sparse])


def initializer(loc: str, off: int) -> onnx.ModelProto:
    return x_plus([], "secret", initializer=[external("secret", loc, off)])


def function_default(loc: str, off: int) -> onnx.ModelProto:
    leak = helper.make_function(
        "local", "Leak", [], ["y"], [helper.make_node("Identity", ["d"], ["y"])], OPSETS
    )
    leak.attribute_proto.append(helper.make_attribute("fill", external("secret", loc, off)))
    call = helper.make_node("Leak", [], ["s"], name="call", domain="local")
    opsets = [*OPSETS, helper.make_opsetid("local", 1)]
    return x_plus([call], "s", opsets=opsets, functions=[leak])


def training_graph(loc: str, off: int) -> onnx.ModelProto:
    model = initializer("", 0)
    del model.graph.initializer[:]
    model.graph.initializer.append(helper.make_tensor("secret", TensorProto.FLOAT, [4], [0] * 4))
    init = helper.make_graph([], "init", [], [], initializer=[external("secret", loc, off)])
    model.training_info.add(initialization=init)
    return model


def function_if_loop(loc: str, off: int) -> onnx.ModelProto:
    """Three levels: a Loop body inside an If branch inside a local function."""
    inner = loop_body(loc, off).graph.node[:-1]  # all but the final Add
    then = helper.make_graph(
        list(inner), "then", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4])]
    )
    zeros = helper.make_tensor("z", TensorProto.FLOAT, [1, 4], [0] * 4)
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["s"], name="zeros", value=zeros)],
        "else",
        [],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4])],
    )
    branch = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)
    leak = helper.make_function("local", "Leak", ["c"], ["y"], [branch], OPSETS)
    call = helper.make_node("Leak", ["c"], ["s"], name="call", domain="local")
    yes = helper.make_node(
        "Constant", [], ["c"], name="cond", value=helper.make_tensor("b", TensorProto.BOOL, [], [1])
    )
    opsets = [*OPSETS, helper.make_opsetid("local", 1)]
    return x_plus([yes, call], "s", out_shape=[1, 4], opsets=opsets, functions=[leak])


LEAK = "node 'leak' (Constant) > attribute"
# name -> (builder, where the refusal must say the tensor is, onnxruntime serves the secret)
CATALOGUE: dict[str, tuple[Callable[[str, int], onnx.ModelProto], str, bool]] = {
    "function Constant": (
        function_constant,
        f"function 'local::Leak' > {LEAK} 'value' > tensor 'secret'",
        True,
    ),
    "Constant sparse_value": (
        sparse_value,
        f"graph 'g' > {LEAK} 'sparse_value' > sparse_tensor > values",
        True,
    ),
    "If branch": (
        if_branch,
        f"graph 'g' > node 'if' (If) > attribute 'then_branch' > graph 'then' > {LEAK} 'value'",
        True,
    ),
    "Loop body": (
        loop_body,
        f"node 'loop' (Loop) > attribute 'body' > graph 'body' > {LEAK} 'value' > tensor 'secret'",
        True,
    ),
    "attribute tensors": (
        attribute_tensors,
        "node 'carrier' (Identity) > attribute 'extra' > tensors #1 'secret'",
        False,
    ),
    "sparse_initializer values": (sparse_initializer, "sparse_initializer #0 > values", True),
    "sparse_initializer indices": (sparse_indices, "sparse_initializer #0 > indices", False),
    "initializer": (initializer, "graph 'g' > initializer 'secret'", True),
    "function default attribute": (
        function_default,
        "function 'local::Leak' > default attribute 'fill' > tensor 'secret'",
        False,
    ),
    "training graph": (
        training_graph,
        "training_info #0 > initialization 'init' > initializer 'secret'",
        False,
    ),
    "function > If > Loop": (
        function_if_loop,
        "function 'local::Leak' > node 'if' (If) > attribute 'then_branch' > graph 'then' > "
        f"node 'loop' (Loop) > attribute 'body' > graph 'body' > {LEAK} 'value'",
        True,
    ),
}
SERVED = [name for name, (_, _, served) in CATALOGUE.items() if served]


@pytest.mark.parametrize("name", SERVED)
def test_the_catalogue_is_a_working_exploit(tmp_path: Path, name: str) -> None:
    """Control: without the check, onnxruntime really answers with the victim's bytes."""
    data, offset = victim_safetensors()
    (tmp_path / "victim.safetensors").write_bytes(data)
    path = tmp_path / "hostile.onnx"
    path.write_bytes(CATALOGUE[name][0]("victim.safetensors", offset).SerializeToString())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.zeros(4, np.float32)})
    assert np.array_equal(out.reshape(-1), SECRET)


def _victim(conv: ConversionClient, srv: ServerThread) -> tuple[str, int, Path]:
    """Another user's upload: the file name an attacker derives from its id, and the folder."""
    data, offset = victim_safetensors()
    up = conv.upload("victim", data, format="safetensors", architecture="seed")
    assert srv.app is not None
    folder = srv.app.conversion.state_dir.resolve() / "uploads"
    name = f"{up.upload_id}.safetensors"
    assert (folder / name).read_bytes() == data
    return name, offset, folder


def test_every_hostile_upload_is_refused_naming_the_tensor(
    conversion_server: tuple[ServerThread, ConversionClient],
) -> None:
    srv, conv = conversion_server
    location, offset, folder = _victim(conv, srv)
    before = sorted(p.name for p in folder.iterdir())
    for name, (build, where, _) in CATALOGUE.items():
        hostile = build(location, offset).SerializeToString()
        with pytest.raises(InvalidInputError) as info:
            conv.upload("thief", hostile, format="onnx")
        err = info.value
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT, (name, err)
        assert err.message.startswith(REFUSED), (name, err.message)
        assert where in err.message, (name, err.message)
        assert f"(file {location!r})" in err.message and "self-contained" in err.message
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing kept, not even a temp
    assert conv.list_jobs() == []


def test_the_child_refuses_them_too_and_nothing_is_served(
    conversion_server: tuple[ServerThread, ConversionClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the upload check switched off in this process, the conversion child still fails the
    job with the same precise error, and the victim's numbers are never published or served."""
    srv, conv = conversion_server
    location, offset, _ = _victim(conv, srv)

    async def unchecked(fmt: str, path: Path, **limits: Any) -> None:
        return None

    monkeypatch.setattr(upload_check, "check", unchecked)  # the upload's check process
    names = ["function Constant", "Constant sparse_value"]
    jobs = []
    for name in names:
        build, _, _ = CATALOGUE[name]
        up = conv.upload("thief", build(location, offset).SerializeToString(), format="onnx")
        jobs.append(conv.convert(up))
    for name, job in zip(names, jobs, strict=True):
        with pytest.raises(JobFailedError) as info:
            job.wait(progress=False)
        err = info.value
        assert (err.code, err.kind) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert f"FAILED: {REFUSED} {CATALOGUE[name][1]}" in err.message, err.message
        assert err.job.stage == "load"
    repo = srv.settings.repository
    assert not (repo / "thief").exists()
    with InferenceClient(srv.target, timeout=30) as client:
        assert "thief" not in [m.name for m in client.list_models()]


def ep_context(location: str, nested: bool) -> onnx.ModelProto:
    """A provider's compiled context (com.microsoft::EPContext, embed_mode 0) whose engine is
    the file ``location`` beside the model; ``nested``: inside an If branch."""
    node = helper.make_node(
        "EPContext",
        ["x"],
        ["s"],
        name="engine",
        domain="com.microsoft",
        embed_mode=0,
        ep_cache_context=location,
        source="TensorrtExecutionProvider",
        main_context=1,
    )
    opsets = [*OPSETS, helper.make_opsetid("com.microsoft", 1)]
    if not nested:
        return x_plus([node], "s", opsets=opsets)
    model = if_branch("", 0)
    (then,) = (a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    del then.node[:]
    then.node.append(node)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_a_precompiled_provider_context_is_refused_at_upload_and_in_the_child(
    conversion_server: tuple[ServerThread, ConversionClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EPContext node names a file (ep_cache_context) that TensorRT, OpenVINO or QNN reads as
    its engine from beside the model: another user's upload, for a plain ONNX upload. It passed
    the upload (com.microsoft is a served domain) and failed late, FAILED_PRECONDITION blaming
    spec.inputs. Refused wherever it sits, on both routes and again in the child."""
    from test_archive_uploads import tar

    srv, conv = conversion_server
    location, _, _ = _victim(conv, srv)
    hostile = {n: ep_context(location, n).SerializeToString() for n in (False, True)}
    for nested, where in ((False, "graph 'g' > node 'engine'"), (True, "graph 'then' > node")):
        archive = tar(("model.onnx", hostile[nested]), ("model.onnx.data", b"\0" * 16))
        for data, fmt in ((hostile[nested], "onnx"), (archive, "onnx_archive")):
            with pytest.raises(InvalidInputError) as info:
                conv.upload("thief", data, format=fmt)
            err = info.value
            assert err.code is grpc.StatusCode.INVALID_ARGUMENT, (fmt, err)
            assert "com.microsoft::EPContext node" in err.message and where in err.message
            assert "ep_cache_context" in err.message and "original model" in err.message

    async def unchecked(fmt: str, path: Path, **limits: Any) -> None:
        return None

    monkeypatch.setattr(upload_check, "check", unchecked)
    up = conv.upload("thief", hostile[True], format="onnx")
    with pytest.raises(JobFailedError) as failed:
        conv.convert(up).wait(progress=False)
    err = failed.value
    assert (err.code, err.kind, err.job.stage) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "load",
    )
    assert "com.microsoft::EPContext node" in err.message
    assert not (srv.settings.repository / "thief").exists()


# ---- sweeps: no variant of the same kind gets through ----
def _base() -> onnx.ModelProto:
    """A parseable model with a non-empty graph (an empty one is refused for another reason)."""
    return x_plus([helper.make_node("Identity", ["x"], ["s"], name="id")], "s")


def _refusals(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """The messages of the three checks that must each refuse ``model``: the walker itself, the
    upload's format check on the file, the child's source check."""
    path = tmp_path / "hostile.onnx"
    path.write_bytes(model.SerializeToString())
    messages = []
    for check in (
        lambda: onnx_safety.check_self_contained(model),
        lambda: uploads.check_format("onnx", path),
        lambda: onnx_safety.check_source(onnx.load(str(path), load_external_data=False)),
    ):
        with pytest.raises(InvalidArgument) as info:
            check()
        messages.append(info.value.message)
    return messages


def _tensor_paths(descriptor: Any, seen: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every chain of message fields from ``descriptor`` to a TensorProto, read from onnx's own
    schema (each message type once per chain; nesting depth is the property test's job)."""
    seen = (*seen, descriptor.full_name)
    for field in descriptor.fields:
        target = field.message_type
        if target is None:
            continue
        if target.full_name == "onnx.TensorProto":
            yield (field.name,)
        elif target.full_name not in seen:
            for rest in _tensor_paths(target, seen):
                yield (field.name, *rest)


SCHEMA_PATHS = sorted(_tensor_paths(onnx.ModelProto.DESCRIPTOR))
MARKERS = ["data_location", "external_data", "both"]


def _mark(tensor: TensorProto, marker: str, location: str) -> None:
    tensor.name = "secret"
    if marker in ("data_location", "both"):
        tensor.data_location = TensorProto.EXTERNAL
    if marker in ("external_data", "both"):
        tensor.external_data.add(key="location", value=location)


def test_the_schema_sweep_covers_the_known_places() -> None:
    """Guard the sweep itself: it must reach the places the exploits used."""
    for expected in [
        ("graph", "initializer"),
        ("graph", "sparse_initializer", "values"),
        ("graph", "sparse_initializer", "indices"),
        ("graph", "node", "attribute", "t"),
        ("graph", "node", "attribute", "tensors"),
        ("graph", "node", "attribute", "sparse_tensor", "values"),
        ("graph", "node", "attribute", "sparse_tensors", "indices"),
        ("functions", "node", "attribute", "t"),
        ("functions", "attribute_proto", "g", "initializer"),
        ("training_info", "algorithm", "initializer"),
    ]:
        assert expected in SCHEMA_PATHS


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize("path", SCHEMA_PATHS, ids=".".join)
def test_a_tensor_anywhere_in_the_schema_is_refused(
    tmp_path: Path, path: tuple[str, ...], marker: str
) -> None:
    model = _base()
    message: Any = model
    for name in path:
        field = message.DESCRIPTOR.fields_by_name[name]
        message = getattr(message, name).add() if field.is_repeated else getattr(message, name)
    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    onnx_safety.check_self_contained(clean)  # the same structure without the marker passes
    _mark(message, marker, "../victim.bin")
    for text in _refusals(model, tmp_path):
        assert text.startswith(REFUSED), text
        if marker != "data_location":
            assert "(file '../victim.bin')" in text


# Containers a subgraph can sit in, and the tensor slots a graph (or function) offers.
WRAPPERS = ["if_then", "if_else", "loop", "scan", "graphs", "attribute_g"]
TOPS = ["main", "function", "function_attribute", "training_init", "training_algorithm"]
SLOTS = [
    "initializer", "sparse_values", "sparse_indices", "constant", "sparse_value_values",
    "sparse_value_indices", "tensors", "sparse_tensors",
]  # fmt: skip


def _empty(name: str) -> onnx.GraphProto:
    return helper.make_graph([], name, [], [])


def _leaf(slot: str, tensor: TensorProto) -> onnx.GraphProto:
    g = _empty("leaf")
    plain = helper.make_tensor("plain", TensorProto.FLOAT, [4], [0] * 4)
    idx = helper.make_tensor("idx", TensorProto.INT64, [4], [0, 1, 2, 3])
    if slot == "initializer":
        g.initializer.extend([plain, tensor])
    elif slot in ("sparse_values", "sparse_indices"):
        pair = (tensor, idx) if slot == "sparse_values" else (plain, tensor)
        g.sparse_initializer.append(helper.make_sparse_tensor(*pair, [4]))
    elif slot == "constant":
        g.node.append(constant("c", value=tensor))
    elif slot in ("sparse_value_values", "sparse_value_indices"):
        pair = (tensor, idx) if slot == "sparse_value_values" else (plain, tensor)
        g.node.append(constant("c", sparse_value=helper.make_sparse_tensor(*pair, [4])))
    elif slot == "tensors":
        node = helper.make_node("Identity", ["a"], ["b"], name="carrier")
        node.attribute.append(helper.make_attribute("extra", [plain, tensor]))
        g.node.append(node)
    else:
        node = helper.make_node("Identity", ["a"], ["b"], name="carrier")
        sparse = [
            helper.make_sparse_tensor(plain, idx, [4]),
            helper.make_sparse_tensor(tensor, idx, [4]),
        ]
        node.attribute.append(helper.make_attribute("extra", sparse))
        g.node.append(node)
    return g


def _wrap(wrapper: str, inner: onnx.GraphProto, depth: int) -> onnx.GraphProto:
    name = f"w{depth}"
    if wrapper in ("if_then", "if_else"):
        then, other = (inner, _empty("e")) if wrapper == "if_then" else (_empty("t"), inner)
        node = helper.make_node("If", ["c"], ["y"], name=name, then_branch=then, else_branch=other)
    elif wrapper in ("loop", "scan"):
        op = "Loop" if wrapper == "loop" else "Scan"
        node = helper.make_node(op, ["m"], ["y"], name=name, body=inner)
    elif wrapper == "graphs":
        node = helper.make_node("Identity", ["a"], ["y"], name=name)
        node.attribute.append(helper.make_attribute("branches", [_empty("other"), inner]))
    else:
        node = helper.make_node("Identity", ["a"], ["y"], name=name)
        node.attribute.append(helper.make_attribute("branch", inner))
    return helper.make_graph([node], name, [], [])


def _model(top: str, inner: onnx.GraphProto) -> onnx.ModelProto:
    model = _base()
    if top == "main":
        model.graph.node.extend(inner.node)
        model.graph.initializer.extend(inner.initializer)
        model.graph.sparse_initializer.extend(inner.sparse_initializer)
    elif top == "function":
        holder = helper.make_node("If", ["c"], ["y"], name="holder", then_branch=inner)
        model.functions.append(helper.make_function("local", "F", ["c"], ["y"], [holder], OPSETS))
    elif top == "function_attribute":
        fn = helper.make_function("local", "F", [], [], [], OPSETS)
        fn.attribute_proto.append(helper.make_attribute("default_body", inner))
        model.functions.append(fn)
    else:
        where = "initialization" if top == "training_init" else "algorithm"
        getattr(model.training_info.add(), where).CopyFrom(inner)
    return model


NESTING = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@NESTING
@given(
    top=st.sampled_from(TOPS),
    wrappers=st.lists(st.sampled_from(WRAPPERS), max_size=6),
    slot=st.sampled_from(SLOTS),
    marker=st.sampled_from(MARKERS),
    location=st.one_of(
        st.sampled_from(["victim.safetensors", "../jobs/x/calibration.npz", "/etc/passwd"]),
        st.text(min_size=1, max_size=300),
    ),
)
def test_any_nesting_of_any_slot_is_refused(
    tmp_path: Path, *, top: str, wrappers: list[str], slot: str, marker: str, location: str
) -> None:
    tensor = TensorProto(name="secret", data_type=TensorProto.FLOAT, dims=[4])
    clean_graph = _leaf(slot, tensor)
    for depth, wrapper in enumerate(reversed(wrappers)):
        clean_graph = _wrap(wrapper, clean_graph, depth)
    onnx_safety.check_self_contained(_model(top, clean_graph))  # no false positive

    _mark(tensor, marker, location)
    graph_ = _leaf(slot, tensor)
    for depth, wrapper in enumerate(reversed(wrappers)):
        graph_ = _wrap(wrapper, graph_, depth)
    model = _model(top, graph_)
    refs = list(onnx_safety.external_refs(model))
    assert len(refs) == 1, refs
    for text in _refusals(model, tmp_path):
        assert text.startswith(f"{REFUSED} {refs[0].where}"), text
        for depth in range(len(wrappers)):
            assert f"'w{depth}'" in text  # the location names every level it went through
        if marker != "data_location":
            shown = location if len(location) <= 100 else location[:100] + "..."
            assert f"(file {shown!r})" in text


def test_a_large_graph_is_checked_without_a_location_per_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload of 1.5M nodes took 27 s to check, the upload RPC waiting: a location (a Step)
    was made for every message of the model, and every field of each tried. The check's first
    pass makes none; a refusal then makes steps along the way to what it names, not one per
    node (counted, not timed). What is found is unchanged: the same tensor, the same node."""
    made: list[int] = []

    class Counted(onnx_walk.Step):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            made.append(1)
            super().__init__(*args)

    monkeypatch.setattr(onnx_walk, "Step", Counted)
    n = 3000
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "g",
        [value("t0", TensorProto.FLOAT, ["N", 4])],
        [value(f"t{n}", TensorProto.FLOAT, ["N", 4])],
        value_info=[value(f"t{i}", TensorProto.FLOAT, ["N", 4]) for i in range(1, n)],
    )
    model = helper.make_model(graph, opset_imports=OPSETS)
    onnx_safety.check_source(model)
    assert made == []

    model.graph.initializer.append(external("w", "../victim.bin", 0))
    with pytest.raises(InvalidArgument, match=f"{REFUSED} graph 'g' > initializer 'w'"):
        onnx_safety.check_source(model)
    assert 0 < len(made) < 10, len(made)

    made.clear()
    del model.graph.initializer[:]
    model.graph.node.append(helper.make_node("Gelu", ["t0"], ["z"], domain="com.example"))
    with pytest.raises(InvalidArgument, match=f"node #{n} \\(Gelu\\)\\), a custom-op domain"):
        onnx_safety.check_source(model)
    assert len(made) == n + 3  # the model, its graph and each node, once: nothing else
