"""Streaming inference (sync and async) against a real server: results matched to requests,
per-request errors that leave the stream open, flow control, close and cancel."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_repo

from ferry.client import (
    AsyncInferenceClient,
    CancelledError,
    DeadlineExceededError,
    FerryError,
    InferenceClient,
    InferResult,
    InvalidInputError,
    LimitExceededError,
    ModelNotFoundError,
)
from ferry.server.examples import identity_model


def batch(i: int) -> dict[str, np.ndarray]:
    """A distinct input per request, so a result matched to the wrong id would show."""
    return {"input": np.full((1, 64), i / 10, np.float32)}


@pytest.fixture
def expected(client: InferenceClient) -> dict[int, np.ndarray]:
    return {i: np.asarray(client.infer("mlp", batch(i))["logits"]) for i in range(20)}


def test_results_are_matched_to_their_requests(
    client: InferenceClient, expected: dict[int, np.ndarray]
) -> None:
    with client.stream("mlp") as stream:
        ids = {stream.submit(batch(i)): i for i in range(20)}
        got = dict(stream.results())
    assert set(got) == set(ids)
    for rid, result in got.items():
        assert isinstance(result, InferResult)
        assert result.id == rid and result.model == "mlp" and result.version == 1
        assert result.timings.rpc > 0
        np.testing.assert_allclose(result["logits"], expected[ids[rid]], rtol=1e-6)


def test_a_failed_request_yields_its_error_and_the_stream_carries_on(
    client: InferenceClient,
) -> None:
    with client.stream("mlp") as stream:
        good1 = stream.submit(batch(1))
        bad = stream.submit({"input": np.ones((1, 3), np.float32)}, "bad-shape")
        wrong_name = stream.submit({"nope": np.ones((1, 64), np.float32)})
        good2 = stream.submit(batch(2))
        got = dict(stream.results())
        after = stream.submit(batch(3))  # still open after the failures
        got.update(stream.results())
    assert bad == "bad-shape"
    assert isinstance(got[bad], InvalidInputError) and isinstance(
        got[wrong_name], InvalidInputError
    )
    assert "input" in str(got[wrong_name])
    assert all(isinstance(got[r], InferResult) for r in (good1, good2, after))


def test_a_request_over_the_servers_limit_is_refused_alone_before_it_is_sent(
    start_server: Any, repo_path: Any
) -> None:
    """grpc's core ends a whole stream on one message over the server's receive limit: every
    other request on it failed with that one's error, answered or not. The server states its
    limit as the stream opens, and the SDK refuses such a request before sending it, naming
    the server's setting, in submit (sync and async) and as its item's answer in infer_many;
    the requests around it are answered."""
    srv = start_server(repo_path, max_message_bytes=64 * 1024)
    big = {"input": np.ones((1000, 64), np.float32)}  # 256 KB
    with InferenceClient(srv.target, timeout=30) as client, client.stream("mlp") as stream:
        before = stream.submit(batch(1), "before")
        with pytest.raises(LimitExceededError, match=r"server's max_message_bytes.*65,536"):
            stream.submit(big, "big")
        after = stream.submit(batch(2), "after")
        got = dict(stream.results())
        assert sorted(got) == sorted([before, after])
        assert all(isinstance(r, InferResult) for r in got.values())
        answers = dict(stream.infer_many([("small", batch(3)), ("big", big)]))
        assert isinstance(answers["small"], InferResult)
        assert isinstance(answers["big"], LimitExceededError)

    async def on_async() -> dict[str, Any]:
        async with (
            AsyncInferenceClient(srv.target, timeout=30) as client,
            client.stream("mlp") as stream,
        ):
            await stream.submit(batch(1), "before")
            with pytest.raises(LimitExceededError, match="was not sent"):
                await stream.submit(big, "big")
            await stream.submit(batch(2), "after")
            return {rid: result async for rid, result in stream.results()}

    got = asyncio.run(on_async())
    assert sorted(got) == ["after", "before"]
    assert all(isinstance(r, InferResult) for r in got.values())


def test_an_id_no_answer_could_repeat_is_refused_before_it_is_sent(
    start_server: Any, repo_path: Any
) -> None:
    """An answer repeats its request's id twice. With an id near the server's limit, even the
    refusal could not carry it, and the server sent it without one, which the SDK matched to no
    request: that request waited for its answer until the stream's deadline (streams have none
    by default). An id over half the server's limit is refused at submit, naming it."""
    srv = start_server(repo_path, max_message_bytes=64 * 1024)
    small = {"input": np.ones(3, np.float32)}  # "fixed": the request fits, the refusal not
    with InferenceClient(srv.target) as client, client.stream("fixed", timeout=20) as stream:
        with pytest.raises(LimitExceededError, match=r"id is 65,400 bytes.*shorter id"):
            stream.submit(small, "i" * 65_400)
        with pytest.raises(LimitExceededError, match=r"id is 40,000 bytes"):
            stream.submit(small, "i" * 40_000)  # its answer could only be a refusal
        kept = stream.submit(small, "i" * 30_000)  # answered: 60,000 bytes of ids fit
        ((rid, result),) = list(stream.results())
        assert rid == kept and isinstance(result, InferResult)


def test_an_answer_over_the_clients_own_limit_fails_its_request_alone(
    start_server: Any, tmp_path: Path
) -> None:
    """An answer over what the client receives (its max_message_bytes) ended the whole stream
    in the client's grpc core, every other request on it failing with that error, answered or
    not. The stream states the client's limit, and the server refuses such an answer alone,
    naming the client's setting; the requests around it are answered (sync and async)."""
    srv = start_server(make_repo(tmp_path / "repo", {"ident": identity_model("FP32")}))
    small = {"input": np.ones((1, 3), np.float32)}
    large = {"input": np.ones((1, 20_000), np.float32)}  # 80 KB each way
    receive = [("grpc.max_receive_message_length", 64 * 1024)]
    with (
        InferenceClient(srv.target, options=receive) as client,
        client.stream("ident", timeout=20) as stream,
    ):
        for rid, inputs in (("before", small), ("large", large), ("after", small)):
            stream.submit(inputs, rid)
        got = dict(stream.results())
    assert isinstance(got["before"], InferResult) and isinstance(got["after"], InferResult)
    assert isinstance(got["large"], LimitExceededError)
    assert "the client's max_message_bytes" in str(got["large"])

    async def on_async() -> dict[str, Any]:
        async with (
            AsyncInferenceClient(srv.target, options=receive) as client,
            client.stream("ident", timeout=20) as stream,
        ):
            for rid, inputs in (("before", small), ("large", large), ("after", small)):
                await stream.submit(inputs, rid)
            return {rid: result async for rid, result in stream.results()}

    got = asyncio.run(on_async())
    assert isinstance(got["before"], InferResult) and isinstance(got["after"], InferResult)
    assert isinstance(got["large"], LimitExceededError)


def test_an_id_no_answer_within_the_clients_limit_could_repeat_is_refused(
    start_server: Any, repo_path: Any
) -> None:
    """The client's own receive limit bounds its answers too: with an id near it, the server's
    refusal went without the id, and the request waited for an answer until the stream ended.
    Such an id is refused at submit, naming the client's setting."""
    srv = start_server(repo_path)
    small = {"input": np.ones(3, np.float32)}
    receive = [("grpc.max_receive_message_length", 64 * 1024)]
    with (
        InferenceClient(srv.target, options=receive) as client,
        client.stream("fixed", timeout=20) as stream,
    ):
        with pytest.raises(LimitExceededError, match=r"id is 65,400 bytes.*client's max_message"):
            stream.submit(small, "i" * 65_400)
        kept = stream.submit(small, "kept")
        ((rid, result),) = list(stream.results())
        assert rid == kept and isinstance(result, InferResult)


def test_unknown_model_errors_per_request(client: InferenceClient) -> None:
    with client.stream("no_such_model") as stream:
        rid = stream.submit(batch(0))
        ((got_id, error),) = list(stream.results())
    assert got_id == rid and isinstance(error, ModelNotFoundError)


def test_duplicate_ids_and_use_after_close_are_refused(client: InferenceClient) -> None:
    stream = client.stream("mlp")
    stream.submit(batch(0), "same")
    with pytest.raises(InvalidInputError, match="already in flight"):
        stream.submit(batch(0), "same")
    stream.close()
    with pytest.raises(FerryError, match="closed"):
        stream.submit(batch(0))
    assert [rid for rid, _ in stream.results()] == ["same"]
    assert stream.wait(30)


def test_list_inputs_take_the_models_dtype_on_streams(client: InferenceClient) -> None:
    with client.stream("two_io") as stream:
        stream.submit({"a": [[1.0, 2.0, 3.0, 4.0]], "b": [[1, 1, 1, 1]]}, "lists")
        ((_, result),) = list(stream.results())
    assert isinstance(result, InferResult)
    np.testing.assert_array_equal(result["sum"], [[2.0, 3.0, 4.0, 5.0]])


def test_infer_many_yields_every_item_once_with_bounded_in_flight(
    client: InferenceClient, expected: dict[int, np.ndarray]
) -> None:
    seen_in_flight: list[int] = []
    with client.stream("mlp") as stream:
        answers = []
        for rid, result in stream.infer_many((batch(i) for i in range(20)), max_in_flight=3):
            seen_in_flight.append(stream.in_flight)
            answers.append((rid, result))
    assert sorted(int(rid) for rid, _ in answers) == list(range(20))
    assert max(seen_in_flight) <= 3
    for rid, result in answers:
        assert isinstance(result, InferResult)
        np.testing.assert_allclose(result["logits"], expected[int(rid)], rtol=1e-6)


def test_client_infer_many_with_named_items(client: InferenceClient) -> None:
    items = [(f"req-{i}", batch(i)) for i in range(5)]
    got = dict(client.infer_many("mlp", items, max_in_flight=2))
    assert set(got) == {f"req-{i}" for i in range(5)}
    assert all(isinstance(r, InferResult) and r.id == rid for rid, r in got.items())


def test_an_item_that_is_neither_inputs_nor_a_pair_is_invalid_input(
    client: InferenceClient, server: Any
) -> None:
    """A tuple of three raised a bare ValueError ("too many values to unpack")."""
    items = [("a", batch(0)), ("b", batch(1), "extra")]
    with pytest.raises(InvalidInputError, match="item 1 is a tuple of 3"):
        list(client.infer_many("mlp", items))

    async def run() -> None:
        async with AsyncInferenceClient(server.target) as aclient:
            with pytest.raises(InvalidInputError, match="item 1 is a tuple of 3"):
                async for _ in aclient.infer_many("mlp", items):
                    pass

    asyncio.run(run())


def test_an_item_whose_id_is_not_a_str_is_invalid_input(
    client: InferenceClient, server: Any
) -> None:
    """``(5, x)`` was sent and answered under "5", so looking its answer up by 5 failed; a
    non-str id is refused, naming the item and the id to give instead."""
    items = [("a", batch(0)), (5, batch(1))]
    with pytest.raises(InvalidInputError, match=r"item 1's id is int 5: .*pass \('5', inputs\)"):
        list(client.infer_many("mlp", items))  # type: ignore[arg-type]

    async def run() -> None:
        async with AsyncInferenceClient(server.target) as aclient:
            with pytest.raises(InvalidInputError, match="item 1's id is int 5"):
                async for _ in aclient.infer_many("mlp", items):  # type: ignore[arg-type]
                    pass

    asyncio.run(run())


def test_an_item_refused_before_it_is_sent_is_that_items_answer_in_infer_many(
    client: InferenceClient, server: Any
) -> None:
    """An item the client itself refused (a number its input's type cannot hold, a value no
    array can be made of) raised out of infer_many, cancelling the stream: every answer in
    flight was lost and the items after it never ran, where the same mistake caught by the
    server was that item's answer. It is now that item's answer too; the others carry on."""
    items = [batch(0), {"input": [[1e39] * 64]}, batch(2), {"input": object()}, batch(4)]

    def check(answers: dict[str, Any]) -> None:
        assert set(answers) == {"0", "1", "2", "3", "4"}
        assert isinstance(answers["1"], InvalidInputError) and "1e+39" in str(answers["1"])
        assert isinstance(answers["3"], InvalidInputError)
        for rid in ("0", "2", "4"):
            assert isinstance(answers[rid], InferResult) and answers[rid].id == rid

    check(dict(client.infer_many("mlp", items, max_in_flight=2)))

    async def run() -> dict[str, Any]:
        async with AsyncInferenceClient(server.target) as aclient:
            return {rid: r async for rid, r in aclient.infer_many("mlp", items, max_in_flight=2)}

    check(asyncio.run(run()))


@pytest.mark.parametrize("bad", [None, True, 1.5, "4"])
def test_max_in_flight_that_is_not_a_count_is_refused(client: InferenceClient, bad: Any) -> None:
    """None raised a bare TypeError from a comparison; True and 1.5 were taken."""
    with pytest.raises(TypeError, match="max_in_flight must be an int >= 1"):
        client.stream("mlp", max_in_flight=bad)
    with client.stream("mlp") as stream, pytest.raises(TypeError, match="max_in_flight"):
        next(iter(stream.infer_many([batch(0)], max_in_flight=bad)))


def test_submit_blocks_at_max_in_flight_without_deadlocking(client: InferenceClient) -> None:
    with client.stream("mlp", max_in_flight=2) as stream:
        ids = [stream.submit(batch(i)) for i in range(12)]  # no reader: answers free the slots
        assert stream.in_flight <= 2
        got = [rid for rid, _ in stream.results()]
    assert sorted(got) == sorted(ids)


def test_a_producer_thread_and_a_consumer(client: InferenceClient) -> None:
    stream = client.stream("mlp")

    def produce() -> None:
        for i in range(15):
            stream.submit(batch(i), f"p{i}")
        stream.close()

    producer = threading.Thread(target=produce)
    producer.start()
    got = [rid for rid, _ in stream.results(until_closed=True)]
    producer.join()
    assert sorted(got) == sorted(f"p{i}" for i in range(15))


def test_cancel_answers_every_request_exactly_once(client: InferenceClient) -> None:
    stream = client.stream("mlp")
    ids = [stream.submit(batch(i)) for i in range(30)]
    stream.cancel()
    got = list(stream.results())
    assert sorted(rid for rid, _ in got) == sorted(ids)
    assert all(isinstance(r, InferResult | CancelledError) for _, r in got)
    with pytest.raises(FerryError):
        stream.submit(batch(0))


def test_server_going_away_fails_what_is_outstanding(start_server: Any, repo_path: Any) -> None:
    srv = start_server(repo_path)
    with InferenceClient(srv.target, timeout=30) as c:
        stream = c.stream("mlp")
        first = stream.submit(batch(0))
        ((rid, result),) = list(stream.results())
        assert rid == first and isinstance(result, InferResult)
        srv.stop(grace=0)
        assert stream.wait(30)  # the call ends with the server, though the stream was not closed
        with pytest.raises(FerryError):  # and submitting then says why
            stream.submit(batch(1))
        assert list(stream.results()) == []


# --- asyncio --------------------------------------------------------------------------------


def test_async_stream_submit_and_results(server: Any, expected: dict[int, np.ndarray]) -> None:
    async def main() -> dict[str, Any]:
        async with AsyncInferenceClient(server.target, timeout=30) as client:
            async with client.stream("mlp") as stream:
                ids = {await stream.submit(batch(i)): i for i in range(20)}
                bad = await stream.submit({"input": np.ones((1, 3), np.float32)})
                got = {rid: r async for rid, r in stream.results()}
            return {"ids": ids, "bad": bad, "got": got}

    out = asyncio.run(main())
    got = out["got"]
    assert isinstance(got.pop(out["bad"]), InvalidInputError)
    assert set(got) == set(out["ids"])
    for rid, result in got.items():
        assert isinstance(result, InferResult) and result.id == rid
        np.testing.assert_allclose(result["logits"], expected[out["ids"][rid]], rtol=1e-6)


def test_async_infer_many_from_an_async_source(server: Any) -> None:
    async def source() -> AsyncIterator[dict[str, np.ndarray]]:
        for i in range(25):
            yield batch(i)

    async def main() -> list[str]:
        async with AsyncInferenceClient(server.target, timeout=30) as client:
            return [
                rid
                async for rid, result in client.infer_many("mlp", source(), max_in_flight=4)
                if isinstance(result, InferResult)
            ]

    assert sorted(int(r) for r in asyncio.run(main())) == list(range(25))


def test_async_stream_flow_control_cancel_and_producer(server: Any) -> None:
    async def main() -> None:
        async with AsyncInferenceClient(server.target, timeout=30) as client:
            stream = client.stream("mlp", max_in_flight=2)
            ids = [await stream.submit(batch(i)) for i in range(10)]
            assert stream.in_flight <= 2
            assert sorted([rid async for rid, _ in stream.results()]) == sorted(ids)
            await stream.close()
            await stream.wait()

            stream = client.stream("mlp")

            async def produce() -> None:
                for i in range(10):
                    await stream.submit(batch(i), f"p{i}")
                await stream.close()

            task = asyncio.create_task(produce())
            got = [rid async for rid, _ in stream.results(until_closed=True)]
            await task
            assert sorted(got) == sorted(f"p{i}" for i in range(10))

            stream = client.stream("mlp")
            ids = [await stream.submit(batch(i)) for i in range(20)]
            await stream.cancel()
            answers = [a async for a in stream.results()]
            assert sorted(rid for rid, _ in answers) == sorted(ids)
            assert all(isinstance(r, InferResult | CancelledError) for _, r in answers)

    asyncio.run(main())


def _held(server: Any) -> Any:
    """The server's only instance of mlp held busy (helpers.ExecutionGate), so that a stream
    with one slot has none free."""
    from helpers import ExecutionGate

    return ExecutionGate(server, "mlp")


def test_a_request_whose_timeout_passes_waiting_for_a_slot_is_not_sent(server: Any) -> None:
    """submit's timeout counts from the submit: a request that waited its whole budget for a
    free slot was sent at the end of the wait with the whole budget again, and run for a
    caller whose time was up. Now the wait is bounded by it and the request is not sent."""
    with (
        _held(server) as gate,
        InferenceClient(server.target, timeout=30) as client,
        client.stream("mlp", max_in_flight=1) as stream,
    ):
        first = stream.submit(batch(0))
        gate.wait_entered()
        late: list[str] = []
        submitter = threading.Thread(
            target=lambda: late.append(stream.submit(batch(1), "late", timeout=0.05))
        )
        submitter.start()
        submitter.join(30)  # the budget ends the wait; before, only the first answer did
        gate.release()
        assert late == ["late"], "submit waited past its request's timeout"
        got = dict(stream.results())
    assert isinstance(got[first], InferResult)
    assert isinstance(got["late"], DeadlineExceededError)
    assert "was not sent" in str(got["late"]) and "max_in_flight" in str(got["late"])
    assert gate.calls == 1  # the late request never reached the model


def test_an_async_request_whose_timeout_passes_waiting_for_a_slot_is_not_sent(
    server: Any,
) -> None:
    async def main() -> None:
        async with AsyncInferenceClient(server.target, timeout=30) as client:
            stream = client.stream("mlp", max_in_flight=1)
            first = await stream.submit(batch(0))
            await asyncio.to_thread(gate.wait_entered)
            try:
                late = await asyncio.wait_for(stream.submit(batch(1), "late", timeout=0.05), 30)
            finally:
                gate.release()
            got = {rid: result async for rid, result in stream.results()}
            await stream.close()
            assert late == "late"
            assert isinstance(got[first], InferResult)
            assert isinstance(got["late"], DeadlineExceededError)
            assert "was not sent" in str(got["late"])

    with _held(server) as gate:
        asyncio.run(main())
        assert gate.calls == 1


def test_a_submit_racing_cancel_raises_the_streams_cancelled_error(server: Any) -> None:
    """A submit that had not sent its request when cancel() came (waiting for a slot, or made
    after it) raised a plain FerryError ("this stream is closed" / "has ended") or grpc's
    "Locally cancelled by application!", depending on the turn; it is now always
    ferry.client.CancelledError saying cancel() was called, in both flavours, and the request
    is not sent."""
    with (
        _held(server) as gate,
        InferenceClient(server.target, timeout=30) as client,
    ):
        stream = client.stream("mlp", max_in_flight=1)
        first = stream.submit(batch(0))
        gate.wait_entered()
        raised: list[BaseException] = []

        def blocked() -> None:
            try:
                stream.submit(batch(1), "blocked")
            except BaseException as exc:
                raised.append(exc)

        submitter = threading.Thread(target=blocked)
        submitter.start()
        stream.cancel()
        submitter.join(30)
        with pytest.raises(CancelledError, match=r"cancel\(\)"):
            stream.submit(batch(2))
        assert len(raised) == 1 and isinstance(raised[0], CancelledError), raised
        assert "cancel()" in str(raised[0])
        assert stream.wait(30)
        ((rid, result),) = list(stream.results())
        assert rid == first and isinstance(result, CancelledError)
        assert "cancel()" in str(result)

    async def main() -> None:
        async with AsyncInferenceClient(server.target, timeout=30) as client:
            stream = client.stream("mlp", max_in_flight=1)
            first = await stream.submit(batch(0))
            await asyncio.to_thread(gate.wait_entered)
            blocked = asyncio.create_task(stream.submit(batch(1), "blocked"))
            cancelling = asyncio.create_task(stream.cancel())
            for _ in range(10_000):  # loop turns until cancel() has begun (not yet ended)
                if stream._cancelled:
                    break
                await asyncio.sleep(0)
            assert stream._cancelled
            with pytest.raises(CancelledError, match=r"cancel\(\)"):
                await stream.submit(batch(2))
            with pytest.raises(CancelledError, match=r"cancel\(\)"):
                await blocked
            await cancelling
            with pytest.raises(CancelledError, match=r"cancel\(\)"):
                await stream.submit(batch(3))
            answers = [a async for a in stream.results()]
            assert [rid for rid, _ in answers] == [first]
            assert isinstance(answers[0][1], CancelledError)

    with _held(server) as gate:
        asyncio.run(main())


def test_a_stream_that_ended_leaves_no_thread_behind(client: InferenceClient) -> None:
    """A stream whose call ended (its deadline, the server gone, the client closed) without
    close() kept gRPC's thread that feeds it waiting for a next request for good: one thread
    per such stream, for the life of the process."""
    x = {"input": np.zeros((1, 64), np.float32)}
    client.infer("mlp", x)  # the server's own threads start here, not below
    before = set(threading.enumerate())
    for _ in range(3):
        stream = client.stream("mlp", timeout=0.5)
        stream.submit(x)
        assert [type(r).__name__ for _, r in stream.results()] == ["InferResult"]
        assert stream.wait(30)  # the call ends at its deadline; close() is never called
    for thread in set(threading.enumerate()) - before:
        thread.join(30)
        assert not thread.is_alive(), thread.name
