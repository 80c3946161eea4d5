"""ferry.client.loadtest against a real server on loopback, every run bounded by a request count:
closed and open loops, unary and streaming, both protocols, reports and refusals."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serverutil import ServerThread

from ferry.client import InferenceClient, InvalidInputError, ModelNotFoundError
from ferry.client.loadtest import (
    InputError,
    LevelResult,
    LoadTestConfig,
    LoadTestConfigError,
    LoadTestReport,
    PlotUnavailableError,
    generate_inputs,
    load_inputs,
    plot_report,
    run,
)
from ferry.client.loadtest._engine import Progress, _kserve_answer, id_field
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.v1 import inference_pb2 as pb


def config(server: Any, **kwargs: Any) -> LoadTestConfig:
    base: dict[str, Any] = {
        "target": server.target,
        "duration": None,
        "requests": 60,
        "warmup": 0.0,
    }
    base.update(kwargs)
    return LoadTestConfig("mlp", **base)


def check_level(level: LevelResult, requests: int) -> None:
    assert level.ok == requests and level.errors == {}
    lat = level.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert level.throughput > 0
    assert level.server is not None
    assert level.server.requests == requests  # the statistics delta saw exactly this level
    assert level.server.compute_ms > 0 and level.server.queue_ms >= 0


@pytest.mark.parametrize(
    ("mode", "protocol"),
    [("unary", "ferry"), ("stream", "ferry"), ("unary", "kserve"), ("stream", "kserve")],
)
def test_closed_loop_sweep(server: Any, mode: str, protocol: str) -> None:
    report = run(config(server, concurrency=(1, 4), mode=mode, protocol=protocol), progress=False)
    assert [lv.level for lv in report.levels] == [1, 4]
    for lv in report.levels:
        assert lv.loop == "closed" and lv.mode == mode and lv.protocol == protocol
        check_level(lv, 60)


def test_the_server_split_sums_every_target(server: Any, repo_path: Path) -> None:
    """With two targets one balanced client asked one server before a level and the other after,
    and the split subtracted two servers' counters (negative requests and compute)."""
    with ServerThread(repo_path) as other, InferenceClient(other.target, timeout=30) as client:
        for _ in range(50):  # counters the two servers do not share
            client.infer("mlp", {"input": np.ones((1, 64), np.float32)})
        target = f"{server.target},{other.target}"
        report = run(config(server, target=target, concurrency=(2,), requests=80), progress=False)
    (level,) = report.levels
    check_level(level, 80)


def test_open_loop_poisson_with_warmup(server: Any) -> None:
    report = run(
        config(server, rate=(400.0,), arrival="poisson", requests=50, warmup=0.05), progress=False
    )
    (lv,) = report.levels
    assert lv.loop == "open" and lv.level == 400 and lv.dropped == 0
    check_level(lv, 50)


def test_duration_bounded_level_and_connections(server: Any) -> None:
    report = run(
        config(server, concurrency=(2,), duration=0.3, requests=None, connections=2),
        progress=False,
    )
    (lv,) = report.levels
    # A duration-bounded level runs its whole duration (it stops by itself: the run returned).
    assert lv.ok > 0 and lv.errors == {} and lv.elapsed >= 0.3


def test_an_open_loop_level_ends_at_its_duration_not_at_its_next_arrival(server: Any) -> None:
    """At 0.01 requests/s the next arrival is 100 s away: a 0.3 s level waited for it."""
    report = run(
        config(server, rate=(0.01,), duration=0.3, requests=None, warmup=0.0), progress=False
    )
    (lv,) = report.levels
    assert lv.ok == 1  # the first arrival, at once; the next one is past the level's end
    assert lv.elapsed < 50  # far below the 100 s gap it used to sleep out


def test_inputs_from_the_caller_and_the_batch_size(server: Any) -> None:
    inputs = {"input": np.ones((3, 64), np.float32)}
    report = run(config(server, inputs=inputs, requests=20), progress=False)
    assert report.levels[0].batch_size == 3
    assert report.levels[0].to_dict()["samples_per_s"] == pytest.approx(
        3 * report.levels[0].throughput
    )


def test_a_bad_probe_fails_fast_with_the_servers_reason(server: Any) -> None:
    wrong = {"input": np.ones((1, 5), np.float32)}
    for protocol in ("ferry", "kserve"):  # kserve ran a whole level of errors first
        with pytest.raises(InvalidInputError, match="input"):
            run(config(server, inputs=wrong, protocol=protocol), progress=False)
    with pytest.raises(ModelNotFoundError):
        run(LoadTestConfig("nope", target=server.target, requests=5), progress=False)


def test_reports_serialize_without_nan(server: Any, tmp_path: Path) -> None:
    report = run(config(server, concurrency=(1, 2), requests=20), progress=False)
    failed = LevelResult(
        loop="closed",
        level=8,
        mode="unary",
        protocol="ferry",
        batch_size=1,
        elapsed=1.0,
        ok=0,
        errors={"UNAVAILABLE": 5},
        latency_ms={k: math.nan for k in ("p50", "p90", "p95", "p99", "max", "mean")},
    )
    report.levels.append(failed)
    doc = json.loads(report.to_json())
    assert [lv["level"] for lv in doc["levels"]] == [1, 2, 8]
    assert doc["levels"][2]["latency_ms"]["p99"] is None
    assert doc["levels"][2]["errors"] == {"UNAVAILABLE": 5}
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["level"] for r in rows] == ["1", "2", "8"]
    assert rows[2]["error_codes"] == "UNAVAILABLE=5" and rows[0]["ok"] == "20"
    table = report.format_table()
    assert "p99" in table and "errors at conc 8: UNAVAILABLE x5" in table


def test_plot_or_a_clear_error(server: Any, tmp_path: Path) -> None:
    report = run(config(server, concurrency=(1, 2), requests=20), progress=False)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(PlotUnavailableError, match=r"ferry-serve\[plot\]"):
            plot_report(report, tmp_path / "p.png")
    else:
        path = plot_report(report, tmp_path / "p.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"duration": 4000.0}, "cap"),
        ({"concurrency": (5000,)}, "concurrency"),
        ({"requests": 10_000_001, "duration": None}, "requests"),
        ({"rate": (1e9,)}, "rate"),
        ({"duration": None, "requests": None}, "duration or a request count"),
        ({"target": "10.1.2.3:8001"}, "not a loopback"),
        ({"target": "example.com:8001"}, "--allow-remote"),
        ({"concurrency": tuple(range(1, 40))}, "levels"),
        ({"requests": 2.5}, "whole number"),  # it sent 3
        # An open loop's count fixes its length: this one would have sent for 9,000 s.
        ({"rate": (0.001,), "requests": 10, "duration": None}, "9001 s"),
        # these failed later with a bare ValueError or TypeError, some after the metadata call
        ({"timeout": 1e20}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"batch_size": 1.5}, "batch size"),
        ({"batch_size": True}, "batch size"),
        ({"connections": 1.5}, "connections"),
        ({"seed": -1}, "seed"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"max_message_bytes": 2**31}, "max_message_bytes"),
    ],
)
def test_config_refusals(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LoadTestConfigError, match=message):
        LoadTestConfig("mlp", **kwargs).validate()


def test_the_cli_sends_what_the_server_takes_past_80_mib(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ferry loadtest` kept the SDK's 80 MiB client limit: an 81 MiB input that a server with
    --max-message-bytes 200 MiB takes was refused by the load generator itself (exit 1). It
    leaves the bound to the server now, as `ferry infer` does; the SDK config takes a limit."""
    from ferry.cli import main
    from ferry.server.core.repository import ModelRepository
    from ferry.server.examples import identity_model, write_model

    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "big", identity_model("UINT8", dims=("batch", 81 << 20)))
    srv = start_server(repo.root, max_message_bytes=200 << 20)
    argv = ["loadtest", "big", "-n", "1", "--warmup", "0", "--target", srv.target]
    assert main(argv) == 0, capsys.readouterr().err
    big = LoadTestConfig(
        "big", target=srv.target, requests=1, duration=None, warmup=0.0, max_message_bytes=200 << 20
    )
    check_level(run(big).levels[0], 1)


def test_one_level_may_be_a_bare_number() -> None:
    """concurrency=4 raised TypeError ("'int' object is not iterable") from deep inside."""
    assert LoadTestConfig("mlp", concurrency=4).levels == (4.0,)  # type: ignore[arg-type]
    assert LoadTestConfig("mlp", rate=100).levels == (100.0,)  # type: ignore[arg-type]


def test_loopback_forms_and_allow_remote() -> None:
    for target in (
        "127.0.0.1:1",
        "localhost:1",
        "[::1]:1",
        "unix:/tmp/x.sock",
        ["127.0.0.1:1", "127.0.0.2:2"],
    ):
        LoadTestConfig("mlp", target=target).validate()
    LoadTestConfig("mlp", target="10.1.2.3:8001", allow_remote=True).validate()


def test_generated_inputs_follow_the_metadata(client: InferenceClient) -> None:
    inputs = generate_inputs(client.model_metadata("two_io"), batch_size=3)
    assert inputs["a"].dtype == np.float32 and inputs["a"].shape == (3, 4)
    assert inputs["b"].dtype == np.int64 and inputs["b"].shape == (3, 4)
    fixed = client.model_metadata("fixed")
    assert generate_inputs(fixed)["input"].shape == (3,)
    with pytest.raises(InputError, match="no batch dimension"):
        generate_inputs(fixed, batch_size=2)
    with pytest.raises(InputError, match="model's inputs"):
        generate_inputs(fixed, shapes={"other": (1,)})
    assert generate_inputs(fixed, shapes={"input": (3,)})["input"].shape == (3,)


def test_input_files(client: InferenceClient, tmp_path: Path) -> None:
    meta = client.model_metadata("two_io")
    np.save(tmp_path / "a.npy", np.ones((1, 4), np.float32))
    np.savez(tmp_path / "ab.npz", a=np.zeros((1, 4), np.float32), b=np.ones((1, 4), np.int64))
    (tmp_path / "ab.json").write_text(
        json.dumps({"a": [[1, 2, 3, 4]], "b": {"data": [1, 2, 3, 4], "shape": [1, 4]}})
    )
    loaded = load_inputs([str(tmp_path / "ab.json")], meta)
    assert loaded["a"].dtype == np.float32 and loaded["b"].dtype == np.int64  # from the model
    assert loaded["b"].shape == (1, 4)
    loaded = load_inputs([str(tmp_path / "ab.npz"), f"a={tmp_path / 'a.npy'}"], meta)
    assert loaded["a"][0, 0] == 1.0 and set(loaded) == {"a", "b"}
    with pytest.raises(InputError, match="NAME="):
        load_inputs([str(tmp_path / "a.npy")], meta)  # two inputs: which one?
    with pytest.raises(InputError, match="does not exist"):
        load_inputs([str(tmp_path / "missing.npy")], meta)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="JSON"):
        load_inputs([str(tmp_path / "bad.json")], meta)
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InputError, match="unsupported"):
        load_inputs([str(tmp_path / "x.txt")], meta)
    with pytest.raises(InputError, match="is a folder, not a file"):
        load_inputs([str(tmp_path)], meta)


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([1, -4], "shape must be a list of dimensions >= 0, got [1, -4]"),
        ([-1], "shape must be a list of dimensions >= 0"),
        ([1, True, 4], "shape must be a list of dimensions >= 0"),
        ("1,4", "shape must be a list of dimensions >= 0"),
        ([2, 4], "shape [2, 4] holds 8 elements, but data has 4"),
    ],
)
def test_a_json_input_gives_every_dimension(tmp_path: Path, shape: Any, words: str) -> None:
    """numpy took a negative dimension as "work it out": [1, -3] was sent as [1, 3]."""
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"a": {"data": [1, 2, 3, 4], "shape": shape}}))
    with pytest.raises(InputError, match=re.escape(words)):
        load_inputs([str(path)])


def test_stream_request_ids_are_appended_without_reencoding() -> None:
    base = pb.InferRequest(model="mlp", id="").SerializeToString()
    parsed = pb.InferRequest.FromString(base + id_field("x" * 200))
    assert parsed.id == "x" * 200 and parsed.model == "mlp"


def test_an_oip_stream_answer_gives_its_id_and_status() -> None:
    def answer(rid: str, error: str = "") -> kpb.ModelStreamInferResponse:
        return kpb.ModelStreamInferResponse(
            error_message=error, infer_response=kpb.ModelInferResponse(id=rid)
        )

    assert _kserve_answer(answer("7")) == ("7", "OK")
    assert _kserve_answer(answer("8", "[StatusCode.NOT_FOUND] no model")) == ("8", "NOT_FOUND")
    assert _kserve_answer(answer("9", "[StatusCode.NOPE] x")) == ("9", "UNKNOWN")
    assert _kserve_answer(answer("10", "plain text")) == ("10", "UNKNOWN")


def test_progress_is_silent_off_a_terminal() -> None:
    stream = io.StringIO()
    assert not Progress(None, stream).enabled  # StringIO is no TTY
    assert Progress(True, stream).enabled


def test_empty_report_formats() -> None:
    assert LoadTestReport(model="m", target="t").format_table() == "no levels were run"


def test_unary_sweeps_get_enough_connections_for_their_concurrency() -> None:
    from ferry.client.loadtest import _connections

    assert _connections(LoadTestConfig("mlp", concurrency=(1, 64))) == 1
    assert _connections(LoadTestConfig("mlp", concurrency=(1, 600))) == 3
    assert _connections(LoadTestConfig("mlp", concurrency=(600,), connections=5)) == 5
    assert _connections(LoadTestConfig("mlp", concurrency=(600,), mode="stream")) == 1
