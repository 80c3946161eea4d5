"""A run that onnxruntime refuses for a request's values: that request's INVALID_ARGUMENT, and
only that request's, even when it was batched with others.

A token id past an embedding's table fails the Gather: onnxruntime raises InvalidArgument. It was
answered INTERNAL ("see the server log"), and every request batched with it failed the same way,
so one client's bad id failed other clients' good requests. An ``ExecutionGate`` holds the single
instance so that good and bad requests queue and run as one batch (a state the test sets up, not a
timing).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from helpers import ExecutionGate, StartServer, make_repo, stats, wait_for, write_config
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from ferry.client import DeadlineExceededError, InferenceClient, InvalidInputError, RetryPolicy
from ferry.server.batching.batcher import BatchInfo

TABLE = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)


def table_model() -> onnx.ModelProto:
    """ids [batch, 3] (INT64) -> rows of a 100 x 4 table [batch, 3, 4], as nn.Embedding is."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "table",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 3, 4])],
        initializer=[numpy_helper.from_array(TABLE, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def served(tmp_path: Path, start_server: StartServer):  # type: ignore[no-untyped-def]
    root = make_repo(tmp_path / "repo", {"table": table_model()})
    write_config(root, "table", {"batching": {"max_batch_size": 16}, "instances": {"count": 1}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60, retry=RetryPolicy.disabled()) as client:
        yield srv, client


def test_a_value_the_model_refuses_is_invalid_argument_on_every_protocol(served) -> None:  # type: ignore[no-untyped-def]
    srv, client = served
    with pytest.raises(InvalidInputError) as refused:
        client.infer("table", {"ids": np.array([[1, 500, 2]], np.int64)})
    assert "the model cannot run on this request's shapes or values" in str(refused.value)
    assert "Gather" in str(refused.value)  # onnxruntime's words name the node and the bound
    req = kpb.ModelInferRequest(model_name="table")
    t = req.inputs.add()
    t.name, t.datatype = "ids", "INT64"
    t.shape.extend([1, 3])
    req.raw_input_contents.append(np.array([[1, 500, 2]], np.int64).tobytes())
    with grpc.insecure_channel(srv.target) as channel, pytest.raises(grpc.RpcError) as rpc:
        kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    good = client.infer("table", {"ids": np.array([[1, 99, 2]], np.int64)})["rows"]
    np.testing.assert_array_equal(good, TABLE[[[1, 99, 2]]])


def test_a_refused_run_writes_nothing_past_the_servers_log(served, capfd) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime printed each refused run to stderr as an ERROR line (past logging and
    --log-format json): one per bad request, which any client can send in a loop."""
    _, client = served
    capfd.readouterr()
    for _ in range(3):
        with pytest.raises(InvalidInputError):
            client.infer("table", {"ids": np.array([[1, 500, 2]], np.int64)})
    assert "Non-zero status code" not in capfd.readouterr().err


def test_a_bad_request_fails_alone_in_its_batch(served) -> None:  # type: ignore[no-untyped-def]
    srv, client = served
    ids = [np.array([[i, i + 1, 500 if i % 2 else 3]], np.int64) for i in range(8)]
    with ExecutionGate(srv, "table") as gate, ThreadPoolExecutor(9) as pool:
        held = pool.submit(client.infer, "table", {"ids": ids[0]})
        gate.wait_entered()
        queued = [pool.submit(client.infer, "table", {"ids": x}) for x in ids]
        wait_for(lambda: stats(client, "table").queue_depth == len(ids), "all of them queued")
        gate.release()
        np.testing.assert_array_equal(held.result(60)["rows"], TABLE[ids[0]])
        for i, (x, future) in enumerate(zip(ids, queued, strict=True)):
            if i % 2:
                with pytest.raises(
                    InvalidInputError, match="cannot run on this request's shapes or values"
                ):
                    future.result(60)
            else:
                np.testing.assert_array_equal(future.result(60)["rows"], TABLE[x])
    # The eight ran as one batch, which failed, then one by one: 1 + 1 + 8 runs.
    assert gate.calls == 10
    # Statistics count what succeeded, as Triton's do: the held run and the four good ones
    # alone are five executions of one row each; the failed batch of eight is no execution,
    # and its four bad rows no inferences (it was counted as one execution of eight).
    s = stats(client, "table")
    assert (s.execution_count, s.inference_count, s.batch_sizes) == (5, 5, {1: 5})
    assert (s.success.count, s.fail.count, s.compute_infer.count) == (5, 4, 5)
    # Queue time is the successful requests' alone (Triton's): perf_analyzer divides it by the
    # success count, and the four refused rows' waits were in it (queue.count 9).
    assert s.queue.count == 5


def test_a_caller_gone_while_its_batch_failed_is_not_run_again_alone(served) -> None:  # type: ignore[no-untyped-def]
    """A failed batch runs again one request at a time, so each gets its own answer. A caller
    whose deadline ended the call while the batch ran has no answer to get: its rows ran alone
    all the same (one more execution of work nobody waited for, counted in the statistics).
    The first run (held) keeps the instance busy while three requests queue; the second (their
    batch) is held until the server has seen the short-deadline caller leave."""
    srv, client = served
    loaded = srv.app.registry.get("table", 1)
    loaded._ns_per_element = float("inf")  # runs on the workers, where it can be held
    session = loaded.session
    original = session.run
    holds = [threading.Event(), threading.Event()]
    entered = [threading.Event(), threading.Event()]
    runs: list[np.ndarray] = []
    lock = threading.Lock()

    def held_run(feeds: dict[str, np.ndarray], names: list[str] | None = None) -> object:
        with lock:
            n = len(runs)
            runs.append(feeds["ids"])
        if n < 2:
            entered[n].set()
            assert holds[n].wait(60), "never released"
        return original(feeds, names)

    session.run = held_run
    infos: list[BatchInfo] = []
    handler = loaded.batcher._handler

    async def recording(items: Sequence[object], info: BatchInfo) -> Sequence[object]:
        infos.append(info)
        return await handler(items, info)

    loaded.batcher._handler = recording
    srv.before_stop(lambda: [h.set() for h in holds])
    good, bad, gone = (np.array([[i, 1, 2]], np.int64) for i in (3, 4, 5))
    bad[0, 1] = 500
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.infer, "table", {"ids": good})
        assert entered[0].wait(60)
        leaving = pool.submit(client.infer, "table", {"ids": gone}, timeout=1.0)
        wait_for(lambda: stats(client, "table").queue_depth == 1, "the short one queued")
        ok = pool.submit(client.infer, "table", {"ids": good})
        refused = pool.submit(client.infer, "table", {"ids": bad})
        wait_for(lambda: stats(client, "table").queue_depth == 3, "all three queued")
        holds[0].set()
        assert entered[1].wait(60)  # the three run as one batch, held
        with pytest.raises(DeadlineExceededError):
            leaving.result(60)
        # The server's side of the call's end: the batch's record of its callers (how the
        # call ended, by its deadline or by the client, is not what this is about).
        wait_for(
            lambda: len(infos) == 2 and infos[1].left is not None and infos[1].left()[0],
            "the server saw the caller leave",
        )
        holds[1].set()
        np.testing.assert_array_equal(first.result(60)["rows"], TABLE[good])
        np.testing.assert_array_equal(ok.result(60)["rows"], TABLE[good])
        with pytest.raises(InvalidInputError):
            refused.result(60)
    # The held run, the batch of three (failed), then the two whose callers wait, alone.
    assert [r[0, 0] for r in runs[2:]] == [3, 4]
    s = stats(client, "table")
    assert (s.execution_count, s.inference_count) == (2, 2)


def test_a_request_the_model_refuses_adds_no_queue_time(served) -> None:  # type: ignore[no-untyped-def]
    """A lone request the model fails to run is a failure only: its queue wait was counted, so
    queue.count exceeded the successes and perf_analyzer's average queue time (queue ns over
    successful requests) grew with every refused request."""
    _, client = served
    client.infer("table", {"ids": np.array([[1, 2, 3]], np.int64)})
    for _ in range(2):
        with pytest.raises(InvalidInputError):
            client.infer("table", {"ids": np.array([[1, 500, 2]], np.int64)})
    s = stats(client, "table")
    assert (s.success.count, s.fail.count) == (1, 2)
    assert (s.queue.count, s.compute_infer.count, s.execution_count) == (1, 1, 1)


def reshape_model() -> onnx.ModelProto:
    """x [batch, 3] -> a Reshape to [-1, 12] summed: runs on 4, 8, ... rows and fails (FAIL,
    not INVALID_ARGUMENT, in onnxruntime's words) on any other count, as a graph exported at
    one sequence length fails at another."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("ReduceSum", ["r", "axes"], ["y"], keepdims=1),
        ],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        initializer=[
            numpy_helper.from_array(np.array([-1, 12], np.int64), "shape"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_kernel_failure_on_a_requests_shape_is_invalid_argument(
    tmp_path: Path, start_server: StartServer
) -> None:
    """onnxruntime's FAIL from a kernel (here a Reshape) was answered INTERNAL."""
    root = make_repo(tmp_path / "repo", {"reshape": reshape_model()})
    write_config(root, "reshape", {"batching": {"max_batch_size": 0}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=60, retry=RetryPolicy.disabled()) as client:
        with pytest.raises(InvalidInputError, match="cannot run on this request's shapes") as e:
            client.infer("reshape", {"x": np.ones((1, 3), np.float32)})
        assert "Reshape" in str(e.value) and "see the server log" not in str(e.value)
        assert client.infer("reshape", {"x": np.ones((4, 3), np.float32)})["y"].tolist() == [[12.0]]


def test_a_run_out_of_memory_is_a_limit_not_the_requests_values() -> None:
    """onnxruntime reports an allocation failure as FAIL, which read as a malformed request."""
    import onnxruntime as ort

    from ferry.server.errors import InvalidInput, LimitExceeded
    from ferry.server.runtime.run_errors import refused_input

    fail = ort.capi.onnxruntime_pybind11_state.Fail
    oom = refused_input(
        fail(
            "[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer of "
            "size 360000000000"
        )
    )
    assert isinstance(oom, LimitExceeded) and "ran out of memory" in oom.message
    reshape = refused_input(fail("[ONNXRuntimeError] : 1 : FAIL : Reshape: cannot reshape"))
    assert isinstance(reshape, InvalidInput) and reshape.message.startswith(
        "the model cannot run on this request's shapes or values: Reshape"
    )
