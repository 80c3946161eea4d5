"""``Job.wait()``/``Job.events()`` behind something that ends a long watch cleanly before the job
ended (a proxy's stream timeout, a load balancer): the SDK must watch again, not read the job
as it stood (RUNNING) and call it failed. A real gRPC server on 127.0.0.1 plays that proxy."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from ferry.client import ConversionClient, DeadlineExceededError, JobFailedError, _conversion
from ferry.proto.v1 import model_conversion_pb2 as pb
from ferry.proto.v1 import model_conversion_pb2_grpc as pb_grpc

RUNNING, SUCCEEDED = pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED


class CutWatches(pb_grpc.ModelConversionServicer):
    """A job whose events arrive over ``rounds`` watches, each ended cleanly after the events
    of its round (every watch replays from the first event, as the server's does)."""

    def __init__(self, rounds: list[list[int]], finish: bool = True) -> None:
        self.rounds = rounds
        self.finish = finish
        self.watches = 0

    def _events(self) -> list[pb.ProgressEvent]:
        upto = self.rounds[min(self.watches, len(self.rounds) - 1)]
        last = len(self.rounds) - 1
        return [
            pb.ProgressEvent(
                job_id="j1",
                seq=seq,
                stage="export",
                state=SUCCEEDED if self.finish and seq == self.rounds[last][-1] else RUNNING,
            )
            for seq in upto
        ]

    def WatchJob(self, request: Any, context: Any) -> Iterator[pb.ProgressEvent]:
        events = self._events()
        self.watches += 1
        yield from events

    def GetJob(self, request: Any, context: Any) -> pb.Job:
        done = self.finish and self.watches >= len(self.rounds)
        return pb.Job(
            job_id="j1", model="m", state=SUCCEEDED if done else RUNNING, version=3 if done else 0
        )


@pytest.fixture
def proxy() -> Iterator[tuple[CutWatches, ConversionClient]]:
    servicer = CutWatches([])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ModelConversionServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ConversionClient(f"127.0.0.1:{port}", timeout=10) as client:
            yield servicer, client
    finally:
        server.stop(None)


def test_wait_resumes_a_watch_ended_early(
    proxy: tuple[CutWatches, ConversionClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three watches, each cut after more events: every event is given once, in order, and the
    job comes back SUCCEEDED (it was JobFailedError on a RUNNING job after the first cut)."""
    monkeypatch.setattr(_conversion, "_RESUME_PAUSE", (0.0, 0.0), raising=False)
    servicer, client = proxy
    servicer.rounds = [[1, 2], [1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5]]
    seen: list[int] = []
    job = client.job("j1")
    assert job.state == "RUNNING"
    done = job.wait(timeout=30, progress=lambda event: seen.append(event.seq))
    assert done.state == "SUCCEEDED" and done.version == 3
    assert seen == [1, 2, 3, 4, 5]
    assert servicer.watches == 4


def test_wait_that_never_ends_runs_out_of_its_timeout(
    proxy: tuple[CutWatches, ConversionClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose watch keeps ending while it runs: wait() is bounded by its timeout and says
    so with DeadlineExceededError (not JobFailedError on a job that did not fail)."""
    monkeypatch.setattr(_conversion, "_RESUME_PAUSE", (0.01, 0.05), raising=False)
    servicer, client = proxy
    servicer.rounds = [[1]]
    servicer.finish = False
    job = client.job("j1")
    with pytest.raises(DeadlineExceededError):
        job.wait(timeout=0.5, progress=False)
    assert job.state == "RUNNING"


class StoppingServer(pb_grpc.ModelConversionServicer):
    """A server that stops during the job: it fails the job, sends the watch that end, and
    refuses every later call (its listener closing) with UNAVAILABLE."""

    STOPPED = "the server stopped during the job; convert again"

    def WatchJob(self, request: Any, context: Any) -> Iterator[pb.ProgressEvent]:
        yield pb.ProgressEvent(job_id="j1", seq=1, stage="export", state=RUNNING)
        yield pb.ProgressEvent(
            job_id="j1",
            seq=2,
            stage="export",
            state=pb.JOB_STATE_FAILED,
            message=self.STOPPED,
            error_kind="UNAVAILABLE",
        )

    def GetJob(self, request: Any, context: Any) -> pb.Job:
        context.abort(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")


def test_wait_ended_by_a_stopping_server_says_what_the_server_said() -> None:
    """`ferry convert` against a server stopped during the job said "UNAVAILABLE: failed to
    connect to all addresses": the job's end (FAILED, "the server stopped during the job")
    had arrived, but the refresh after it, and the check after the watch, found the listener
    closed. The end the server sent is the answer now."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ModelConversionServicer_to_server(StoppingServer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ConversionClient(f"127.0.0.1:{port}", timeout=10) as client:
            job = _conversion.Job(id="j1", model="m", state="RUNNING", _client=client)
            with pytest.raises(JobFailedError) as info:
                job.wait(timeout=30, progress=False)
    finally:
        server.stop(None)
    assert job.state == "FAILED" and job.error_message == StoppingServer.STOPPED
    assert StoppingServer.STOPPED in info.value.message
