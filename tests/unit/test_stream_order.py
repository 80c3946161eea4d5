"""The Open Inference Protocol's stream answers in request order, as Triton answers a model that
is not decoupled: tritonclient's stream callback may match answers to requests by their order
alone. ferry.v1's stream answers as requests complete (its answers always carry the id)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ferry.server.core.streams import StreamBudget, run_stream


async def _requests(count: int) -> AsyncIterator[int]:
    for i in range(count):
        yield i


def _first_slow(count: int, *, ordered: bool, fail: int | None = None) -> list[str]:
    """Request 0 finishes last: it waits until every other request has been answered by its
    handler. ``fail``: a request whose handler raises instead of answering."""

    async def scenario() -> list[str]:
        others_done = asyncio.Event()
        finished = 0

        async def handle(i: int) -> str:
            nonlocal finished
            if i == 0:
                await others_done.wait()
            else:
                finished += 1
                if finished == count - 1:
                    others_done.set()
                if i == fail:
                    raise RuntimeError("handler failed")
            return f"answer {i}"

        budget = StreamBudget(count)
        stream = run_stream(_requests(count), handle, count, budget, ordered=ordered)
        answers = [answer async for answer in stream]
        assert budget.held == 0  # every slot given back
        return answers

    return asyncio.run(scenario())


def test_an_ordered_stream_answers_in_request_order_whatever_finishes_first() -> None:
    assert _first_slow(5, ordered=True) == [f"answer {i}" for i in range(5)]


def test_an_unordered_stream_answers_as_requests_complete() -> None:
    assert _first_slow(5, ordered=False)[-1] == "answer 0"


def test_an_ordered_stream_whose_handler_raised_does_not_wait_for_that_answer() -> None:
    """The protocol adapters turn every error into an answer; a handler that raised all the same
    has no answer to send, and the answers after it are not held for it."""
    assert _first_slow(4, ordered=True, fail=2) == ["answer 0", "answer 1", "answer 3"]


def _broken_after(count: int, *, ordered: bool) -> tuple[list[str], BaseException | None]:
    """A request stream that breaks (a malformed message) after ``count`` good requests, each
    still running when the break reaches the stream."""

    async def scenario() -> tuple[list[str], BaseException | None]:
        broke = asyncio.Event()

        async def requests() -> AsyncIterator[int]:
            for i in range(count):
                yield i
            broke.set()
            raise ValueError("malformed request")

        async def handle(i: int) -> str:
            await broke.wait()
            return f"answer {i}"

        answers: list[str] = []
        try:
            async for answer in run_stream(requests(), handle, 8, ordered=ordered):
                answers.append(answer)
        except ValueError as exc:
            return answers, exc
        return answers, None

    return asyncio.run(scenario())


def test_a_broken_request_stream_answers_what_it_read_before_its_error() -> None:
    for ordered in (True, False):
        answers, error = _broken_after(3, ordered=ordered)
        assert sorted(answers) == ["answer 0", "answer 1", "answer 2"], ordered
        assert isinstance(error, ValueError)  # and the call still ends with the break's error
