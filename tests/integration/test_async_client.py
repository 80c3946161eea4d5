"""AsyncInferenceClient against a real server, and the transport options both clients share
(retries, tokens, TLS, round-robin) against scripted servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from ferry.client import (
    AsyncInferenceClient,
    CancelledError,
    ClientClosedError,
    ConnectionError_,
    FerryError,
    InferenceClient,
    InferResult,
    InvalidInputError,
    LimitExceededError,
    ModelNotFoundError,
    RetryPolicy,
    ServerOverloadedError,
    TLSConfig,
)
from ferry.codec import encode_tensor
from ferry.proto.v1 import inference_pb2 as pb

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.002)


class ScriptedServer:
    """``ferry.v1.Inference`` Infer/InferStream on 127.0.0.1:0 that fails the first calls as
    scripted, then answers; it records every call's metadata."""

    def __init__(
        self,
        failures: list[tuple[grpc.StatusCode, str]] | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.failures = list(failures or [])
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handlers = {
            "Infer": grpc.unary_unary_rpc_method_handler(
                self._infer,
                request_deserializer=pb.InferRequest.FromString,
                response_serializer=pb.InferResponse.SerializeToString,
            ),
            "InferStream": grpc.stream_stream_rpc_method_handler(
                self._stream,
                request_deserializer=pb.InferRequest.FromString,
                response_serializer=pb.InferStreamResponse.SerializeToString,
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("ferry.v1.Inference", handlers),)
        )
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def _response(request: pb.InferRequest) -> pb.InferResponse:
        out = encode_tensor("echo_count", np.array([len(request.inputs)], np.int64))
        return pb.InferResponse(model=request.model, version=7, id=request.id, outputs=[out])

    def _infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        with self._lock:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            code, kind = failure
            if kind:
                context.set_trailing_metadata((("ferry-error", kind),))
            context.abort(code, f"scripted {code.name}")
        return self._response(request)

    def _stream(self, requests: Iterator[pb.InferRequest], context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.metadata.append(dict(context.invocation_metadata()))
        for request in requests:
            yield pb.InferStreamResponse(id=request.id, response=self._response(request))

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture
def scripted() -> Iterator[type[ScriptedServer]]:
    servers: list[ScriptedServer] = []

    class Tracked(ScriptedServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    yield Tracked
    for s in servers:
        s.stop()


X = {"input": np.ones((2, 64), np.float32)}


# --- the async client against the real server --------------------------------------------------


def test_async_client_answers_like_the_sync_one(server: Any) -> None:
    with InferenceClient(server.target, timeout=30) as sync:
        expected = sync.infer("mlp", X)
        sync_meta = sync.model_metadata("mlp")
        sync_models = sync.list_models()

    async def main() -> None:
        async with AsyncInferenceClient(server.target, timeout=30) as client:
            result = await client.infer("mlp", X, request_id="abc")
            assert result.id == "abc" and result.model == "mlp" and result.version == 1
            np.testing.assert_allclose(result["logits"], expected["logits"], rtol=1e-6)
            assert not result["logits"].flags.writeable  # decoded without a copy
            assert result.timings.rpc > 0 and result.timings.total >= result.timings.rpc
            assert await client.model_metadata("mlp") == sync_meta
            assert await client.list_models() == sync_models
            stats = await client.statistics("mlp")
            assert stats[0].name == "mlp" and stats[0].success.count >= 2
            assert await client.ready() and await client.ready("mlp")
            assert not await client.ready("no_such_model")
            with pytest.raises(ModelNotFoundError):
                await client.infer("no_such_model", X)
            with pytest.raises(InvalidInputError):
                await client.infer("mlp", {"input": np.ones((2, 3), np.float32)})

    asyncio.run(main())


def test_async_client_built_outside_the_loop_works_inside_it(server: Any) -> None:
    client = AsyncInferenceClient(server.target, timeout=30)

    async def main() -> int:
        try:
            result = await client.infer("two_io", {"a": [[1.0, 2, 3, 4]], "b": [[1, 2, 3, 4]]})
            return int(result["scaled"][0, 3])
        finally:
            await client.close()

    assert asyncio.run(main()) == 12


def test_an_async_client_serves_one_asyncio_run_after_another(server: Any) -> None:
    """The channel stayed bound to the first run's loop: the second asyncio.run raised
    RuntimeError ("Event loop is closed")."""
    client = AsyncInferenceClient(server.target, timeout=30)
    x = {"input": np.zeros((1, 64), np.float32)}

    async def once() -> str:
        return (await client.infer("mlp", x)).model

    async def streamed() -> list[str]:
        async with client.stream("mlp") as stream:
            await stream.submit(x)
            return [type(answer).__name__ async for _, answer in stream.results()]

    assert asyncio.run(once()) == "mlp"
    assert asyncio.run(once()) == "mlp"
    assert asyncio.run(streamed()) == ["InferResult"]
    asyncio.run(client.close())  # from yet another loop: the channel's has ended
    with pytest.raises(ClientClosedError):
        asyncio.run(once())


def test_an_async_client_on_a_loop_of_its_own_or_one_running_elsewhere(server: Any) -> None:
    """A loop left idle but not closed (``run_until_complete``, then ``asyncio.run``) kept the
    channel, and a loop running in another thread shared it: both raised a bare RuntimeError
    ("attached to a different loop"), no FerryError. An idle loop's channel is now replaced
    with one of the loop in use; one still running elsewhere is a FerryError saying to make a
    client per loop."""
    client = AsyncInferenceClient(server.target, timeout=30)
    x = {"input": np.zeros((1, 64), np.float32)}

    async def once() -> str:
        return (await client.infer("mlp", x)).model

    idle = asyncio.new_event_loop()
    try:
        assert idle.run_until_complete(once()) == "mlp"
        assert asyncio.run(once()) == "mlp"  # the first loop idles, not closed
        assert idle.run_until_complete(once()) == "mlp"  # and back
    finally:
        idle.close()

    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    try:
        assert asyncio.run_coroutine_threadsafe(once(), running).result(30) == "mlp"
        with pytest.raises(FerryError, match="one client per event loop"):
            asyncio.run(once())
        assert asyncio.run_coroutine_threadsafe(once(), running).result(30) == "mlp"
        asyncio.run_coroutine_threadsafe(client.close(), running).result(30)
    finally:
        running.call_soon_threadsafe(running.stop)
        thread.join(30)
        running.close()


def test_an_async_client_closed_from_another_loop_releases_its_channel(server: Any) -> None:
    """close() from a loop other than the channel's left the channel open (its connection held
    until garbage collection, a stream on a loop in another thread never ended), and so did
    rebinding to a new loop. The channel is now closed by its own loop when that one runs in
    another thread, and released at once when its loop has ended or idles."""
    client = AsyncInferenceClient(server.target, timeout=30)
    x = {"input": np.zeros((1, 64), np.float32)}

    async def once() -> str:
        return (await client.infer("mlp", x)).model

    assert asyncio.run(once()) == "mlp"
    first = client._channel
    assert asyncio.run(once()) == "mlp"  # a new loop: the ended one's channel is released
    assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    second = client._channel
    asyncio.run(client.close())
    assert second.get_state() == grpc.ChannelConnectivity.SHUTDOWN

    client = AsyncInferenceClient(server.target, timeout=30)
    answered = threading.Event()

    async def streaming() -> list[str]:
        async with client.stream("mlp") as stream:
            await stream.submit(x)
            names = []
            async for _, answer in stream.results(until_closed=True):  # ends when the call does
                names.append(type(answer).__name__)
                answered.set()
            return names

    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    try:
        stream = asyncio.run_coroutine_threadsafe(streaming(), running)
        assert answered.wait(30)
        channel = client._channel
        asyncio.run(client.close())  # from this thread's loop, while the stream is open there
        assert stream.result(30) == ["InferResult"]
        assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        with pytest.raises(ClientClosedError):
            asyncio.run_coroutine_threadsafe(once(), running).result(30)
    finally:
        running.call_soon_threadsafe(running.stop)
        thread.join(30)
        running.close()


@pytest.mark.parametrize("how", ["closed", "used from another loop"])
def test_a_stream_on_an_idle_loop_ends_once_its_channel_is_released(server: Any, how: str) -> None:
    """A stream left open on a loop that idled (``run_until_complete`` returned) while its
    client was closed, or used from another loop, from elsewhere: grpc.aio left the released
    channel's call pending, so once the loop ran again ``results()`` and ``wait()`` hung for
    good. The stream now ends when its loop runs: each request answered or failed with
    ClientClosedError (closed) or a CancelledError saying why, and submit() raises it."""
    client = AsyncInferenceClient(server.target, timeout=30)
    x = {"input": np.zeros((1, 64), np.float32)}
    idle = asyncio.new_event_loop()
    expected = ClientClosedError if how == "closed" else CancelledError

    async def opened() -> Any:
        stream = client.stream("mlp")
        await stream.submit(x)
        await stream.submit(x)
        return stream

    async def resumed(stream: Any) -> list[Any]:
        answers = [answer async for _, answer in stream.results()]
        await stream.wait()
        with pytest.raises(expected):
            await stream.submit(x)
        return answers

    async def elsewhere() -> None:
        if how == "closed":
            await client.close()
        else:
            assert (await client.infer("mlp", x)).model == "mlp"

    try:
        stream = idle.run_until_complete(opened())
        asyncio.run(elsewhere())
        # The bound only turns the hang this was into a failure.
        answers = idle.run_until_complete(asyncio.wait_for(resumed(stream), 30))
    finally:
        idle.close()
    assert len(answers) == 2
    assert all(isinstance(a, InferResult | expected) for a in answers), answers
    if how != "closed":
        assert all("another event loop" in str(a) for a in answers if isinstance(a, FerryError))


def test_a_stream_used_from_a_loop_other_than_its_calls_says_so(server: Any) -> None:
    """A stream whose call started on one loop, used from another while that one idled:
    results() waited for good (its reader runs on the first loop) and submit() raised a bare
    RuntimeError ("attached to a different loop"). Both are a FerryError saying to use the
    stream on its own loop, which still serves it."""
    client = AsyncInferenceClient(server.target, timeout=30)
    x = {"input": np.zeros((1, 64), np.float32)}
    first = asyncio.new_event_loop()

    async def opened() -> Any:
        stream = client.stream("mlp")
        await stream.submit(x, "first")
        return stream

    async def elsewhere(stream: Any) -> None:
        with pytest.raises(FerryError, match="another event loop"):
            await stream.submit(x)
        with pytest.raises(FerryError, match="another event loop"):
            await anext(stream.results())

    async def home(stream: Any) -> list[str]:
        await stream.close()
        return [rid async for rid, answer in stream.results() if isinstance(answer, InferResult)]

    try:
        stream = first.run_until_complete(opened())
        asyncio.run(
            asyncio.wait_for(elsewhere(stream), 30)
        )  # the bound turns a hang into a failure
        assert first.run_until_complete(asyncio.wait_for(home(stream), 30)) == ["first"]
        first.run_until_complete(client.close())
    finally:
        first.close()


def test_a_submit_whose_write_the_closing_client_cuts_raises_client_closed(server: Any) -> None:
    """Closing the client while a stream's submit() was writing raised a bare
    asyncio.CancelledError out of submit() (as if the caller's task had been cancelled) or a
    plain FerryError ("this stream has ended"), and infer_many yielded such items; it is the
    ClientClosedError every other call in flight gets."""

    async def main() -> None:
        client = AsyncInferenceClient(server.target, timeout=30)
        async with client.stream("mlp") as stream:
            await stream.submit({"input": np.zeros((1, 64), np.float32)})
            big = {"input": np.zeros((250_000, 64), np.float32)}  # 64 MB: a write of many turns
            submitting = asyncio.create_task(stream.submit(big))
            for _ in range(10_000):  # loop turns until its write has begun
                if stream.in_flight == 2 or submitting.done():
                    break
                await asyncio.sleep(0)
            await client.close()
            with pytest.raises(ClientClosedError):
                await submitting

    asyncio.run(main())


def test_inputs_accept_lists_scalars_and_torch_tensors(client: InferenceClient) -> None:
    result = client.infer("two_io", {"a": [[0.5, 0.5, 0.5, 0.5]], "b": np.array([[1, 2, 3, 4]])})
    np.testing.assert_array_equal(result["sum"], [[1.5, 2.5, 3.5, 4.5]])
    torch = pytest.importorskip("torch")
    result = client.infer("mlp", {"input": torch.ones(1, 64)})
    np.testing.assert_allclose(
        result["logits"], client.infer("mlp", {"input": np.ones((1, 64), np.float32)})["logits"]
    )


# --- retries ----------------------------------------------------------------------------------


def test_sync_client_retries_unavailable_and_overload(scripted: type[ScriptedServer]) -> None:
    srv = scripted(
        [(grpc.StatusCode.UNAVAILABLE, ""), (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")]
    )
    with InferenceClient(srv.target, timeout=30, retry=FAST_RETRY) as client:
        result = client.infer("m", X)
    assert result.version == 7 and srv.calls == 3


def test_no_retry_for_limits_or_when_disabled(scripted: type[ScriptedServer]) -> None:
    srv = scripted([(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")])
    with InferenceClient(srv.target, retry=FAST_RETRY) as client, pytest.raises(LimitExceededError):
        client.infer("m", X)
    assert srv.calls == 1
    srv = scripted([(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")])
    with (
        InferenceClient(srv.target, retry=RetryPolicy.disabled()) as client,
        pytest.raises(ServerOverloadedError),
    ):
        client.infer("m", X)
    assert srv.calls == 1


def test_retries_stop_after_max_attempts(scripted: type[ScriptedServer]) -> None:
    srv = scripted([(grpc.StatusCode.UNAVAILABLE, "")] * 10)
    with InferenceClient(srv.target, retry=FAST_RETRY) as client, pytest.raises(ConnectionError_):
        client.infer("m", X)
    assert srv.calls == FAST_RETRY.max_attempts


def test_async_client_retries(scripted: type[ScriptedServer]) -> None:
    srv = scripted([(grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")] * 2)

    async def main() -> int:
        async with AsyncInferenceClient(srv.target, timeout=30, retry=FAST_RETRY) as client:
            return (await client.infer("m", X)).version

    assert asyncio.run(main()) == 7 and srv.calls == 3


# --- tokens, TLS, several endpoints -------------------------------------------------------------


def test_token_is_sent_on_every_call_and_stream(scripted: type[ScriptedServer]) -> None:
    srv = scripted()
    with InferenceClient(srv.target, token="tok-1") as client:
        client.infer("m", X)
        assert [rid for rid, _ in client.infer_many("m", [X, X])] != []

    async def main() -> None:
        async with AsyncInferenceClient(srv.target, token="tok-1") as client:
            await client.infer("m", X)
            async with client.stream("m") as stream:
                await stream.submit(X)
                assert len([r async for r in stream.results()]) == 1

    asyncio.run(main())
    assert len(srv.metadata) == 4
    assert all(md.get("authorization") == "Bearer tok-1" for md in srv.metadata)


def _self_signed(name: str) -> tuple[bytes, bytes]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_with_a_token_as_call_credentials(
    scripted: type[ScriptedServer], tmp_path: Any
) -> None:
    cert, key = _self_signed("ferry.test")
    srv = scripted(credentials=grpc.ssl_server_credentials([(key, cert)]))
    (tmp_path / "ca.pem").write_bytes(cert)
    tls = TLSConfig(ca_cert=tmp_path / "ca.pem", server_name_override="ferry.test")
    with InferenceClient(srv.target, tls=tls, token="tls-tok", timeout=30) as client:
        assert client.infer("m", X).version == 7
        assert len(list(client.infer_many("m", [X]))) == 1

    async def main() -> int:
        async with AsyncInferenceClient(srv.target, tls=tls, token="tls-tok", timeout=30) as c:
            return (await c.infer("m", X)).version

    assert asyncio.run(main()) == 7
    assert [md.get("authorization") for md in srv.metadata] == ["Bearer tls-tok"] * 3
    # An untrusted server certificate is refused rather than silently accepted.
    other, _ = _self_signed("ferry.test")
    bad = TLSConfig(ca_cert=other, server_name_override="ferry.test")
    untrusting = InferenceClient(srv.target, tls=bad, timeout=30, retry=RetryPolicy.disabled())
    with untrusting as c, pytest.raises(ConnectionError_):
        c.infer("m", X)


def test_several_endpoints_are_balanced_round_robin(
    scripted: type[ScriptedServer],
) -> None:
    a, b = scripted(), scripted()
    with InferenceClient([a.target, b.target], timeout=30) as client:
        for _ in range(200):  # bounded: stop as soon as both have answered
            client.infer("m", X)
            if a.calls and b.calls:
                break
    assert a.calls > 0 and b.calls > 0


# --- request encoding shared by both clients ---------------------------------------------------


@pytest.mark.parametrize(
    "inputs",
    [
        {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)},
        {"a": np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]},  # not contiguous
        {"a": np.arange(4, dtype=">f4")},  # big-endian
        {"a": np.zeros((0, 2), np.float32), "b": np.array([True, False])},
        {"s": np.array([b"x", "yz", b""], dtype=object), "h": np.ones(3, np.float16)},
        {"scalar": np.float64(2.5), "u8": np.arange(3, dtype=np.uint8)},
    ],
)
def test_one_copy_encoding_matches_protobuf_byte_for_byte(inputs: dict[str, Any]) -> None:
    from ferry.client._requests import build_infer_request
    from ferry.client._wire import encode_infer_request

    for kwargs in (
        {},
        {"version": 3, "request_id": "r-1", "outputs": ["o", "p"], "timeout": 1.5, "priority": 2},
        {"version": -1},
    ):
        fast = encode_infer_request("mödel", inputs, **kwargs)  # type: ignore[arg-type]
        slow = build_infer_request("mödel", inputs, **kwargs)  # type: ignore[arg-type]
        assert fast == slow.SerializeToString()


def _response(**outputs: np.ndarray) -> Any:
    return pb.InferResponse(
        model="mlp",
        version=-2,
        id="req-ä",
        outputs=[encode_tensor(k, v) for k, v in outputs.items()],
    )


@pytest.mark.parametrize(
    "outputs",
    [
        {"logits": np.arange(1000, dtype=np.float32).reshape(1, 1000)},
        {"a": np.ones((2, 3), np.int64), "b": np.array([b"x", b"", b"yz"], dtype=object)},
        {
            "empty": np.zeros((0, 4), np.float32),
            "flag": np.array(True),
            "h": np.ones(2, np.float16),
        },
    ],
)
def test_zero_copy_decoding_matches_protobuf(outputs: dict[str, np.ndarray]) -> None:
    from ferry.client._wire import decode_infer_response, decode_stream_response

    raw = _response(**outputs).SerializeToString()
    fast = decode_infer_response(raw)
    assert (fast.model, fast.version, fast.id) == ("mlp", -2, "req-ä")
    assert list(fast) == list(outputs)
    for name, expected in outputs.items():
        assert fast[name].shape == expected.shape and fast[name].dtype == expected.dtype
        np.testing.assert_array_equal(fast[name], expected)
        if expected.dtype != object and expected.size:
            assert not fast[name].flags.writeable
            assert np.shares_memory(fast[name], np.frombuffer(raw, np.uint8))  # a view of raw
    # Unknown fields from a newer server are skipped; a stream answer carries one of these.
    extra = raw + b"\x48\x05" + b"\x51" + b"\x00" * 8 + b"\x7a\x02hi"
    assert list(decode_infer_response(extra)) == list(outputs)
    stream = pb.InferStreamResponse(id="s1", response=_response(**outputs)).SerializeToString()
    rid, answer = decode_stream_response(stream)
    assert rid == "s1" and isinstance(answer, InferResult) and list(answer) == list(outputs)


def test_decoding_errors_and_malformed_answers() -> None:
    from ferry.client import ServerError
    from ferry.client._wire import decode_infer_response, decode_stream_response

    err = pb.InferStreamResponse(
        id="e", error=pb.Error(code=5, message="no such model", kind="MODEL_NOT_FOUND")
    ).SerializeToString()
    rid, answer = decode_stream_response(err)
    assert rid == "e" and isinstance(answer, ModelNotFoundError)
    assert "no such model" in str(answer)
    raw = _response(x=np.ones(8, np.float32)).SerializeToString()
    for bad in (raw[:-3], raw[:10], b"\x22\xff\xff\xff\xff\x0f", b"\x0a\x05ab"):
        with pytest.raises(ServerError, match="the server's answer cannot be read"):
            decode_infer_response(bad)
