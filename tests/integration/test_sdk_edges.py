"""Where gRPC's own answers would leave an SDK user guessing: messages over a size limit, the wrong
listener, a closed client, and a server that stops answering. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import inspect
import queue
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry.client import (
    AsyncInferenceClient,
    ClientClosedError,
    ConversionClient,
    DeadlineExceededError,
    FerryError,
    InferenceClient,
    InvalidInputError,
    LimitExceededError,
    RepositoryClient,
    RetryPolicy,
    Serving,
    UnimplementedError,
    Validation,
)
from ferry.client._base import DEFAULT_TIMEOUT
from ferry.client._errors import message_size_error

BIG = {"input": np.zeros((8192, 64), np.float32)}  # 2 MiB on the wire


class CountingRetry(RetryPolicy):
    """A retry policy that counts the retries it allows."""

    def __init__(self) -> None:
        super().__init__(max_attempts=4, initial_backoff=0.0, jitter=0.0)
        object.__setattr__(self, "asked", 0)

    def should_retry(self, error: FerryError, attempt: int) -> bool:
        allowed = super().should_retry(error, attempt)
        object.__setattr__(self, "asked", self.asked + int(allowed))
        return allowed


def test_a_request_over_the_client_limit_names_the_client_option(server: Any) -> None:
    retry = CountingRetry()
    client = InferenceClient(server.target, max_message_bytes=1 << 20, retry=retry)
    with client, pytest.raises(LimitExceededError) as info:
        client.infer("mlp", BIG)
    exc = info.value
    assert exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED and exc.kind == "LIMIT_EXCEEDED"
    assert (
        "this client refused to send" in exc.message and "max_message_bytes option" in exc.message
    )
    assert "1,048,576" in exc.message
    assert retry.asked == 0  # never retried: it would be just as large next time


def test_a_request_over_the_server_limit_names_the_server_setting(
    start_server: Any, repo_path: Path
) -> None:
    srv = start_server(repo_path, max_message_bytes=1 << 20)
    with InferenceClient(srv.target) as client:
        with pytest.raises(LimitExceededError) as info:
            client.infer("mlp", BIG)
        assert client.infer("mlp", {"input": BIG["input"][:4]}).version == 1  # still serving
    message = info.value.message
    assert "the server refused" in message and "--max-message-bytes" in message
    assert "FERRY_MAX_MESSAGE_BYTES" in message and "max_message_bytes option" in message


@pytest.mark.parametrize(
    ("details", "words"),
    [
        ("CLIENT: Received message larger than max (2000 vs. 1000)", "refused a 2,000-byte answer"),
        ("SERVER: Received message larger than max (2000 vs. 1000)", "the server refused"),
        ("Received message larger than max (2000 vs. 1000)", "on the server"),
    ],
)
def test_every_form_of_the_size_refusal_is_recognised(details: str, words: str) -> None:
    error = message_size_error(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
    assert isinstance(error, LimitExceededError) and words in error.message
    assert "max_message_bytes" in error.message and not type(error).retryable


def test_other_resource_exhaustion_is_left_alone() -> None:
    assert message_size_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full") is None
    assert (
        message_size_error(grpc.StatusCode.INTERNAL, "Sent message larger than max (2 vs. 1)")
        is None
    )


def test_an_address_list_target_reaches_the_server(server: Any) -> None:
    """An ``ipv4:`` list with a space after its comma was handed to gRPC as written, which
    refused it ("the target uri is not valid"): every call failed UNKNOWN. It is rebuilt, and
    one without a port, which gRPC's ipv4: scheme has no default for, is refused when made."""
    port = server.target.rpartition(":")[2]
    with InferenceClient(f"ipv4:127.0.0.1:{port}, 127.0.0.1:{port}", timeout=30) as client:
        assert client.ready("mlp")
        assert client.infer("mlp", {"input": np.zeros((1, 64), np.float32)}).model == "mlp"
    with pytest.raises(InvalidInputError, match="no default port"):
        InferenceClient("ipv4:127.0.0.1")


def test_the_wrong_listener_says_which_is_which(server: Any) -> None:
    client = InferenceClient(server.management_target)
    with client, pytest.raises(UnimplementedError) as info:
        client.infer("mlp", {"input": np.zeros((1, 64), np.float32)})
    assert "Method not found" in info.value.message
    assert "right listener" in info.value.message and "8003" in info.value.message
    with ConversionClient(server.target) as conv, pytest.raises(FerryError) as caught:
        conv.list_uploads()
    assert "listener" in caught.value.message


def test_a_closed_client_says_so(server: Any) -> None:
    client = InferenceClient(server.target)
    client.close()
    for call in (
        lambda: client.infer("mlp", {"input": np.zeros((1, 64), np.float32)}),
        client.list_models,
        client.ready,
        lambda: client.stream("mlp"),
    ):
        with pytest.raises(ClientClosedError, match="InferenceClient is closed"):
            call()
    client.close()  # twice is harmless
    for manager in (
        RepositoryClient(server.management_target),
        ConversionClient(server.management_target),
    ):
        with manager:
            pass
        with pytest.raises(ClientClosedError, match="is closed"):
            manager.refresh() if isinstance(manager, RepositoryClient) else manager.list_uploads()


def test_a_closed_async_client_says_so(server: Any) -> None:
    async def run() -> None:
        async with AsyncInferenceClient(server.target) as client:
            assert await client.list_models()
        with pytest.raises(ClientClosedError):
            await client.list_models()
        with pytest.raises(ClientClosedError):  # at once, as the sync client: not at submit()
            client.stream("mlp")

    asyncio.run(run())


class ClosingRetry(RetryPolicy):
    """Closes ``client`` when asked for the pause before a retry: a client closed (by another
    thread or task) while its call waits to try again."""

    def __init__(self) -> None:
        super().__init__(max_attempts=3, initial_backoff=0.0, jitter=0.0)
        object.__setattr__(self, "close", lambda: None)

    def backoff(self, attempt: int, rng: Any = None) -> float:
        self.close()
        return 0.0


def test_a_client_closed_during_a_retry_says_so() -> None:
    """The next attempt ran on the closed channel: grpc's ValueError ("Cannot invoke RPC on
    closed channel!") from the sync client, its UsageError from the async one."""
    nobody = "127.0.0.1:9"  # refused at once: UNAVAILABLE, retried
    retry = ClosingRetry()
    client = InferenceClient(nobody, timeout=30, retry=retry)
    object.__setattr__(retry, "close", client.close)
    with pytest.raises(ClientClosedError, match="InferenceClient is closed"):
        client.list_models()

    async def run() -> None:
        retry = ClosingRetry()
        client = AsyncInferenceClient(nobody, timeout=30, retry=retry)
        object.__setattr__(retry, "close", lambda: asyncio.ensure_future(client.close()))
        with pytest.raises(ClientClosedError, match="AsyncInferenceClient is closed"):
            await client.list_models()

    asyncio.run(run())


class HoldingServer:
    """An aio gRPC server on the running loop whose ListModels and health Check never answer:
    each call that reaches it is put on ``received`` (its method), so a test knows a call is in
    flight, not just begun on the client's side, before it closes or cancels it."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[str] = asyncio.Queue()
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "ferry.v1.Inference", {"ListModels": self._handler("ListModels")}
                ),
                grpc.method_handlers_generic_handler(
                    "grpc.health.v1.Health", {"Check": self._handler("Check")}
                ),
            )
        )
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def _handler(self, method: str) -> grpc.RpcMethodHandler:
        async def hold(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self.received.put_nowait(method)
            await asyncio.Event().wait()  # until the client goes, or the server stops
            raise AssertionError("unreachable")

        return grpc.unary_unary_rpc_method_handler(hold)

    async def arrived(self, count: int) -> list[str]:
        """The methods of the next ``count`` calls to reach the server, as they arrive."""
        async with asyncio.timeout(30):
            return sorted([await self.received.get() for _ in range(count)])


def test_a_call_in_flight_when_its_async_client_closes_says_so() -> None:
    """A call the close cancelled raised a bare asyncio.CancelledError, as if the caller's own
    task had been cancelled; a task that is cancelled still gets CancelledError. Each call is
    closed (or cancelled) once the server has it: in flight, not still being set up."""

    async def run() -> None:
        holding = HoldingServer()
        await holding.server.start()
        try:
            client = AsyncInferenceClient(holding.target, timeout=30)
            call = asyncio.ensure_future(client.list_models())
            check = asyncio.ensure_future(client.ready(timeout=30))
            assert await holding.arrived(2) == ["Check", "ListModels"]
            await client.close()
            with pytest.raises(ClientClosedError, match="AsyncInferenceClient is closed"):
                await call
            with pytest.raises(ClientClosedError, match="AsyncInferenceClient is closed"):
                await check
            async with AsyncInferenceClient(holding.target, timeout=30) as other:
                cancelled = asyncio.ensure_future(other.list_models())
                assert await holding.arrived(1) == ["ListModels"]
                cancelled.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await cancelled
        finally:
            await holding.server.stop(None)

    asyncio.run(run())


def test_a_management_call_in_flight_when_its_client_closes_says_so() -> None:
    """RepositoryClient and ConversionClient calls in flight when the client closed raised
    grpc's CancelledError ("Channel closed!"), as if someone had cancelled them, and the sync
    client's ready() said False, where the other calls (and ClientClosedError's own
    description) say the client was closed. Each client is closed once the server holds its
    call."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    received: queue.SimpleQueue[str] = queue.SimpleQueue()
    release = threading.Event()

    def handler(method: str) -> grpc.RpcMethodHandler:
        def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
            received.put(method)
            release.wait(30)
            context.abort(grpc.StatusCode.UNAVAILABLE, "held until the test ended")

        return grpc.unary_unary_rpc_method_handler(hold)

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "ferry.v1.ModelRepository", {"Refresh": handler("Refresh")}
            ),
            grpc.method_handlers_generic_handler(
                "ferry.v1.ModelConversion", {"GetJob": handler("GetJob")}
            ),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health", {"Check": handler("Check")}
            ),
        )
    )
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        for make, call, method in (
            (RepositoryClient, lambda c: c.refresh(), "Refresh"),
            (ConversionClient, lambda c: c.job("0" * 32), "GetJob"),
            # ready() said False, "not serving", where the async client's says it was closed.
            (InferenceClient, lambda c: c.ready(timeout=30), "Check"),
        ):
            client = make(target, timeout=30)
            with ThreadPoolExecutor(max_workers=1) as pool:
                answer = pool.submit(call, client)
                assert received.get(timeout=30) == method
                client.close()
                with pytest.raises(ClientClosedError, match=f"{make.__name__} is closed"):
                    answer.result(timeout=30)
    finally:
        release.set()
        server.stop(None)


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A TCP port that accepts connections and never speaks HTTP/2: a server that stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_calls_have_a_deadline_by_default(silent_listener: str) -> None:
    assert DEFAULT_TIMEOUT == 10.0
    for cls in (InferenceClient, AsyncInferenceClient):
        assert inspect.signature(cls).parameters["timeout"].default == DEFAULT_TIMEOUT
    with InferenceClient(silent_listener) as client:
        assert client.timeout == DEFAULT_TIMEOUT
    # The deadline, shortened here, is what ends a call to a server that never answers.
    client = InferenceClient(silent_listener, timeout=0.3)
    with client, pytest.raises(DeadlineExceededError):
        client.list_models()
    with InferenceClient(silent_listener, timeout=None) as client:
        assert client.timeout is None  # None: no deadline, as documented


def test_a_port_past_65535_is_refused_not_wrapped_onto_another(server: Any) -> None:
    """gRPC keeps a port's low 16 bits: "127.0.0.1:{port + 65536}" reached this server, and a
    typo in a port could reach whatever listens on the wrapped one."""
    port = int(server.target.rpartition(":")[2])
    for target in (f"127.0.0.1:{port + 65536}", [server.target, f"127.0.0.1:{port + 65536}"]):
        for make in (InferenceClient, AsyncInferenceClient):
            with pytest.raises(ValueError, match=r"port \d+ is not within 1\.\.65535"):
                make(target)
        with pytest.raises(ValueError, match=r"not within 1\.\.65535"):
            RepositoryClient(target)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"max_batch_size": 0}, "max_batch_size"),  # read as unset: the server's 32
        ({"max_batch_size": 2**40}, "max_batch_size"),
        ({"max_batch_size": 1.5}, "max_batch_size"),
        ({"opset": 0}, "opset"),
        ({"rollout": "shadow", "rollout_fraction": 0.0}, "rollout_fraction"),  # read as 0.1
        ({"validation": Validation(samples=-2)}, "validation.samples"),
        ({"serving": Serving(max_batch_size=-1)}, "serving.max_batch_size"),
        ({"serving": Serving(instance_count=True)}, "serving.instance_count"),
    ],
)
def test_convert_refuses_values_the_wire_would_lose_naming_the_field(
    silent_listener: str, kwargs: dict[str, Any], field: str
) -> None:
    """A negative count raised protobuf's bare "Value out of range: -1" (a traceback from the
    CLI), and a 0 where 0 means unset became the server's default without a word."""
    client = ConversionClient(silent_listener, timeout=0.3)
    with client, pytest.raises(InvalidInputError, match=rf"^{field} must be"):
        client.convert("a" * 32, **kwargs)


def test_a_list_input_keeps_to_the_calls_timeout(silent_listener: str) -> None:
    """A list input makes infer fetch the model's metadata first, and that call took the
    client's default timeout, not the call's: with timeout=None on the client, infer(...,
    timeout=0.5) never returned from a server that does not answer."""
    import threading

    lists = {"input": [[1.0, 2.0]]}
    raised: list[BaseException] = []

    def call() -> None:
        with InferenceClient(silent_listener, timeout=None, retry=None) as client:
            try:
                client.infer("m", lists, timeout=0.5)
            except FerryError as exc:
                raised.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(120)  # a guard against the hang, not a measurement
    assert [type(e) for e in raised] == [DeadlineExceededError]

    async def run() -> None:
        async with AsyncInferenceClient(silent_listener, timeout=None, retry=None) as client:
            with pytest.raises(DeadlineExceededError):
                await asyncio.wait_for(client.infer("m", lists, timeout=0.5), 120)

    asyncio.run(run())


def test_a_streamed_list_input_keeps_to_its_submits_timeout(silent_listener: str) -> None:
    """A list input makes submit() fetch the model's metadata first, and that call took the
    client's default timeout, not the request's: with timeout=None on the client,
    stream.submit(..., timeout=0.5) never returned from a server that does not answer."""
    from concurrent.futures import ThreadPoolExecutor

    lists = {"input": [[1.0, 2.0]]}
    client = InferenceClient(silent_listener, timeout=None, retry=None)
    try:
        stream = client.stream("m")
        with ThreadPoolExecutor(max_workers=1) as pool:
            submitted = pool.submit(stream.submit, lists, timeout=0.5)
            # The result's own timeout guards against the hang; it measures nothing.
            assert isinstance(submitted.exception(timeout=120), DeadlineExceededError)
    finally:
        client.close()  # ends a metadata call still waiting, if the guard gave up on it

    async def run() -> None:
        async with AsyncInferenceClient(silent_listener, timeout=None, retry=None) as aclient:
            astream = aclient.stream("m")
            with pytest.raises(DeadlineExceededError):
                await asyncio.wait_for(astream.submit(lists, timeout=0.5), 120)
            await astream.cancel()

    asyncio.run(run())


def test_a_failed_job_and_its_error_travel_between_processes() -> None:
    """JobFailedError could not be pickled (its Job holds the client, whose channel cannot
    travel) nor, once pickled without one, rebuilt ("'str' object has no attribute 'id'"):
    a conversion awaited in a process pool, or a task queue that pickles exceptions, lost the
    error to a pickling one. Both now travel without the client; a copy in-process keeps it."""
    import copy
    import pickle

    import grpc

    from ferry.client import ConversionClient, Job, JobFailedError

    with ConversionClient("127.0.0.1:1") as conv:
        job = Job(
            id="a" * 32,
            model="m",
            state="FAILED",
            error_code=grpc.StatusCode.FAILED_PRECONDITION,
            error_kind="CONVERSION_FAILED",
            error_message="below the accuracy budget",
            _client=conv,
        )
        error = JobFailedError(job)
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is JobFailedError and str(again) == str(error)
        assert (again.code, again.kind) == (error.code, error.kind)
        assert again.job.id == job.id and again.job.error_message == job.error_message
        assert again.job._client is None and job._client is conv
        assert pickle.loads(pickle.dumps(job)).state == "FAILED"
        assert copy.copy(job)._client is conv
        assert copy.copy(error).job.id == job.id


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"chunk_size": 1.5}, "chunk_size"),  # ServerError "Exception iterating requests!"
        ({"chunk_size": True}, "chunk_size"),  # taken as 1: one message per byte
        ({"chunk_size": "x"}, "chunk_size"),  # TypeError
        ({"chunk_size": 2**40}, "chunk_size"),  # a file read whole into one message
        ({"format": 5}, "format"),  # AttributeError
        ({"architecture": 5}, "architecture"),  # TypeError from protobuf
        ({"architecture_kwargs": {"a": object()}}, "architecture_kwargs"),  # TypeError
        ({"name": 5}, "model"),  # TypeError from protobuf
    ],
)
def test_upload_refuses_arguments_it_cannot_send_naming_them(
    silent_listener: str, kwargs: dict[str, Any], words: str
) -> None:
    """Each escaped as Python's own TypeError or AttributeError, or (chunk_size=1.5, raised in
    the thread that feeds the call) as ServerError, "a server bug", from the server's UNKNOWN."""
    client = ConversionClient(silent_listener, timeout=0.3)
    options = {"name": "m", "format": "onnx", **kwargs}
    name = options.pop("name")
    with client, pytest.raises(InvalidInputError, match=words):
        client.upload(name, b"\x08\x07", **options)


def test_an_upload_whose_file_fails_mid_read_raises_that_error(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that failed part way (EIO on a network disk) was raised in gRPC's feeding
    thread and came back as ServerError "UNKNOWN: Exception iterating requests!", blaming the
    server and hiding the cause; the cause is now raised."""
    from ferry.client import _conversion

    def failing(header: Any, data: Any, size: int) -> Iterator[Any]:
        yield _conversion.pb.UploadModelRequest(header=header)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_conversion, "_chunks", failing)
    client = ConversionClient(server.management_target, timeout=30)
    with client, pytest.raises(OSError, match="Input/output error"):
        client.upload("m", b"\x08\x07", format="onnx")
