"""Every request limit is configurable, enforced, and answered with a precise status that names
the limit and its value (RESOURCE_EXHAUSTED for a server limit, INVALID_ARGUMENT for a model's)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from helpers import make_repo
from serverutil import ServerThread

from ferry.client import (
    InferenceClient,
    InvalidInputError,
    LimitExceededError,
    RetryPolicy,
    ServerCancelledError,
)
from ferry.client._errors import from_rpc_error
from ferry.client._requests import build_infer_request
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import model_conversion_pb2 as cpb
from ferry.proto.v1 import model_conversion_pb2_grpc as cpb_grpc
from ferry.server.examples import OPSET, identity_model, mlp_model, two_io_model

LIMITS = {
    "max_message_bytes": 64 * 1024,
    "max_request_elements": 100,
    "max_request_batch_size": 4,
    "max_request_inputs": 1,
    "max_request_outputs": 1,
    "max_upload_bytes": 4096,
    "max_request_bytes_elements": 10,
}
# Local subchannels: two channels to one target must not share one connection (and its streams).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _tile_model() -> onnx.ModelProto:
    """``output = tile(input, [1, 10000])``: each element of the request is 40 KB of answer."""
    from onnx import TensorProto, helper, numpy_helper

    repeats = numpy_helper.from_array(np.array([1, 10_000], np.int64), "repeats")
    graph = helper.make_graph(
        [helper.make_node("Tile", ["input", "repeats"], ["output"])],
        "tile",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "m"])],
        [repeats],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    models = {
        "mlp": mlp_model(),
        "two_io": two_io_model(),
        "bytes": identity_model("UINT8"),
        "text": identity_model("BYTES"),
        "tile": _tile_model(),
    }
    root = make_repo(tmp_path_factory.mktemp("limits") / "repo", models)
    with ServerThread(root, **LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[InferenceClient]:
    with InferenceClient(server.target, timeout=30, retry=RetryPolicy.disabled()) as c:
        yield c


def rows(n: int) -> dict[str, np.ndarray]:
    return {"input": np.zeros((n, 64), np.float32)}


def test_message_size(server: ServerThread) -> None:
    big = build_infer_request("bytes", {"input": np.zeros((1, 70_000), np.uint8)})
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InferenceStub(channel).Infer(big, timeout=30)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(64 * 1024) in info.value.details()


def test_tensor_elements_per_request(client: InferenceClient) -> None:
    assert client.infer("bytes", {"input": np.zeros((1, 100), np.uint8)})["output"].size == 100
    with pytest.raises(LimitExceededError) as info:
        client.infer("mlp", rows(2))  # 128 elements
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_request_elements" in info.value.message and "100" in info.value.message


def test_batch_size_per_request(tmp_path: Path, client: InferenceClient) -> None:
    with pytest.raises(LimitExceededError) as info:
        client.infer("bytes", {"input": np.zeros((5, 1), np.uint8)})
    assert "batch size 5" in info.value.message
    assert "limit of 4" in info.value.message and "max_request_batch_size" in info.value.message
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    with (
        ServerThread(root) as srv,
        InferenceClient(srv.target, timeout=30, retry=RetryPolicy.disabled()) as c,
        pytest.raises(InvalidInputError) as model_limit,
    ):
        c.infer("mlp", rows(33))  # the model's own max_batch_size (32) is INVALID_ARGUMENT
    assert model_limit.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_size 32" in model_limit.value.message


def test_inputs_and_outputs_per_request(client: InferenceClient) -> None:
    feeds = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.int64)}
    with pytest.raises(LimitExceededError) as info:
        client.infer("two_io", feeds)
    assert "2 inputs" in info.value.message and "limit of 1" in info.value.message
    assert "max_request_inputs" in info.value.message
    with pytest.raises(LimitExceededError) as info:
        client.infer("bytes", {"input": np.zeros((1, 2), np.uint8)}, outputs=["output", "output"])
    assert "max_request_outputs" in info.value.message and "limit of 1" in info.value.message


def test_ferry_v1_refuses_too_many_inputs_before_reading_any(server: ServerThread) -> None:
    """The count is judged before any input is decoded (as the Open Inference Protocol's
    decoder does): the first input's unknown dtype and the duplicate name are never read."""
    request = pb.InferRequest(model="two_io")
    request.inputs.add(name="a", dtype=99, shape=[1, 4], data=bytes(16))  # type: ignore[arg-type]
    request.inputs.add(name="a", dtype=9, shape=[1, 4], data=bytes(32))  # type: ignore[arg-type]
    request.outputs.extend(["sum", "sum"])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(request, timeout=30)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "2 inputs is over the limit of 1" in (info.value.details() or "")
        del request.inputs[1]
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(request, timeout=30)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "max_request_outputs" in (info.value.details() or "")


def test_open_inference_protocol_shares_the_limits(server: ServerThread) -> None:
    request = kpb.ModelInferRequest(
        model_name="bytes",
        inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 101])
        ],
        raw_input_contents=[bytes(101)],
    )
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=kpb.ModelInferRequest.SerializeToString,
            response_deserializer=kpb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            infer(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_request_elements" in info.value.details()


def test_bytes_elements_per_request(server: ServerThread, client: InferenceClient) -> None:
    """Each BYTES element becomes Python objects built one by one on the event loop (80 MB of
    one-byte strings, well under max_request_elements, peaked at 4.4 GB and held every other
    request for tens of seconds): max_request_bytes_elements refuses more on the declared shape,
    in every protocol, before they are decoded."""
    ten = np.full((1, 10), b"a", dtype=object)
    assert list(client.infer("text", {"input": ten})["output"].reshape(-1)) == [b"a"] * 10
    eleven = np.full((1, 11), b"a", dtype=object)
    with pytest.raises(LimitExceededError) as info:
        client.infer("text", {"input": eleven})
    assert "max_request_bytes_elements" in info.value.message and "10" in info.value.message
    request = kpb.ModelInferRequest(
        model_name="text",
        inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[1, 11])
        ],
        raw_input_contents=[b"\x01\x00\x00\x00a" * 11],
    )
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=kpb.ModelInferRequest.SerializeToString,
            response_deserializer=kpb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as rpc:
            infer(request, timeout=30)
    assert rpc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_request_bytes_elements" in rpc.value.details()
    tensor = {"name": "input", "datatype": "BYTES", "shape": [1, 11], "data": ["a"] * 11}
    body = json.dumps({"inputs": [tensor]}).encode()
    http = urllib.request.Request(f"http://{server.http_target}/v2/models/text/infer", data=body)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(http, timeout=30)
    assert refused.value.code == 400
    assert "max_request_bytes_elements" in json.load(refused.value)["error"]


def test_an_answer_over_the_message_limit_fails_its_request_only(
    server: ServerThread, client: InferenceClient
) -> None:
    """A request within max_message_bytes whose answer is over it (the model's outputs are
    larger than its inputs) is refused with the limit named; on a stream the other requests
    are still answered. grpc's core refused the send itself: a unary call got "Sent message
    larger than max", and a stream ended, failing every request still on it."""
    small = {"input": np.ones((1, 1), np.float32)}  # 40 KB out
    big = {"input": np.ones((1, 2), np.float32)}  # 80 KB out, over the 64 KiB limit
    with pytest.raises(LimitExceededError) as info:
        client.infer("tile", big)
    assert "response" in info.value.message and "max_message_bytes" in info.value.message
    with client.stream("tile") as stream:
        for rid, inputs in (("a", small), ("b", big), ("c", small)):
            stream.submit(inputs, rid)
        stream.close()
        answers = dict(stream.results())
    assert isinstance(answers["b"], LimitExceededError)
    assert answers["a"]["output"].shape == answers["c"]["output"].shape == (1, 10_000)

    def request(rid: str, n: int) -> kpb.ModelInferRequest:
        tensor = kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, n])
        return kpb.ModelInferRequest(
            model_name="tile", id=rid, inputs=[tensor], raw_input_contents=[bytes(4 * n)]
        )

    with grpc.insecure_channel(server.target) as channel:
        infer = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=kpb.ModelInferRequest.SerializeToString,
            response_deserializer=kpb.ModelStreamInferResponse.FromString,
        )
        answers_oip = list(infer(iter([request("a", 1), request("b", 2)]), timeout=30))
    by_id = {a.infer_response.id: a for a in answers_oip}
    assert "RESOURCE_EXHAUSTED" in by_id["b"].error_message
    assert "max_message_bytes" in by_id["b"].error_message
    assert not by_id["a"].error_message and len(by_id["a"].infer_response.raw_output_contents) == 1


def test_a_long_request_id_fails_its_own_request_only_on_a_stream(server: ServerThread) -> None:
    """An answer repeats its request's id (a stream's error answer too, and the OIP's its model
    name and version): with an id near max_message_bytes grpc's core refused to send the error
    answer, ending the stream with "Sent message larger than max" and every request on it.
    Such an answer now goes without the echo, saying what to shorten; the others are answered."""
    limit = LIMITS["max_message_bytes"]
    good = pb.InferRequest(model="bytes", id="ok")
    good.inputs.add(name="input", dtype=2, shape=[1, 1], data=b"\x07")  # type: ignore[arg-type]
    near = pb.InferRequest(model="nope", id="i" * (limit - 100))
    twice = pb.InferRequest(model="bytes", id="t" * (limit // 2 + 10))  # sent back twice
    twice.inputs.add(name="input", dtype=2, shape=[1, 1], data=b"\x07")  # type: ignore[arg-type]
    oip_good = kpb.ModelInferRequest(model_name="bytes", id="ok")
    oip_good.inputs.add(name="input", datatype="UINT8", shape=[1, 1])
    oip_good.raw_input_contents.append(b"\x07")
    oip_near = kpb.ModelInferRequest(model_name="nope", id="i" * (limit - 100))
    with grpc.insecure_channel(server.target) as channel:
        stream = channel.stream_stream(
            "/ferry.v1.Inference/InferStream",
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferStreamResponse.FromString,
        )
        answers = list(stream(iter([near, twice, good]), timeout=30))
        oip_stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=kpb.ModelInferRequest.SerializeToString,
            response_deserializer=kpb.ModelStreamInferResponse.FromString,
        )
        oip_answers = list(oip_stream(iter([oip_near, oip_good]), timeout=30))
    by_id = {a.id: a for a in answers}
    assert set(by_id) == {"", twice.id, "ok"}
    assert by_id[""].error.kind == "LIMIT_EXCEEDED"
    assert "send a shorter id" in by_id[""].error.message, by_id[""].error.message
    assert "repeats the request's id" in by_id[twice.id].error.message
    assert by_id["ok"].response.outputs[0].data == b"\x07"
    first, second = oip_answers
    assert first.error_message.startswith("[StatusCode.RESOURCE_EXHAUSTED]")
    assert "send a shorter model name, version and id" in first.error_message
    assert not second.error_message and second.infer_response.raw_output_contents == [b"\x07"]


def test_upload_size(server: ServerThread) -> None:
    """Implemented by the conversion service; verified here: refused from the header's declared
    size before any byte is sent, and while receiving when the header understates it."""
    header = cpb.UploadHeader(model="m", format=cpb.SOURCE_FORMAT_ONNX)
    with grpc.insecure_channel(server.management_target) as channel:
        stub = cpb_grpc.ModelConversionStub(channel)
        declared = cpb.UploadHeader()
        declared.CopyFrom(header)
        declared.size_bytes = 5000
        for messages in (
            [cpb.UploadModelRequest(header=declared)],
            [cpb.UploadModelRequest(header=header)]
            + [cpb.UploadModelRequest(chunk=bytes(1024)) for _ in range(5)],
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.UploadModel(iter(messages), timeout=30)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "4096" in info.value.details()


def test_concurrent_streams_per_connection(tmp_path: Path) -> None:
    """gRPC enforces max_concurrent_streams in HTTP/2: a call beyond it is not refused but held
    by the client until a stream frees, so a greedy client slows itself, not the server."""
    root = make_repo(tmp_path / "repo", {"fixed": identity_model("FP32", (3,))})
    one = build_infer_request("fixed", {"input": np.zeros(3, np.float32)}, request_id="x")
    with (
        ServerThread(root, max_concurrent_streams=1) as srv,
        grpc.insecure_channel(srv.target, options=OWN_CONNECTION) as channel,
    ):
        stub = pb_grpc.InferenceStub(channel)
        held = _OpenStream(stub)
        try:
            assert held.first_answer().id == "x"  # stream 1 is open and active
            with pytest.raises(grpc.RpcError) as info:
                list(stub.InferStream(iter([one]), timeout=1.0))
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # waited, not refused
            with grpc.insecure_channel(srv.target, options=OWN_CONNECTION) as other:
                (answer,) = pb_grpc.InferenceStub(other).InferStream(iter([one]), timeout=30)
                assert answer.id == "x"  # another connection has its own streams
        finally:
            held.close()
        (answer,) = stub.InferStream(iter([one]), timeout=30)  # the slot is free again
        assert answer.id == "x"


class _OpenStream:
    """An InferStream kept open by a request iterator that blocks until ``close``."""

    def __init__(self, stub: pb_grpc.InferenceStub) -> None:
        self._done = threading.Event()
        request = build_infer_request("fixed", {"input": np.zeros(3, np.float32)}, request_id="x")

        def requests() -> Iterator[pb.InferRequest]:
            yield request
            self._done.wait(60)

        self._call = stub.InferStream(requests(), timeout=60)

    def first_answer(self) -> pb.InferStreamResponse:
        return next(self._call)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._done.set()
        for _ in self._call:
            pass


@pytest.mark.parametrize("max_pending", [0, 2])
def test_pending_calls_bound(tmp_path: Path, max_pending: int) -> None:
    """While the event loop cannot take calls, grpc's core holds them; with max_pending_calls
    set, calls beyond it are refused at arrival without the loop (grpc answers CANCELLED), and
    the ones it held are answered once the loop runs. Unset, every call waits and is answered."""
    root = make_repo(tmp_path / "repo", {"fixed": identity_model("FP32", (3,))})
    one = build_infer_request("fixed", {"input": np.zeros(3, np.float32)}, request_id="x")
    calls = 8
    with (
        ServerThread(root, max_pending_calls=max_pending) as srv,
        grpc.insecure_channel(srv.target, options=OWN_CONNECTION) as channel,
    ):
        stub = pb_grpc.InferenceStub(channel)
        assert stub.Infer(one, timeout=30).id == "x"  # connected, and the loop takes calls
        gate = threading.Event()
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            gate.wait(60)

        srv.before_stop(gate.set)
        srv.loop.call_soon_threadsafe(block)
        assert blocked.wait(30)
        try:
            pending = [stub.Infer.future(one, timeout=60) for _ in range(calls)]
            if max_pending:
                # Refusals come while the loop is still blocked: only grpc's core can send them.
                refused = _first_done(pending, calls - max_pending - 1)
                for call in refused:
                    assert call.code() is grpc.StatusCode.CANCELLED
                    # The SDK tells grpc's reset from its own cancel by these details, and
                    # retries it.
                    assert isinstance(from_rpc_error(call.exception()), ServerCancelledError)
                assert not gate.is_set()
        finally:
            gate.set()
        codes = [call.code() for call in pending]
        ok = codes.count(grpc.StatusCode.OK)
        if max_pending:
            assert ok >= 1 and codes.count(grpc.StatusCode.CANCELLED) == calls - ok
            assert ok <= max_pending + 1  # the ones grpc held, plus one the loop had asked for
        else:
            assert ok == calls
        assert stub.Infer(one, timeout=30).id == "x"  # and the listener serves as before


def _first_done(calls: list[grpc.Future], n: int) -> list[grpc.Future]:
    """The first ``n`` of ``calls`` to finish, waiting on their completion callbacks."""
    done: list[grpc.Future] = []
    cond = threading.Condition()

    def finished(call: grpc.Future) -> None:
        with cond:
            done.append(call)
            cond.notify_all()

    for call in calls:
        call.add_done_callback(finished)
    with cond:
        assert cond.wait_for(lambda: len(done) >= n, timeout=30), f"{len(done)} of {n} refused"
        return list(done[:n])


def test_a_connection_past_its_max_age_is_sent_goaway(tmp_path: Path) -> None:
    """Triton's --grpc-max-connection-age: a client's one HTTP/2 connection was kept for good,
    so long-lived clients never reached replicas added since. Past the age the server sends
    GOAWAY and the channel goes IDLE (it reconnects on its next call), on both listeners."""
    with ServerThread(tmp_path / "repo", grpc_max_connection_age=200) as srv:
        for target in (srv.target, srv.management_target):
            ended, states = _idle_after_ready(target)
            assert ended, (target, states)


def _idle_after_ready(target: str) -> tuple[bool, list[grpc.ChannelConnectivity]]:
    """Whether a fresh channel to ``target`` went IDLE after READY (the server ended the
    connection) within 30 s, and the states it went through."""
    states: list[grpc.ChannelConnectivity] = []
    idle_again = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state is grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
            idle_again.set()

    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        channel.subscribe(seen, try_to_connect=True)
        idle_again.wait(30)
        channel.unsubscribe(seen)
    return idle_again.is_set(), states
