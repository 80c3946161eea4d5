"""A server stop with inference streams open: each stream reads no more, answers what it read,
and ends UNAVAILABLE saying so, rather than being served until the grace period runs out and
then cut with the requests it was running unanswered."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import ExecutionGate, StartServer, wait_for

from ferry.client import InferenceClient, InferResult, UnavailableError
from ferry.codec import encode_tensor
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.v1 import inference_pb2 as pb

GRACE_S = 60.0  # far longer than any test waits: the streams must end before it


def batch(value: float) -> dict[str, np.ndarray]:
    return {"input": np.full((2, 64), value, dtype=np.float32)}


def _stopping(srv: Any) -> Any:
    """Begin the server's stop without opening the gate (ServerThread.stop would)."""
    app = srv.app
    stopped = srv.submit(lambda: app.stop(GRACE_S))
    wait_for(lambda: not app.dataplane.ready(), "the server to begin draining")
    return stopped


def test_a_ferry_stream_answers_what_it_read_and_ends_unavailable_at_stop(
    start_server: StartServer, repo_path: Any
) -> None:
    srv = start_server(repo_path, grace_period=GRACE_S)
    with ExecutionGate(srv, "mlp") as gate, InferenceClient(srv.target, timeout=30) as client:
        stream = client.stream("mlp")
        running = stream.submit(batch(1.0), "running")
        gate.wait_entered()
        stopped = _stopping(srv)
        late = stream.submit(batch(2.0), "late")  # sent after the stop began: not read
        gate.release()
        answers = dict(stream.results())
        assert isinstance(answers[running], InferResult)  # read before the stop: answered
        error = answers[late]
        assert isinstance(error, UnavailableError)
        assert "shutting down" in str(error) and "send them again" in str(error)
        assert gate.calls == 1  # the late request never ran
        stopped.result(GRACE_S / 2)  # the stream did not hold the stop


def test_an_oip_stream_left_open_ends_unavailable_at_stop(
    start_server: StartServer, repo_path: Any
) -> None:
    srv = start_server(repo_path, grace_period=GRACE_S)
    request = kpb.ModelInferRequest(model_name="mlp", id="held")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([2, 64])
    request.raw_input_contents.append(batch(1.0)["input"].tobytes())
    more: queue.SimpleQueue[None] = queue.SimpleQueue()

    def requests() -> Iterator[kpb.ModelInferRequest]:
        yield request
        more.get()  # the client keeps its stream open, as tritonclient's start_stream does

    with (
        ExecutionGate(srv, "mlp") as gate,
        grpc.insecure_channel(srv.target) as channel,
    ):
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=kpb.ModelInferRequest.SerializeToString,
            response_deserializer=kpb.ModelStreamInferResponse.FromString,
        )(requests(), timeout=30)
        gate.wait_entered()
        stopped = _stopping(srv)
        gate.release()
        answer = next(call)
        assert answer.error_message == "" and answer.infer_response.id == "held"
        try:
            next(call)
            raise AssertionError("the stream went on after the stop")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (exc.details() or "")
        finally:
            more.put(None)
        stopped.result(GRACE_S / 2)


def test_a_half_closed_stream_is_answered_in_full_and_ends_ok_at_stop(
    start_server: StartServer, repo_path: Any
) -> None:
    """A client that sent its requests and half-closed, with the server still running them
    when its stop began: the request the stream had read but held for a slot
    (--max-stream-in-flight) was dropped and the stream cut UNAVAILABLE, as if the client had
    more to send. The stream now runs what it read, reads on while those run, sees the
    half-close and ends OK with every request answered. Two models, each held by its own
    gate, order it: the half-close is read while the second request is held."""
    seen: list[str] = []  # ids the stream's reader took, then "EOF" (the server's loop writes)

    def spy(app: Any) -> None:
        original = app.dataplane.stream

        def stream(requests: Any, respond: Any, **options: Any) -> Any:
            async def reading() -> Any:
                async for msg in requests:
                    seen.append(msg.id)
                    yield msg
                seen.append("EOF")

            return original(reading(), respond, **options)

        app.dataplane.stream = stream

    srv = start_server(repo_path, spy, grace_period=GRACE_S, max_stream_in_flight=1)
    first = pb.InferRequest(model="mlp", id="first")
    first.inputs.append(encode_tensor("input", batch(1.0)["input"]))
    second = pb.InferRequest(model="fixed", id="second")
    second.inputs.append(encode_tensor("input", np.ones(3, np.float32)))
    with (
        ExecutionGate(srv, "mlp") as held_first,
        ExecutionGate(srv, "fixed") as held_second,
        grpc.insecure_channel(srv.target) as channel,
    ):
        call = channel.stream_stream(
            "/ferry.v1.Inference/InferStream",
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferStreamResponse.FromString,
        )(iter([first, second]), timeout=30)  # both sent, then the half-close
        held_first.wait_entered()
        wait_for(lambda: seen == ["first", "second"], "the second request to wait for a slot")
        stopped = _stopping(srv)
        held_first.release()
        held_second.wait_entered()  # the request read before the stop runs
        wait_for(lambda: seen[-1:] == ["EOF"], "the stream to read the half-close")
        held_second.release()
        answers = {answer.id: answer for answer in call}  # ends without an error
        assert call.code() == grpc.StatusCode.OK
        assert sorted(answers) == ["first", "second"]
        assert not any(answer.HasField("error") for answer in answers.values())
        stopped.result(GRACE_S / 2)


def test_a_half_close_still_on_its_way_when_an_idle_stream_stops_ends_it_ok(
    start_server: StartServer, repo_path: Any, monkeypatch: Any
) -> None:
    """A client that was answered and half-closed, its half-close not yet read by the server
    when the stop began (in flight on the network, or waiting in grpc's core for the event
    loop): the stream, running nothing, was cut UNAVAILABLE at once, as if the client had more
    to send, and a client iterating its answers got an error after the last one. The stream now
    goes on reading for a moment (``HALF_CLOSE_S``) and ends OK when the half-close comes. The
    half-close is held on the server's side until the stop began, so the race is the same on
    every run; the moment is made long enough for the test's release (never reached)."""
    from ferry.server.core import streams

    monkeypatch.setattr(streams, "HALF_CLOSE_S", GRACE_S / 2)
    held: dict[str, Any] = {}
    seen: list[str] = []

    def spy(app: Any) -> None:
        original = app.dataplane.stream

        def stream(requests: Any, respond: Any, **options: Any) -> Any:
            async def reading() -> Any:
                async for msg in requests:
                    seen.append(msg.id)
                    yield msg
                seen.append("EOF")
                held["release"] = release = asyncio.Event()
                await release.wait()  # the half-close, not yet read

            return original(reading(), respond, **options)

        app.dataplane.stream = stream

    srv = start_server(repo_path, spy, grace_period=GRACE_S)
    request = pb.InferRequest(model="fixed", id="only")
    request.inputs.append(encode_tensor("input", np.ones(3, np.float32)))
    with grpc.insecure_channel(srv.target) as channel:
        call = channel.stream_stream(
            "/ferry.v1.Inference/InferStream",
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferStreamResponse.FromString,
        )(iter([request]), timeout=30)  # sent, then the half-close
        answer = next(call)
        assert answer.id == "only" and not answer.HasField("error")
        wait_for(lambda: seen == ["only", "EOF"], "the half-close to reach the stream")
        stopped = _stopping(srv)
        srv.loop.call_soon_threadsafe(held["release"].set)
        assert list(call) == []  # ends without an error
        assert call.code() == grpc.StatusCode.OK
        stopped.result(GRACE_S / 2)


def test_an_idle_stream_left_open_ends_unavailable_within_a_short_grace_period(
    start_server: StartServer, repo_path: Any, monkeypatch: Any
) -> None:
    """A stream running nothing reads for its client's half-close for a moment
    (``HALF_CLOSE_S``) at the stop; with a grace period shorter than that moment, a stream its
    client kept open was cut at the grace's end by grpc ("Cancelling all calls", the SDK's
    ConnectionError_), not ended with the stream's own UNAVAILABLE saying to send again. The
    moment is made far longer than the grace here, so only its bound by the grace ends it."""
    from ferry.server.core import streams

    monkeypatch.setattr(streams, "HALF_CLOSE_S", GRACE_S)
    grace = 4.0  # the stream ends at half of it, well before grpc's cut
    srv = start_server(repo_path, grace_period=grace)
    with InferenceClient(srv.target, timeout=30) as client:
        stream = client.stream("mlp")
        rid = stream.submit(batch(1.0), "answered")
        first = next(iter(stream.results()))
        assert first[0] == rid and isinstance(first[1], InferResult)
        app = srv.app
        stopped = srv.submit(lambda: app.stop(grace))
        wait_for(lambda: not app.dataplane.ready(), "the server to begin draining")
        stopped.result(GRACE_S / 2)  # the stream ended before it, or was cut at its end
        with pytest.raises(UnavailableError) as ended:  # the stream's end, for what follows
            stream.submit(batch(2.0), "after")
        assert "shutting down" in str(ended.value) and "send them again" in str(ended.value)
