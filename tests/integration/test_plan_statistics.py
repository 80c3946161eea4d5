"""Planned batch sizes seen from outside (issue 16): the ferry.v1 statistics, the SDK and the CLI
show executions per planned size and the plan-change counter, so a user can check that steady
state never re-plans; the Open Inference Protocol keeps Triton's schema (``batch_stats`` counts
the rows asked for, not the padded size)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import StartServer, make_repo, reference, stats, write_config
from onnx import TensorProto, helper, numpy_helper

from ferry.cli import main
from ferry.client import InferenceClient
from ferry.server.examples import mlp_model

# Each request runs alone (sent one after the other), at the smallest planned size >= its rows.
ROWS = (1, 3, 4, 5, 8, 2, 7)
PLANNED = {2: 2, 4: 2, 8: 3}  # 1,2 -> 2; 3,4 -> 4; 5,7,8 -> 8


def test_executions_per_planned_size_and_no_plan_changes(
    tmp_path: Path, start_server: StartServer, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_repo(tmp_path / "repo", {"planned": mlp_model(), "plain": mlp_model()})
    write_config(
        root,
        "planned",
        {
            "batching": {"planned_batch_sizes": [2, 4], "max_batch_size": 8},
            "instances": {"count": 1},
        },
    )
    write_config(root, "plain", {"batching": {"max_batch_size": 8}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60) as client:
        for n in ROWS:
            for model in ("planned", "plain"):
                out = client.infer(model, {"input": np.ones((n, 64), np.float32)})
                assert out["logits"].shape == (n, 10)
        planned = stats(client, "planned")
        plain = stats(client, "plain")

    # Every planned size is listed (max_batch_size is always one); warm-up runs are not counted.
    assert planned.planned_executions == PLANNED
    assert sum(planned.planned_executions.values()) == planned.execution_count == len(ROWS)
    assert planned.plan_changes == 0
    assert planned.batch_sizes == dict.fromkeys(ROWS, 1)  # the rows asked for, not padded
    assert planned.device_executions == {}
    assert (plain.planned_executions, plain.plan_changes, plain.device_executions) == ({}, 0, {})
    assert plain.execution_count == len(ROWS)

    # The Open Inference Protocol over HTTP: Triton's JSON, with no field for planned sizes.
    url = f"http://{srv.http_target}/v2/models/planned/stats"
    with urllib.request.urlopen(url, timeout=10) as resp:
        (oip,) = json.load(resp)["model_stats"]
    assert {int(b["batch_size"]) for b in oip["batch_stats"]} == set(ROWS)
    assert not {"planned", "plan_changes", "devices"} & set(oip)

    # The CLI prints the plan for the planned version only.
    assert main(["models", "stats", "--target", srv.target]) == 0
    lines = capsys.readouterr().out.splitlines()
    plan_lines = [line for line in lines if "planned size" in line]
    assert plan_lines == ["planned/1 executions per planned size: 2:2 4:2 8:3; plan changes: 0"]
    assert main(["models", "stats", "planned", "--json", "--target", srv.target]) == 0
    (as_json,) = json.loads(capsys.readouterr().out)
    assert as_json["planned_executions"] == {"2": 2, "4": 2, "8": 3}
    assert as_json["plan_changes"] == 0


def _centering_model() -> onnx.ModelProto:
    """``y = x - mean(x)`` over the rows of its run: each row's answer depends on the others."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "mean"], ["y"]),
        ],
        "center",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_requests_that_run_alone_are_not_padded_to_a_planned_size(
    tmp_path: Path, start_server: StartServer
) -> None:
    """``combine_requests = false`` is the setting for a model whose answer for a row depends on
    the other rows of its run (a dynamic int8 version is published with it). A planned size
    padded each request with copies of its last row, and the padding changed every answer: the
    centered rows [0..3], [4..7], [8..11] came back [-5, -1, 3] for [-4, 0, 4]. Such a version
    is not planned: each request runs at its own size, as onnxruntime runs it."""
    root = make_repo(tmp_path / "repo", {"center": _centering_model()})
    batching = {"max_batch_size": 8, "combine_requests": False, "planned_batch_sizes": [4, 8]}
    write_config(root, "center", {"batching": batching})
    srv = start_server(root)
    model_file = root / "center" / "1" / "model.onnx"
    with InferenceClient(srv.target, timeout=60) as client:
        for rows in (1, 3, 5, 8):
            x = {"x": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) ** 2}
            got = client.infer("center", x)["y"]
            np.testing.assert_allclose(got, reference(model_file, x)["y"], rtol=1e-6)
        assert stats(client, "center").planned_executions == {}


def test_a_version_no_probe_row_runs_is_not_padded_to_a_planned_size(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A model none of the load probe's rows runs (here: a table of one row) is batched on its
    shapes, its rows unproven: its requests run alone until a real batch proves them apart.
    With planned sizes each of those runs was padded with copies of its last row, so a model
    that works across its rows answered a request alone with the padding's rows in it."""
    center = _centering_model()
    table = numpy_helper.from_array(np.array([[1, 2, 3, 4]], np.float32), "table")
    center.graph.initializer.append(table)
    center.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]))
    center.graph.node.append(helper.make_node("Gather", ["table", "ids"], ["row"]))
    center.graph.node.append(helper.make_node("Add", ["y", "row"], ["z"]))
    center.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])
    )
    root = make_repo(tmp_path / "repo", {"center": center})
    write_config(root, "center", {"batching": {"planned_batch_sizes": [4, 8]}})
    srv = start_server(root)
    model_file = root / "center" / "1" / "model.onnx"
    with InferenceClient(srv.target, timeout=60) as client:
        assert client.model_metadata("center").batching.max_batch_size == 32  # on its shapes
        for rows in (1, 3, 5):
            x = {
                "x": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) ** 2,
                "ids": np.zeros(rows, np.int64),
            }
            got = client.infer("center", x)["z"]
            np.testing.assert_allclose(got, reference(model_file, x)["z"], rtol=1e-6)
