"""tritonclient's stream against Ferry: answers in request order, as Triton answers a model that
is not decoupled, so a callback that matches answers to requests by their order (request ids are
optional in tritonclient) reads each answer as its own request's."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import tritonclient.grpc as tg
from helpers import ExecutionGate, StartServer, make_repo, stats, wait_for, write_config

from ferry.client import InferenceClient
from ferry.server.examples import identity_model

WAIT = 30.0  # upper bound on waiting for a stream answer; only reached when broken


def _tensor(value: float) -> tg.InferInput:
    tensor = tg.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))
    return tensor


def test_a_later_request_that_finishes_first_is_answered_after_the_earlier_one(
    tmp_path: Path, start_server: StartServer
) -> None:
    root = make_repo(
        tmp_path / "repo", {"slow": identity_model("FP32"), "fast": identity_model("FP32")}
    )
    write_config(root, "slow", {"batching": {"max_batch_size": 0}, "instances": {"count": 1}})
    srv = start_server(root)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    triton = tg.InferenceServerClient(srv.target)
    with ExecutionGate(srv, "slow") as gate, InferenceClient(srv.target) as client:
        triton.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            triton.async_stream_infer("slow", [_tensor(1.0)])  # no request id: order alone
            gate.wait_entered()
            triton.async_stream_infer("fast", [_tensor(2.0)])
            # The fast one has run and been answered by the server's core: in completion
            # order it would be written now, ahead of the slow one.
            wait_for(lambda: stats(client, "fast").success.count == 1, "the fast request to run")
            gate.release()
            got = [answers.get(timeout=WAIT) for _ in range(2)]
        finally:
            triton.stop_stream()
    assert [error for _, error in got] == [None, None]
    values = [float(result.as_numpy("output")[0, 0]) for result, _ in got]  # type: ignore[attr-defined]
    assert values == [1.0, 2.0]
