"""Dynamic batching, observed through the server's own statistics, never through timing.

Each test holds the single instance busy with an ``ExecutionGate``, queues requests behind it and
waits until the server reports them queued (``queue_depth``), then opens the gate. What runs
together is then decided by the batcher's policy alone, so execution counts are exact.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import (
    WAIT_S,
    ExecutionGate,
    StartServer,
    make_repo,
    reference,
    stats,
    wait_for,
    write_config,
)
from onnx import TensorProto, helper
from serverutil import ServerThread

from ferry.cli.models import describe_text
from ferry.client import FailedPreconditionError, InferenceClient, InferResult, ModelStatistics
from ferry.server.core.types import DYNAMIC_AXES_METADATA
from ferry.server.examples import identity_model, mlp_model


def _queue_behind_gate(
    client: InferenceClient,
    gate: ExecutionGate,
    pool: ThreadPoolExecutor,
    model: str,
    *,
    first: dict[str, np.ndarray],
    rest: list[dict[str, np.ndarray]],
) -> tuple[Future[InferResult], list[Future[InferResult]]]:
    """Send ``first`` and wait until it holds the instance, then send ``rest`` and wait until all
    of them are queued on the server."""
    head = pool.submit(client.infer, model, first)
    gate.wait_entered()
    tail = [pool.submit(client.infer, model, feeds) for feeds in rest]
    wait_for(
        lambda: stats(client, model).queue_depth == len(rest),
        f"{len(rest)} requests queued behind the held execution",
    )
    return head, tail


def test_64_concurrent_requests_run_in_two_executions(
    tmp_path: Path, start_server: StartServer
) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"batching": {"max_batch_size": 64}, "instances": {"count": 1}})
    srv = start_server(root)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(64) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        rows = [{"input": x[i : i + 1]} for i in range(64)]
        head, tail = _queue_behind_gate(client, gate, pool, "mlp", first=rows[0], rest=rows[1:])
        gate.release()
        results = [head.result(60)] + [f.result(60) for f in tail]
        s = stats(client, "mlp")
    # The held request ran alone; the 63 that queued behind it ran as one batch.
    assert s.execution_count == 2
    assert s.inference_count == 64
    assert s.batch_sizes == {1: 1, 63: 1}
    assert s.success.count == 64
    assert s.queue.count == 64
    assert gate.calls == 2
    expected = reference(root / "mlp" / "1" / "model.onnx", {"input": x})["logits"]
    got = np.concatenate([r["logits"] for r in results])
    # A batch of 63 may pick different GEMM kernels than a batch of 1: allow rounding.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_batches_never_exceed_max_batch_size(tmp_path: Path, start_server: StartServer) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"batching": {"max_batch_size": 4}})
    srv = start_server(root)
    x = np.random.default_rng(8).standard_normal((11, 64)).astype(np.float32)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(16) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        rows = [{"input": x[i : i + 1]} for i in range(11)]
        head, tail = _queue_behind_gate(client, gate, pool, "mlp", first=rows[0], rest=rows[1:])
        gate.release()
        got = np.concatenate([head.result(60)["logits"]] + [f.result(60)["logits"] for f in tail])
        s = stats(client, "mlp")
    assert s.batch_sizes == {1: 1, 4: 2, 2: 1}
    assert s.execution_count == 4
    assert s.inference_count == 11
    expected = reference(root / "mlp" / "1" / "model.onnx", {"input": x})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_requests_with_multi_row_batches_are_split_back(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Requests carrying 1, 2 and 3 rows share one execution; each gets exactly its rows."""
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    srv = start_server(root)
    x = np.random.default_rng(9).standard_normal((7, 64)).astype(np.float32)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        parts = [x[0:1], x[1:2], x[2:4], x[4:7]]
        head, tail = _queue_behind_gate(
            client,
            gate,
            pool,
            "mlp",
            first={"input": parts[0]},
            rest=[{"input": p} for p in parts[1:]],
        )
        gate.release()
        results = [head.result(60)] + [f.result(60) for f in tail]
        s = stats(client, "mlp")
    assert [r["logits"].shape[0] for r in results] == [1, 1, 2, 3]
    assert s.batch_sizes == {1: 1, 6: 1}
    expected = reference(root / "mlp" / "1" / "model.onnx", {"input": x})["logits"]
    got = np.concatenate([r["logits"] for r in results])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_only_requests_with_equal_non_batch_dims_share_an_execution(
    tmp_path: Path, start_server: StartServer
) -> None:
    root = make_repo(tmp_path / "repo", {"vec": identity_model("INT32", ("batch", "n"))})
    srv = start_server(root)

    def row(n: int, value: int) -> dict[str, np.ndarray]:
        return {"input": np.full((1, n), value, np.int32)}

    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(8) as pool,
        ExecutionGate(srv, "vec") as gate,
    ):
        rest = [row(3, 1), row(5, 2), row(3, 3), row(5, 4), row(3, 5)]
        head, tail = _queue_behind_gate(client, gate, pool, "vec", first=row(2, 0), rest=rest)
        gate.release()
        head.result(60)
        outputs = [f.result(60)["output"] for f in tail]
        s = stats(client, "vec")
    # One execution per shape: [1,3] x3 together, [1,5] x2 together.
    assert s.batch_sizes == {1: 1, 3: 1, 2: 1}
    for feeds, out in zip(rest, outputs, strict=True):
        np.testing.assert_array_equal(out, feeds["input"])


def test_two_instances_run_two_batches_at_once(tmp_path: Path, start_server: StartServer) -> None:
    """With instances.count = 2 a second execution starts while the first is held."""
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"instances": {"count": 2}})
    srv = start_server(root)
    x = np.ones((1, 64), np.float32)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        first = pool.submit(client.infer, "mlp", {"input": x})
        gate.wait_entered()
        second = pool.submit(client.infer, "mlp", {"input": x})
        wait_for(lambda: gate.calls == 2, "the second instance to start an execution")
        assert stats(client, "mlp").queue_depth == 0
        gate.release()
        np.testing.assert_array_equal(first.result(60)["logits"], second.result(60)["logits"])


def _transpose_model() -> onnx.ModelProto:
    """x [batch, k] -> its transpose [k, batch]: every dim dynamic, the batch's last."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])],
        "transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k", "batch"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _refused_at_load(
    tmp_path: Path, start_server: StartServer, model: onnx.ModelProto, *, max_batch_size: int
) -> str:
    """Why ``model``, served alone with ``max_batch_size`` configured, is FAILED at load (it
    must be)."""
    root = make_repo(tmp_path / "repo", {"set": model})
    write_config(root, "set", {"batching": {"max_batch_size": max_batch_size}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60) as client:
        (status,) = client.list_models("set")
    assert status.state == "FAILED", status
    return status.reason


def test_a_configured_batch_size_on_outputs_not_batched_first_is_refused_at_load(
    tmp_path: Path, start_server: StartServer
) -> None:
    """An explicit max_batch_size is not second-guessed on whether rows mix, but an output whose
    first dimension is not the batch's cannot be split per request: every request failed
    INTERNAL, and two rows of k = 2 batched together were split across the transpose's rows,
    each caller getting values of the other. The version is FAILED at load, naming the output;
    left unset, the load's probe serves it unbatched."""
    root = make_repo(tmp_path / "repo", {"set": _transpose_model(), "unset": _transpose_model()})
    write_config(root, "set", {"batching": {"max_batch_size": 8}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60) as client:
        (status,) = client.list_models("set")
        assert status.state == "FAILED"
        assert "max_batch_size = 8, but output 'y' is [1, 2] for a batch of 2" in status.reason
        x = np.arange(2, dtype=np.float32).reshape(1, 2)
        np.testing.assert_array_equal(client.infer("unset", {"x": x})["y"], x.T)


def test_an_output_whose_first_dimension_equals_two_rows_by_chance_is_refused_at_load(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The check must not be fooled by a non-batch dimension that is 2 where it looks: the
    transpose [k, batch] with k verified from 2 up (a time-major encoder's [seq, batch] output)
    was [2, 2] for two rows of zeros, passed, and two requests of k = 2 batched together each
    got a column of the other's values. It is refused at load, as with k of 1."""
    model = _transpose_model()
    onnx.helper.set_model_props(model, {DYNAMIC_AXES_METADATA: '{"x": {"1": ["k", 2, 16]}}'})
    reason = _refused_at_load(tmp_path, start_server, model, max_batch_size=8)
    assert "max_batch_size = 8, but output 'y' is [2, 1] for a batch of 1" in reason


def test_an_output_not_batched_first_is_refused_at_load_at_a_max_batch_size_of_one(
    tmp_path: Path, start_server: StartServer
) -> None:
    """At max_batch_size 1 the load's check ran one row alone, where the transpose [k, batch] is
    [1, 1] at k = 1, and passed; planned, [[1, 2, 3]] was then answered [[1]]. Two rows are run
    there too (the graph's first dimension is dynamic): it is refused at load."""
    reason = _refused_at_load(tmp_path, start_server, _transpose_model(), max_batch_size=1)
    assert "max_batch_size = 1, but output 'y' is [1, 2] for a batch of 2" in reason


def test_an_output_batched_first_only_at_the_checked_size_fails_failed_precondition(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A flatten [batch, k] -> [batch * k] is [1] and [2] for one and two rows at k = 1, so the
    load's check passes; a request of k = 3 makes [3] for a batch of 1. That is the model's
    shapes against its config, not a fault of the server: FAILED_PRECONDITION naming the output
    and the fix, where it was INTERNAL."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [-1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    root = make_repo(tmp_path / "repo", {"flat": model})
    write_config(root, "flat", {"batching": {"max_batch_size": 8}})
    srv = start_server(root)
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    refused = r"output 'y' with shape \[3\] for a batch of 1.*max_batch_size = 0"
    with (
        InferenceClient(srv.target, timeout=60) as client,
        pytest.raises(FailedPreconditionError, match=refused),
    ):
        client.infer("flat", {"x": x})


def _one_row_transpose_model() -> onnx.ModelProto:
    """The transpose [batch, k] -> [k, batch] of a graph that runs one row only (a Squeeze of
    the first dimension): the load's check cannot run two rows on it."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["x", "axes"], ["row"]),
            helper.make_node("Unsqueeze", ["row", "axes"], ["again"]),
            helper.make_node("Transpose", ["again"], ["y"], perm=[1, 0]),
        ],
        "one_row_transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k", "batch"])],
        initializer=[axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_planned_run_never_cuts_an_output_not_batched_first_into_an_answer(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A transpose [k, batch] the load's check passes (one row at k = 1; two rows do not run).
    Unplanned, a request of k = 3 is refused ([3, 1] for a batch of 1); planned, the run's
    outputs were cut to the batch's rows, and [[1, 2, 3]] was answered [[1]]. It is refused
    alike, naming the output."""
    root = make_repo(tmp_path / "repo", {"planned": _one_row_transpose_model()})
    write_config(root, "planned", {"batching": {"max_batch_size": 1, "planned_batch_sizes": [1]}})
    srv = start_server(root)
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    refused = r"output 'y' has shape \[3, 1\] for a planned batch"
    with (
        InferenceClient(srv.target, timeout=60) as client,
        pytest.raises(FailedPreconditionError, match=refused),
    ):
        client.infer("planned", {"x": x})


def _guarded_transpose_model(
    needs: float | None, perm: tuple[int, int] = (1, 0)
) -> onnx.ModelProto:
    """The transpose [batch, k] -> [k, batch] behind a guard onnxruntime refuses (a Range of
    step 0): the step is the input's max (``needs`` None: zeros are refused, ones run), or
    1 only where the max is exactly ``needs`` (no value the server makes up runs)."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("ReduceMax", ["x"], ["max"], keepdims=0)]
    inits = [one, zero]
    if needs is None:
        nodes.append(helper.make_node("Identity", ["max"], ["step"]))
    else:
        inits.append(helper.make_tensor("needs", TensorProto.FLOAT, [], [needs]))
        nodes += [
            helper.make_node("Equal", ["max", "needs"], ["hit"]),
            helper.make_node("Cast", ["hit"], ["step"], to=TensorProto.FLOAT),
        ]
    nodes += [
        helper.make_node("Range", ["zero", "one", "step"], ["steps"]),
        helper.make_node("ReduceSum", ["steps"], ["sum"], keepdims=0),
        helper.make_node("Mul", ["sum", "zero"], ["nothing"]),
        helper.make_node("Transpose", ["x"], ["t"], perm=list(perm)),
        helper.make_node("Add", ["t", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "guarded_transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [["batch", "k"][i] for i in perm])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# Rows the guarded model (its guard 7.0) runs; k = 2.
GUARDED_ROWS = [{"x": np.array([[7.0, float(i)]], np.float32)} for i in (1, 2, 3)]


def _guarded_rows_queued(
    srv: ServerThread, model: str
) -> tuple[list[Future[InferResult]], ModelStatistics]:
    """GUARDED_ROWS sent, the first holding the instance and the others queued behind it, then
    let run: their finished calls, and the model's statistics after them."""
    first, *rest = GUARDED_ROWS
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
        ExecutionGate(srv, model) as gate,
    ):
        head, tail = _queue_behind_gate(client, gate, pool, model, first=first, rest=rest)
        gate.release()
        futures = [head, *tail]
        wait(futures, timeout=60)
        return futures, stats(client, model)


def test_an_output_not_batched_first_is_refused_at_load_on_a_model_zeros_cannot_run(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The load's check ran zeros alone: a model refusing zeros (a Range stepped by an input's
    value) was served as configured, and two requests of k = 2 batched together each got a
    column of the other's values. Other rows (ones, the probe's) are tried: it is refused."""
    model = _guarded_transpose_model(None)
    reason = _refused_at_load(tmp_path, start_server, model, max_batch_size=8)
    assert "max_batch_size = 8, but output 'y' is [1, 2] for a batch of 2" in reason


@pytest.mark.parametrize("batching", [{"max_batch_size": 8}, {}], ids=["configured", "left-unset"])
def test_an_output_not_batched_first_never_mixes_requests_when_no_made_up_row_runs(
    tmp_path: Path, start_server: StartServer, batching: dict[str, int]
) -> None:
    """A model that runs on no row the server makes up is checked on the first request's own
    row (alone, then twice) before requests share a run: two requests of k = 2 were batched
    together and each served a column of the other's values; each now fails
    FAILED_PRECONDITION naming the output and the fix. Left unset, such a model was batched on
    its shapes alone with no check at all; it is checked the same way."""
    root = make_repo(tmp_path / "repo", {"m": _guarded_transpose_model(7.0)})
    config: dict[str, object] = {"instances": {"count": 1}}
    if batching:
        config["batching"] = batching
    write_config(root, "m", config)
    futures, _ = _guarded_rows_queued(start_server(root), "m")
    for future in futures:
        with pytest.raises(FailedPreconditionError, match=r"output 'y' is \[2, 1\] for a bat"):
            future.result()


def test_a_model_no_made_up_row_runs_is_batched_once_a_request_checks_it(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The same guarded model with its output batched first: the first request's row checks it,
    and the requests queued behind it then share one run, each served its own row."""
    root = make_repo(tmp_path / "repo", {"set": _guarded_transpose_model(7.0, (0, 1))})
    write_config(root, "set", {"batching": {"max_batch_size": 8}, "instances": {"count": 1}})
    futures, after = _guarded_rows_queued(start_server(root), "set")
    for feeds, future in zip(GUARDED_ROWS, futures, strict=True):
        np.testing.assert_array_equal(future.result()["y"], feeds["x"])
    assert after.batch_sizes == {1: 1, 2: 1}


def test_the_check_on_the_first_requests_row_is_no_part_of_its_compute_time(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of the batch dimension on the first request's own row (the model run on it
    alone, then twice) ran inside that batch's timed input stage: its compute_input held two
    runs of the model, and where the row does not run (the check is then made again at every
    request) every request's did. Timed on a clock that only the check moves by an hour: the
    request's compute figures hold none of it."""
    import types

    from ferry.server.core import loaded as loaded_module

    clock = [0]

    def now() -> int:
        clock[0] += 1
        return clock[0]

    monkeypatch.setattr(loaded_module, "time", types.SimpleNamespace(perf_counter_ns=now))
    root = make_repo(tmp_path / "repo", {"set": _guarded_transpose_model(7.0, (0, 1))})
    write_config(root, "set", {"batching": {"max_batch_size": 8}, "instances": {"count": 1}})
    srv = start_server(root)
    assert srv.app is not None
    session = srv.app.registry.get("set", 1).session
    real = session.check_rows
    hour = 3600 * 10**9
    checks = []

    def check_rows(row: dict[str, np.ndarray], max_batch: int) -> tuple[bool, str]:
        checks.append(max_batch)
        clock[0] += hour
        return real(row, max_batch)

    monkeypatch.setattr(session, "check_rows", check_rows)
    with InferenceClient(srv.target, timeout=60) as client:
        np.testing.assert_array_equal(
            client.infer("set", GUARDED_ROWS[0])["y"], GUARDED_ROWS[0]["x"]
        )
        s = stats(client, "set")
    assert checks == [8] and s.execution_count == 1
    assert s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns < hour


def _valid_convolution_plus_the_rows_mean() -> onnx.ModelProto:
    """A 3x3 convolution without padding over dynamic H and W (so at least 3 each), plus its
    mean over the rows: a model that works across its first dimension and that no row of the
    size 1 a made-up dynamic dimension used to get can run."""
    rng = np.random.default_rng(3)
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [2, 1, 3, 3], rng.standard_normal(18).astype(np.float32)
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("ReduceMean", ["c"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Add", ["c", "mean"], ["y"]),
        ],
        "valid_conv_plus_rows_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "h", "w"])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_refusing_dims_of_one_that_works_across_rows_never_mixes_callers(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The probe gave dynamic dims a size of 1, which a valid 3x3 convolution refuses: no probe
    row ran, the model was batched on its shapes alone, and callers queued together were each
    answered with the mean of everyone's rows (14 of 40 concurrent answers). The probe now
    tries larger sizes, sees the rows mix and leaves the model unbatched: each caller gets what
    onnxruntime gives its request alone."""
    root = make_repo(tmp_path / "repo", {"m": _valid_convolution_plus_the_rows_mean()})
    write_config(root, "m", {"instances": {"count": 1}})
    srv = start_server(root)
    rng = np.random.default_rng(0)
    requests = [
        {"x": (rng.standard_normal((1, 1, 5, 5)) * (i + 1)).astype(np.float32)} for i in range(4)
    ]
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
        ExecutionGate(srv, "m") as gate,
    ):
        head, tail = _queue_behind_gate(
            client, gate, pool, "m", first=requests[0], rest=requests[1:]
        )
        gate.release()
        for feeds, future in zip(requests, [head, *tail], strict=True):
            expected = reference(root / "m" / "1" / "model.onnx", feeds)["y"]
            np.testing.assert_array_equal(future.result(60)["y"], expected)
        assert client.model_metadata("m").batching.max_batch_size == 0


def _exact_width_model(*, minus_rows_mean: bool) -> onnx.ModelProto:
    """x [batch, D] reshaped to rows of 7 (D must be 7: no made-up row's size runs it), times
    2, minus the mean over the rows when ``minus_rows_mean`` (a model working across them)."""
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["d"]),
    ]
    if minus_rows_mean:
        nodes += [
            helper.make_node("ReduceMean", ["d"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["d", "mean"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["d"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "exact_width",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "D"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7])],
        initializer=[
            helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 7]),
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gated_round(
    srv: ServerThread, client: InferenceClient, pool: ThreadPoolExecutor, root: Path, seed: int
) -> None:
    """Four different requests, three of them queued together behind the first: each answer
    must be what onnxruntime gives that request alone."""
    rng = np.random.default_rng(seed)
    requests = [{"x": (rng.standard_normal((1, 7)) * (i + 1)).astype(np.float32)} for i in range(4)]
    with ExecutionGate(srv, "m") as gate:
        head, tail = _queue_behind_gate(
            client, gate, pool, "m", first=requests[0], rest=requests[1:]
        )
        gate.release()
        for feeds, future in zip(requests, [head, *tail], strict=True):
            expected = reference(root / "m" / "1" / "model.onnx", feeds)["y"]
            np.testing.assert_allclose(future.result(60)["y"], expected, rtol=1e-6)


def test_a_model_no_made_up_row_runs_that_works_across_rows_never_mixes_callers(
    tmp_path: Path, start_server: StartServer
) -> None:
    """No made-up row runs a model that needs an exact width, so it was batched on its shapes
    alone, and callers queued together got answers minus everyone's mean. Its requests now
    run alone until a batch of different ones gives each its answer alone: this one's do not,
    and they run alone for good."""
    import json
    import urllib.request

    from ferry.server.grpc.kserve_model import config_of

    root = make_repo(tmp_path / "repo", {"m": _exact_width_model(minus_rows_mean=True)})
    write_config(root, "m", {"instances": {"count": 1}})
    srv = start_server(root)
    assert srv.app is not None
    with InferenceClient(srv.target, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        assert client.model_metadata("m").batching.combine_requests  # until a batch tells
        _gated_round(srv, client, pool, root, seed=1)
        _gated_round(srv, client, pool, root, seed=2)  # still apart once the check has decided
        # Every request its own run (8), and the proof's run of the three together (1): it
        # ran, so it is an execution of 3, as Triton counts one.
        counted = stats(client, "m")
        assert counted.execution_count == 9
        assert counted.batch_sizes == {1: 8, 3: 1}
        assert counted.inference_count == 11
        # Described as it runs, as combine_requests = false is: it was still described as
        # combining requests (ModelConfig's dynamic_batching, ferry.v1's BatchingPolicy).
        meta = client.model_metadata("m")
        batching = meta.batching
        assert batching.max_batch_size > 0 and not batching.combine_requests
        # And why: `ferry models describe` said "(combine_requests = false)", which its config
        # never said.
        assert batching.run_alone_reason.startswith("a batch showed the rows mixing: output")
        described = describe_text(meta)
        assert "each request run alone (a batch showed the rows mixing" in described
        assert "combine_requests = false" not in described
    assert not config_of(srv.app.dataplane.metadata("m")).HasField("dynamic_batching")
    url = f"http://127.0.0.1:{srv.app.http_port}/v2/models/m/config"
    with urllib.request.urlopen(url, timeout=30) as response:
        config = json.loads(response.read())
    assert config["max_batch_size"] > 0 and "dynamic_batching" not in config


def test_a_model_no_made_up_row_runs_is_batched_once_a_real_batch_proves_its_rows_apart(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The same model without the rows' mean: the first batch of different requests runs
    each alone and then together, agrees, and later batches run together."""
    root = make_repo(tmp_path / "repo", {"m": _exact_width_model(minus_rows_mean=False)})
    write_config(root, "m", {"instances": {"count": 1}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        _gated_round(srv, client, pool, root, seed=1)
        assert stats(client, "m").execution_count == 5  # proving: each alone, then together
        _gated_round(srv, client, pool, root, seed=2)
        assert stats(client, "m").execution_count == 7  # the first alone, three together
        assert client.model_metadata("m").batching.combine_requests


def test_combine_requests_false_keeps_the_batch_dimension_and_runs_each_request_alone(
    tmp_path: Path, start_server: StartServer
) -> None:
    """batching.combine_requests = false (Triton: max_batch_size without dynamic_batching):
    requests keep the batch dimension, up to max_batch_size rows each, but never share a run,
    so a model whose answer for a row depends on its run's other rows (the rows' mean here, as
    dynamic int8's one activation scale per run) answers each caller as it would alone."""
    root = make_repo(tmp_path / "repo", {"m": _exact_width_model(minus_rows_mean=True)})
    write_config(
        root,
        "m",
        {"batching": {"max_batch_size": 8, "combine_requests": False}, "instances": {"count": 1}},
    )
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        _gated_round(srv, client, pool, root, seed=3)
        assert stats(client, "m").execution_count == 4
        batching = client.model_metadata("m").batching  # ferry.v1 says it too
        assert (batching.max_batch_size, batching.combine_requests) == (8, False)
        assert batching.run_alone_reason == ""  # the config says so
        two_rows = np.arange(14, dtype=np.float32).reshape(2, 7)  # a request's own rows
        got = client.infer("m", {"x": two_rows})["y"]
        want = reference(root / "m" / "1" / "model.onnx", {"x": two_rows})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    from ferry.server.grpc.kserve_model import config_of

    assert srv.app is not None
    triton = config_of(srv.app.dataplane.metadata("m"))  # what ModelConfig answers
    assert triton.max_batch_size == 8 and not triton.HasField("dynamic_batching")


def _two_held_two_queued(
    srv: ServerThread,
    client: InferenceClient,
    pool: ThreadPoolExecutor,
    root: Path,
    model: str,
    *,
    width: int,
    meet: bool,
) -> None:
    """Two requests hold both instances of ``model`` (instances.count 2), two more queue
    behind them; then all four run. With ``meet``, the two queued ones must run side by side,
    one on each instance: a barrier both must reach (run one after another in one batch, the
    first waits in vain). Every answer is what onnxruntime gives that request alone."""
    import threading

    assert srv.app is not None
    loaded = srv.app.registry.get(model, 1)
    loaded._ns_per_element = float("inf")  # never inline: runs are held on worker threads
    session = loaded.session
    original = session.run
    held, opened = threading.Semaphore(0), threading.Event()
    together = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    calls = [0]

    def run(feeds: dict[str, np.ndarray], names: list[str] | None = None) -> Any:
        with lock:
            calls[0] += 1
            n = calls[0]
        if n <= 2:  # the two runs that hold both instances
            held.release()
            assert opened.wait(WAIT_S)
        elif n <= 4 and meet:  # the two queued behind them: they must run side by side
            together.wait()
        return original(feeds, names)

    session.run = run  # type: ignore[method-assign]
    srv.before_stop(opened.set)
    spec = loaded.inputs[0]
    rng = np.random.default_rng(5)
    requests = [
        {spec.name: (rng.standard_normal((1, width)) * (i + 1)).astype(np.float32)}
        for i in range(4)
    ]
    out = loaded.output_names[0]
    try:
        first = [pool.submit(client.infer, model, feeds) for feeds in requests[:2]]
        for _ in range(2):
            assert held.acquire(timeout=WAIT_S)
        rest = [pool.submit(client.infer, model, feeds) for feeds in requests[2:]]
        wait_for(lambda: stats(client, model).queue_depth == 2, "two requests queued")
        opened.set()
        for feeds, future in zip(requests, [*first, *rest], strict=True):
            expected = reference(root / model / "1" / "model.onnx", feeds)[out]
            np.testing.assert_allclose(future.result(60)[out], expected, rtol=1e-5)
    finally:
        opened.set()
        session.run = original  # type: ignore[method-assign]


def test_requests_run_alone_by_config_each_take_a_free_instance(
    tmp_path: Path, start_server: StartServer
) -> None:
    """With batching.combine_requests = false, the batcher still formed batches of several
    requests and ran them one after another on one instance, while a second one sat idle (and
    a later request of higher priority waited behind the whole batch). Each request is now a
    batch of its own: two queued requests run at once, one on each instance."""
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(
        root,
        "mlp",
        {"batching": {"max_batch_size": 8, "combine_requests": False}, "instances": {"count": 2}},
    )
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        _two_held_two_queued(srv, client, pool, root, "mlp", width=64, meet=True)
        assert stats(client, "mlp").execution_count == 4


def test_requests_run_alone_once_rows_mixed_each_take_a_free_instance(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A model whose rows a real batch showed mixing (b1e6352) runs each request alone for
    good; its batcher went on forming batches of several requests run one after another on
    one instance. Once the rows are found mixing, each request is a batch of its own."""
    root = make_repo(tmp_path / "repo", {"m": _exact_width_model(minus_rows_mean=True)})
    write_config(root, "m", {"instances": {"count": 2}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        # The first batch of two different queued requests proves the rows mixing.
        _two_held_two_queued(srv, client, pool, root, "m", width=7, meet=False)
        _two_held_two_queued(srv, client, pool, root, "m", width=7, meet=True)
        # Every request its own run, and the proof's run of the two queued ones together.
        assert stats(client, "m").execution_count == 9


@pytest.mark.parametrize(
    ("dtype", "short", "long"),
    [
        (
            "FP32",
            np.arange(4, dtype=np.float32).reshape(1, 4),
            np.arange(100_000, dtype=np.float32).reshape(1, 100_000),
        ),
        (
            "BYTES",
            np.array([[b"ab", b"cd"]], dtype=object),
            np.array([[b"x" * 200_000, b"y"]], dtype=object),
        ),
    ],
)
def test_a_long_request_does_not_run_on_the_event_loop(
    tmp_path: Path, start_server: StartServer, dtype: str, short: np.ndarray, long: np.ndarray
) -> None:
    """Quick batches run inline on the event loop, predicted from the cost measured so far.
    That cost was per row, so once short rows ran inline, one row 100,000 elements long (a long
    sequence; on an O(n^2) model, a 24 KB request ran 420 ms) or one 200 KB string (StringSplit
    takes 430 ms on 1 MB) was predicted as cheap as they were and ran inline too, holding every
    other request of every model until it ended. The prediction is per input element, a string
    counting its characters: the long request runs on the execution pool."""
    root = make_repo(tmp_path / "repo", {"id": identity_model(dtype)})
    write_config(root, "id", {"batching": {"max_batch_size": 8}})
    srv = start_server(root)
    assert srv.app is not None
    loaded = srv.app.registry.get("id", 1)
    session = loaded.session
    original = session.run
    inline: list[bool] = []  # each run: on the event loop

    def recorded(feeds: dict[str, np.ndarray], names: list[str] | None = None) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        inline.append(on_loop)
        return original(feeds, names)

    session.run = recorded  # type: ignore[method-assign]
    # As measured once short requests have run: 1 us per input element (a real measurement
    # on a busy host may be anything; the decision, not the clock, is under test).
    loaded._ns_per_element = 1000.0
    with InferenceClient(srv.target, timeout=60) as client:
        assert client.infer("id", {"input": short})["output"].tolist() == short.tolist()
        assert inline == [True]
        assert client.infer("id", {"input": long})["output"].tolist() == long.tolist()
    assert inline == [True, False]
