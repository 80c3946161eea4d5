"""One request's trouble on a stream stays that request's: a cancelled submit or a message too
large to send must not fail the other requests in flight on the same stream."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pytest
from helpers import ExecutionGate, StartServer, make_repo, write_config

from ferry.client import AsyncInferenceClient, InferenceClient, InferResult, LimitExceededError
from ferry.client._channel import ChannelConfig
from ferry.server.examples import identity_model

MIB = 1 << 20


def rows(value: float, n: int = 4) -> dict[str, np.ndarray]:
    return {"input": np.full((1, n), value, np.float32)}


class WriteLock(asyncio.Lock):
    """A stream's write lock that says when a write has taken it: the message has begun to go
    out. (The submit's write runs one step after the submit itself, so one yield to the loop
    was not enough: cancelled then, the message was withdrawn unsent, another path.)"""

    def __init__(self) -> None:
        super().__init__()
        self.taken = asyncio.Event()

    async def acquire(self) -> bool:
        got = await super().acquire()
        self.taken.set()
        return got


def test_a_cancelled_async_submit_leaves_the_other_requests_alone(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The server holds two requests (its per-stream bound) and stops reading, so a large
    message's write waits on HTTP/2 flow control; its caller gives up on it. grpc.aio cancelled
    the whole call with the abandoned write: the two held requests came back CancelledError."""
    root = make_repo(tmp_path / "repo", {"ident": identity_model("FP32")})
    write_config(root, "ident", {"batching": {"max_batch_size": 0}, "instances": {"count": 1}})
    limit = 256 * MIB
    srv = start_server(root, max_stream_in_flight=2, max_message_bytes=limit)

    async def main() -> list[tuple[str, object]]:
        with ExecutionGate(srv, "ident") as gate:
            async with AsyncInferenceClient(
                srv.target, timeout=60, max_message_bytes=limit
            ) as client:
                stream = client.stream("ident")
                await stream.submit(rows(1.0), "a")
                await stream.submit(rows(2.0), "b")
                await asyncio.to_thread(gate.wait_entered)
                big = {"input": np.ones((1, 32 * MIB), np.float32)}  # 128 MiB: over any window
                lock = stream._write_lock = WriteLock()
                task = asyncio.create_task(stream.submit(big, "big"))
                async with asyncio.timeout(30):
                    await lock.taken.wait()  # its write has begun, and cannot finish
                assert stream.in_flight == 3 and not task.done()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                gate.release()
                assert await stream.submit(rows(3.0), "c") == "c"
                await stream.close()
                return [(rid, result) async for rid, result in stream.results()]

    answers = dict(asyncio.run(main()))
    # "big" had begun to go out when its caller gave up: it is answered, as documented.
    assert set(answers) == {"a", "b", "c", "big"}
    for rid, result in answers.items():
        assert isinstance(result, InferResult), (rid, result)
    for rid, value in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        result = answers[rid]
        assert isinstance(result, InferResult)
        np.testing.assert_array_equal(result["output"], rows(value)["input"])


def test_a_request_too_large_to_send_fails_alone(tmp_path: Path, start_server: StartServer) -> None:
    """gRPC refuses a message over the channel's send limit by ending the whole call: the small
    requests around it came back with the large one's error ("this client refused to send a
    ...-byte message"), and the stream was dead. Only the large one fails now."""
    root = make_repo(tmp_path / "repo", {"ident": identity_model("FP32")})
    srv = start_server(root)
    limit = 1 * MIB
    huge = {"input": np.ones((1, limit // 4 + 1), np.float32)}

    with InferenceClient(srv.target, timeout=30, max_message_bytes=limit) as client:
        with client.stream("ident") as stream:
            stream.submit(rows(1.0), "a")
            with pytest.raises(LimitExceededError, match="max_message_bytes"):
                stream.submit(huge, "huge")
            stream.submit(rows(2.0), "b")
        answers = dict(stream.results())

    async def main() -> dict[str, object]:
        async with AsyncInferenceClient(srv.target, timeout=30, max_message_bytes=limit) as client:
            stream = client.stream("ident")
            await stream.submit(rows(1.0), "a")
            with pytest.raises(LimitExceededError, match="max_message_bytes"):
                await stream.submit(huge, "huge")
            await stream.submit(rows(2.0), "b")
            await stream.close()
            return {rid: result async for rid, result in stream.results()}

    for got in (answers, asyncio.run(main())):
        assert set(got) == {"a", "b"}
        for rid, value in (("a", 1.0), ("b", 2.0)):
            result = got[rid]
            assert isinstance(result, InferResult), (rid, result)
            np.testing.assert_array_equal(result["output"], rows(value)["input"])


def test_the_send_limit_follows_the_channel_options() -> None:
    assert ChannelConfig(max_message_bytes=1000).send_limit() == 1000
    options = [("grpc.max_send_message_length", 5000)]
    assert ChannelConfig(max_message_bytes=1000, options=options).send_limit() == 5000
    options = [("grpc.max_send_message_length", -1)]
    assert ChannelConfig(options=options).send_limit() is None


def test_message_limits_given_as_channel_options_apply(
    tmp_path: Path, start_server: StartServer
) -> None:
    """grpc takes the first of two channel arguments with one key, and the client put its own
    limits (max_message_bytes) first: a ``grpc.max_send_message_length`` or
    ``grpc.max_receive_message_length`` given in ``options`` was ignored, while a stream's
    pre-send check (``send_limit``) went by it. Options given win now, as documented."""
    root = make_repo(tmp_path / "repo", {"ident": identity_model("FP32")})
    srv = start_server(root)
    x = {"input": np.ones((1, 5000), np.float32)}  # 20 KB each way
    for key, side in (
        ("grpc.max_send_message_length", "refused to send"),
        ("grpc.max_receive_message_length", "refused a"),
    ):
        with InferenceClient(srv.target, timeout=30, options=[(key, 10_000)]) as client:
            with pytest.raises(LimitExceededError, match=f"this client {side}"):
                client.infer("ident", x)
            assert client.infer("ident", rows(1.0))["output"].shape == (1, 4)


def test_a_stream_whose_client_closes_says_so(tmp_path: Path, start_server: StartServer) -> None:
    """Closing the client under an open stream failed its requests in flight with "CANCELLED:
    Channel closed!" (sync) or "cancelled by the client" (async), where every unary call says
    the client was closed; and the async stream's reader ended as if its task had been
    cancelled, so leaving ``async with stream`` raised a bare asyncio.CancelledError, which
    reads as the caller's own task being cancelled. The request is held on the server (a gate)
    while the client closes."""
    from ferry.client import AsyncInferenceClient, ClientClosedError

    root = make_repo(tmp_path / "repo", {"ident": identity_model("FP32")})
    write_config(root, "ident", {"batching": {"max_batch_size": 0}, "instances": {"count": 1}})
    srv = start_server(root)
    closed = "InferenceClient is closed"
    with ExecutionGate(srv, "ident") as gate:
        client = InferenceClient(srv.target, timeout=30)
        with client.stream("ident") as stream:
            stream.submit(rows(1.0), "a")
            gate.wait_entered()
            client.close()
            (rid, error), *rest = list(stream.results())
            assert (rid, rest) == ("a", []) and isinstance(error, ClientClosedError)
            with pytest.raises(ClientClosedError, match=closed):
                stream.submit(rows(2.0), "b")
        gate.release()

    with ExecutionGate(srv, "ident") as gate:

        async def main() -> list[tuple[str, object]]:
            aclient = AsyncInferenceClient(srv.target, timeout=30)
            async with aclient.stream("ident") as astream:
                await astream.submit(rows(1.0), "a")
                await asyncio.to_thread(gate.wait_entered)
                await aclient.close()
                answers = [answer async for answer in astream.results()]
                with pytest.raises(ClientClosedError, match=closed):
                    await astream.submit(rows(2.0), "b")
            return answers  # the `async with` ended without a CancelledError

        [(rid, error)] = asyncio.run(main())
        assert rid == "a" and isinstance(error, ClientClosedError)
        gate.release()
