"""A rollout set through the management listener is followed by every protocol: ferry.v1 gRPC and
the Open Inference Protocol over gRPC (tritonclient's wire) and HTTP. A request's id decides its
version; a request that names a version bypasses the split."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import hold_loads, make_repo, wait_for
from onnx import TensorProto, helper, numpy_helper
from serverutil import ServerThread

from ferry.client import FerryError, InferenceClient, NotFoundError, RepositoryClient
from ferry.server.core import rollout as rollouts
from ferry.server.examples import seed_model

X = {"input": np.ones((1, 3), np.float32)}
IDS = [f"user-{i}" for i in range(60)]


def _http_version(port: int, request_id: str) -> int:
    body = {
        "id": request_id,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 1, 1]}],
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/m/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read())["model_version"])


def _oip_grpc_version(target: str, request_id: str) -> int:
    import grpc

    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb

    request = kpb.ModelInferRequest(model_name="m", id=request_id)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, 3])
    request.raw_input_contents.append(X["input"].tobytes())
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=kpb.ModelInferRequest.SerializeToString,
            response_deserializer=kpb.ModelInferResponse.FromString,
        )
        return int(infer(request, timeout=30).model_version)


def test_every_protocol_follows_the_split_set_through_management(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server:
        assert server.app is not None
        expected = rollouts.parse_split({1: 1, 2: 1})
        with RepositoryClient(server.management_target) as repo:
            view = repo.set_rollout("m", {1: 1.0, 2: 1.0}, reason="int8 canary")
            assert view.split == {1: 1.0, 2: 1.0}
            assert view.history[-1].reason == "int8 canary" and view.history[-1].by
            with pytest.raises(NotFoundError):
                repo.set_rollout("m", {9: 1.0})
        with InferenceClient(server.target) as client:
            versions = [client.infer("m", X, request_id=i).version for i in IDS]
            assert versions == [expected.pick("m", i) for i in IDS]
            assert {1, 2} <= set(versions)  # both versions answer
            assert {client.infer("m", X, version=1, request_id=i).version for i in IDS} == {1}
        http = [_http_version(server.app.http_port, i) for i in IDS]
        assert http == [expected.pick("m", i) for i in IDS]
        oip = [_oip_grpc_version(server.target, i) for i in IDS[:20]]
        assert oip == [expected.pick("m", i) for i in IDS[:20]]
        with RepositoryClient(server.management_target) as repo:
            assert repo.set_rollout("m", None, reason="rolled back").split == {}
            assert [h.reason for h in repo.get_rollout("m").history] == [
                "int8 canary",
                "rolled back",
            ]


def test_a_request_that_fails_to_decode_under_a_split_fails_on_the_version_its_id_picks(
    tmp_path: Path,
) -> None:
    """A request naming no version that failed to decode (data short of its shape) was counted
    on the split's largest share (ties: the newest, version 2) whatever its id, though its id
    picks its version: every such request of ids the split sends to version 1 was version 2's
    failure, in ModelStatistics and ferry_requests_total alike, over each protocol."""
    import urllib.error

    import grpc
    from helpers import scrape

    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
    from ferry.proto.v1 import inference_pb2 as fpb

    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    split = rollouts.parse_split({1: 1, 2: 1})
    ones = [i for i in IDS if split.pick("m", i) == 1][:2]
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        assert server.app is not None
        repo.set_rollout("m", {1: 1.0, 2: 1.0}, reason="half")
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1]}]}
        with grpc.insecure_channel(server.target) as channel:
            for rid in ones:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{server.app.http_port}/v2/models/m/infer",
                    data=json.dumps({**body, "id": rid}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=30)
                assert refused.value.code == 400
                oip = kpb.ModelInferRequest(model_name="m", id=rid)
                tensor = oip.inputs.add()
                tensor.name, tensor.datatype = "input", "FP32"
                tensor.shape.extend([1, 3])
                oip.raw_input_contents.append(b"\0" * 4)  # 1 float for 3
                infer = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=kpb.ModelInferRequest.SerializeToString,
                    response_deserializer=kpb.ModelInferResponse.FromString,
                )
                with pytest.raises(grpc.RpcError) as rpc:
                    infer(oip, timeout=30)
                assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                ferry = fpb.InferRequest(model="m", id=rid)
                ferry.inputs.add(name="input", dtype=12, shape=[1, 3], data=b"\0" * 4)  # FP32
                call = channel.unary_unary(
                    "/ferry.v1.Inference/Infer",
                    request_serializer=fpb.InferRequest.SerializeToString,
                    response_deserializer=fpb.InferResponse.FromString,
                )
                with pytest.raises(grpc.RpcError) as rpc:
                    call(ferry, timeout=30)
                assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with InferenceClient(server.target) as client:
            fails = {s.version: s.fail.count for s in client.statistics("m")}
        assert fails == {1: 6, 2: 0}
        text = scrape(server.app.metrics_port)
        assert 'ferry_requests_total{model="m",version="1",code="INVALID_ARGUMENT"} 6' in text
        assert 'version="2",code="INVALID_ARGUMENT"' not in text


def test_infer_many_items_follow_the_split_call_after_call(tmp_path: Path) -> None:
    """infer_many sent an item without an id under its position, so item 0 of every call had
    the id "0", and the split (sticky by id) sent it to the same version each time: 40 calls of
    one item under a 50/50 split all went to version 2. Each call's items now travel under
    fresh ids, and are still yielded under their positions."""
    import asyncio

    from ferry.client import AsyncInferenceClient

    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        repo.set_rollout("m", {1: 1.0, 2: 1.0}, reason="half")
        with InferenceClient(server.target) as client:
            answers = [next(iter(client.infer_many("m", [X]))) for _ in range(40)]
            assert {rid for rid, _ in answers} == {"0"}
            assert all(not isinstance(r, FerryError) and r.id == "0" for _, r in answers)
            # 40 one-item calls placed independently: all on one side is 2 in 2**40.
            assert {r.version for _, r in answers if not isinstance(r, FerryError)} == {1, 2}
            named = dict(client.infer_many("m", [("user-7", X)]))
            assert named["user-7"].version == rollouts.parse_split({1: 1, 2: 1}).pick("m", "user-7")

        async def async_calls() -> set[int]:
            async with AsyncInferenceClient(server.target) as aclient:
                seen = set()
                for _ in range(40):
                    async for rid, r in aclient.infer_many("m", [X]):
                        assert rid == "0" and not isinstance(r, FerryError)
                        seen.add(r.version)
                return seen

        assert asyncio.run(async_calls()) == {1, 2}


def test_shadow_set_through_management_is_compared_and_reported(tmp_path: Path) -> None:
    from helpers import wait_for

    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        view = repo.set_rollout("m", None, shadow=(1, 1.0), reason="shadow int8")
        assert (view.shadow_version, view.shadow_fraction) == (1, 1.0)
        last = view.history[-1]  # the change that set it says so (it read as "ended")
        assert (last.split, last.shadow_version, last.shadow_fraction) == ({}, 1, 1.0)
        with InferenceClient(server.target) as client:
            for i in IDS[:10]:
                assert client.infer("m", X, request_id=i).version == 2

        def settled() -> bool:  # each of the 10 compared, or shed (the candidate was busy)
            s = repo.get_rollout("m").shadow
            return s["compared"] + s["shed"] + s["errors"] == 10

        wait_for(settled, "the 10 shadow runs to end")
        shadow = repo.get_rollout("m").shadow
        assert shadow["errors"] == 0 and shadow["max_abs_diff"] > 0
        from helpers import scrape

        assert server.app is not None
        text = scrape(server.app.metrics_port)
        compared = int(repo.get_rollout("m").shadow["compared"])
        assert compared >= 1
        assert f'ferry_shadow_compared_total{{model="m",candidate="1"}} {compared}' in text
        assert shadow["top1_agreement"] == -1  # one output column: not class scores
        rules = {"promote_after": 1000, "min_cosine": 0.5}
        view = repo.set_rollout("m", {2: 1.0}, shadow=(1, 0.5), rules=rules, reason="rules")
        assert view.rules == {"promote_after": 1000.0, "min_cosine": 0.5}
        assert repo.get_rollout("m").rules == view.rules


def test_a_shadow_comparison_started_afresh_goes_on_counting_on_metrics(tmp_path: Path) -> None:
    """A shadow set again (or its rules changed) starts its comparison afresh, and its /metrics
    counters with it, under the same labels: where the new comparison outcounted the old one
    before the next scrape, Prometheus read growth (compared 3, then 5 for 5 more). They go on
    while every scrape shows the shadow (3 + 5), as a version's counters do (metrics_carry),
    while GetRollout shows the comparison the rules judge."""
    from helpers import scrape, wait_for

    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        assert server.app is not None
        port = server.app.metrics_port

        def counters() -> tuple[int, int, int]:
            s = repo.get_rollout("m").shadow
            return int(s["compared"]), int(s["errors"]), int(s["shed"])

        def shown(text: str) -> tuple[int, int, int]:
            lab = '{model="m",candidate="1"}'
            found = []
            for name in ("compared", "errors", "shed"):
                line = next(x for x in text.splitlines() if x.startswith(f"ferry_shadow_{name}"))
                assert line.startswith(f"ferry_shadow_{name}_total{lab} "), line
                found.append(int(float(line.rsplit(" ", 1)[1])))
            return found[0], found[1], found[2]

        totals = (0, 0, 0)
        for n, reason in ((3, "shadow"), (5, "the same shadow again")):
            repo.set_rollout("m", None, shadow=(1, 1.0), reason=reason)
            with InferenceClient(server.target) as client:
                for i in IDS[:n]:
                    client.infer("m", X, request_id=i)
            wait_for(lambda n=n: sum(counters()) == n, f"the {n} shadow runs to end")
            totals = tuple(a + b for a, b in zip(totals, counters(), strict=True))
            assert shown(scrape(port)) == totals
        assert sum(totals) == 8
        # Ended, the shadow leaves /metrics: its last comparison was shown for good, its
        # gauges (the lowest cosine...) read as a comparison still running.
        repo.set_rollout("m", None, reason="shadow ended")
        assert "ferry_shadow_" not in scrape(port)


def test_shadow_runs_are_no_requests_in_the_candidates_per_request_statistics(
    tmp_path: Path,
) -> None:
    """A shadow run is work the candidate did (executions, inferences, batch_stats) but neither
    a success nor a failure, so it adds nothing to the per-request queue and compute figures:
    they were counted, and perf_analyzer, which divides them by the success count, reported
    the candidate's queue and compute per request five times over (1 request, 5 counted)."""
    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        repo.set_rollout("m", {2: 1.0}, shadow=(1, 1.0))
        with InferenceClient(server.target) as client:
            for i in IDS[:4]:
                assert client.infer("m", X, request_id=i).version == 2

            def settled() -> bool:
                s = repo.get_rollout("m").shadow
                return s["compared"] + s["shed"] + s["errors"] == 4

            wait_for(settled, "the 4 shadow runs to end")
            shadowed = int(repo.get_rollout("m").shadow["compared"])
            assert shadowed >= 1
            client.infer("m", X, version=1)  # the candidate's one request of its own
            (s,) = client.statistics("m", version=1)
    assert (s.success.count, s.fail.count) == (1, 0)
    assert (s.queue.count, s.compute_input.count, s.compute_infer.count) == (1, 1, 1)
    assert s.compute_output.count == 1
    assert (s.execution_count, s.inference_count) == (shadowed + 1, shadowed + 1)
    assert s.batch_sizes == {1: shadowed + 1}


def test_a_shadow_shed_in_the_candidates_queue_is_no_expired_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shadow run whose time in the candidate's queue ran out is shed (GetRollout's shed):
    no caller's request expired. It was counted in the candidate's expired_count and
    ferry_expired_total, which say a request failed DEADLINE_EXCEEDED, while fail stayed 0."""
    from helpers import ExecutionGate, scrape

    from ferry.server.core import shadow

    monkeypatch.setattr(shadow, "SHADOW_TIMEOUT", 0.2)  # a shadow's wait, shortened
    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        assert server.app is not None
        repo.set_rollout("m", {2: 1.0}, shadow=(1, 1.0))
        with ExecutionGate(server, "m", 1) as gate, InferenceClient(server.target) as client:
            client.infer("m", X, request_id=IDS[0])
            gate.wait_entered()  # the first shadow runs on the candidate, held there
            client.infer("m", X, request_id=IDS[1])  # its shadow queues behind it, and expires
            wait_for(lambda: repo.get_rollout("m").shadow["shed"] == 1, "the shadow to be shed")
            gate.release()
            wait_for(lambda: repo.get_rollout("m").shadow["compared"] == 1, "the first compared")
            (s,) = client.statistics("m", version=1)
        assert (s.expired_count, s.rejected_count, s.fail.count, s.success.count) == (0, 0, 0, 0)
        text = scrape(server.app.metrics_port)
        assert 'ferry_expired_total{model="m",version="1"} 0' in text


def test_a_busy_candidate_sheds_shadow_work_and_the_callers_never_wait(tmp_path: Path) -> None:
    """The candidate's only instance is held: one shadow runs (held), one may queue, and every
    further one is shed at once, while every caller is answered by the served version."""
    from helpers import ExecutionGate, wait_for

    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        repo.set_rollout("m", None, shadow=(1, 1.0))
        with ExecutionGate(server, "m", 1) as gate, InferenceClient(server.target) as client:
            assert client.infer("m", X, request_id="first").version == 2
            gate.wait_entered()  # the first shadow holds the candidate
            for i in IDS[:20]:
                assert client.infer("m", X, request_id=i, timeout=10).version == 2
            shadow = repo.get_rollout("m").shadow
            assert shadow["shed"] >= 19 and shadow["compared"] == 0
        wait_for(lambda: repo.get_rollout("m").shadow["compared"] >= 1, "the held shadow to end")


def test_a_shadow_expired_in_the_candidates_queue_is_no_request_of_the_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shadow run that waited out its time in the candidate's queue was counted as an
    expired request of the candidate's (ModelStatistics expired_count, ferry_expired_total),
    though no caller sent the candidate anything: it is shed, counted in the comparison only."""
    from helpers import ExecutionGate, scrape, stats, wait_for

    from ferry.server.core import shadow

    monkeypatch.setattr(shadow, "SHADOW_TIMEOUT", 0.2)  # the queued shadow's wait, shortened
    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        assert server.app is not None
        repo.set_rollout("m", None, shadow=(1, 1.0))
        with ExecutionGate(server, "m", 1) as gate, InferenceClient(server.target) as client:
            assert client.infer("m", X, request_id="first").version == 2
            gate.wait_entered()  # the first shadow holds the candidate's one instance
            assert client.infer("m", X, request_id="second").version == 2  # its shadow queues
            wait_for(lambda: repo.get_rollout("m").shadow["shed"] == 1, "the queued shadow shed")
            candidate = stats(client, "m", 1)
            assert (candidate.expired_count, candidate.rejected_count) == (0, 0)
        text = scrape(server.app.metrics_port)
        assert 'ferry_expired_total{model="m",version="1"} 0' in text


def _fails_every_request_of_one_row() -> onnx.ModelProto:
    """seed_model's interface whose run fails for a batch of one row (a Reshape to [-1, 12])."""
    shape = numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "shape"], ["r"]),
            helper.make_node("ReduceSum", ["r"], ["logits"], keepdims=1, axes=[1]),
        ],
        "fails",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)


def test_a_split_set_again_after_a_rollback_is_judged_again(tmp_path: Path) -> None:
    """The split rule took version 3 out; a person puts it back with the same split and rule:
    its failures are counted afresh and it is taken out again (it was never judged again, and
    failed its share of requests for as long as the process lived)."""
    root = make_repo(
        tmp_path / "repo",
        {"m": [seed_model(seed=1), seed_model(seed=2), _fails_every_request_of_one_row()]},
    )
    with (
        ServerThread(root) as server,
        InferenceClient(server.target, timeout=30) as client,
        RepositoryClient(server.management_target, timeout=60) as repo,
    ):
        ids = iter(range(1_000_000))  # a fresh id for every request: the split places each

        def rolled_back() -> bool:
            for _ in range(20):
                with contextlib.suppress(FerryError):
                    client.infer("m", X, request_id=f"r-{next(ids)}")
            return repo.get_rollout("m").split == {2: 1.0}

        for attempt in (1, 2):
            repo.set_rollout("m", {2: 1, 3: 1}, rules={"max_error_rate": 0.2}, reason="canary")
            wait_for(rolled_back, f"version 3 rolled out of the split (attempt {attempt})")


def test_no_management_edit_puts_a_shadow_candidate_on_traffic(tmp_path: Path) -> None:
    """Shadow 2 beside the version every request gets: clearing the configured default (2 is
    then the newest) or deleting the newer version 3 answered OK and sent every request to
    the candidate, which nobody had promoted."""
    from ferry.client import ConversionClient, FailedPreconditionError

    root = make_repo(
        tmp_path / "repo",
        {
            "a": [seed_model(seed=1), seed_model(seed=2)],
            "b": [seed_model(seed=1), seed_model(seed=2), seed_model(seed=3)],
        },
    )
    (root / "a" / "config.json").write_text(json.dumps({"default_version": 1}))
    with (
        ServerThread(root) as server,
        InferenceClient(server.target, timeout=30) as client,
        RepositoryClient(server.management_target, timeout=60) as repo,
        ConversionClient(server.management_target, timeout=60) as conversion,
    ):
        repo.set_rollout("a", None, shadow=(2, 0.5))
        repo.set_rollout("b", None, shadow=(2, 0.5))
        with pytest.raises(FailedPreconditionError, match="shadow candidate"):
            conversion.set_default_version("a", None)
        with pytest.raises(FailedPreconditionError, match="shadow candidate"):
            conversion.set_default_version("a", 2)
        with pytest.raises(FailedPreconditionError, match="shadow candidate"):
            conversion.delete_version("b", 3)
        assert client.infer("a", X).version == 1 and client.infer("b", X).version == 3
        repo.set_rollout("a", {2: 1}, reason="promoted")  # the way to put it on traffic
        conversion.set_default_version("a", None)
        assert client.infer("a", X).version == 2


def test_a_shadow_of_version_zero_is_refused_and_the_live_shadow_stays(tmp_path: Path) -> None:
    """shadow_version 0 means no shadow: shadow=(0, 0.5) was answered OK, set no shadow, and
    ended the live one without a word."""
    from ferry.client import InvalidInputError

    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        repo.set_rollout("m", {2: 1.0}, shadow=(1, 0.5), reason="shadow 1")
        with pytest.raises(InvalidInputError, match="without a shadow_version"):
            repo.set_rollout("m", {2: 1.0}, shadow=(0, 0.5), reason="typo")
        view = repo.get_rollout("m")
        assert (view.shadow_version, view.shadow_fraction) == (1, 0.5)
        assert [h.reason for h in view.history] == ["shadow 1"]


def _identity(width: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_set_rollout_whose_caller_left_is_carried_to_its_end(tmp_path: Path) -> None:
    """The client's deadline passed while SetRollout loaded a version: cancelled half-way, the
    split stayed written though its versions differ (never checked, never restored), and the
    version stayed LOADING for good. The change now runs to its end: here it is refused after
    the load, and put back as it was."""

    from ferry.client import DeadlineExceededError

    root = make_repo(tmp_path / "repo", {"m": [_identity(3), _identity(4)]})
    with ServerThread(root) as server:
        assert server.app is not None
        registry = server.app.registry
        entered, gate = hold_loads(server, "1")
        with RepositoryClient(server.management_target, timeout=1.0) as repo:
            with pytest.raises(DeadlineExceededError):
                repo.set_rollout("m", {1: 1.0, 2: 1.0}, reason="left")
            assert entered.is_set()
            gate.set()

            def settled() -> bool:
                return [(s.version, s.state.value) for s in registry.statuses("m")] == [
                    (2, "READY")
                ]

            wait_for(settled, "the change to end and version 1 to go")
            assert not (root / "m" / rollouts.ROLLOUT_FILE).exists()
            assert repo.get_rollout("m").split == {}


def test_a_hand_edited_history_with_a_lone_surrogate_is_shown_and_kept(tmp_path: Path) -> None:
    """JSON's "\\ud800" reads as a lone surrogate, which UTF-8 cannot carry: a hand-edited
    history holding one failed GetRollout and every SetRollout INTERNAL (the answer, and the
    file written with the history, could not be encoded)."""
    root = make_repo(tmp_path / "repo", {"m": [seed_model(seed=1), seed_model(seed=2)]})
    entry = {"at": "\\ud800", "by": "me \\udfff", "why": "typed \\ud83d", "split": {"1": 1}}
    text = json.dumps({"history": [entry]}).replace("\\\\u", "\\u")
    (root / "m" / rollouts.ROLLOUT_FILE).write_text(text)
    with ServerThread(root) as server, RepositoryClient(server.management_target) as repo:
        assert [h.by for h in repo.get_rollout("m").history] == ["me \ufffd"]
        repo.set_rollout("m", {1: 1.0, 2: 1.0}, reason="after the edit")
        view = repo.get_rollout("m")
        assert [h.reason for h in view.history] == ["typed \ufffd", "after the edit"]
        assert view.split == {1: 1.0, 2: 1.0}
    history = rollouts.history(root / "m")
    assert history[0]["why"] == "typed \ud83d"  # kept as it was written
