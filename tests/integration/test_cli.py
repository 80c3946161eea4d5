"""The ``ferry`` command, run in-process against a real server: output, files, exit codes, and
errors that fit on one line and say what to fix."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.cli import main
from ferry.client import InferenceClient

FAKE_CHILD = r"""
import json, os, shutil, sys
args = sys.argv[1:]
job = json.load(open(args[args.index("--job") + 1]))
out = os.fdopen(int(args[args.index("--progress-fd") + 1]), "w")
def emit(stage, fraction, message=""):
    out.write(json.dumps({"stage": stage, "fraction": fraction, "message": message,
                          "error_kind": ""}) + "\n")
    out.flush()
emit("load", 0.0, "loading")
emit("export", 0.5, "exporting")
shutil.copy(job["source_path"], os.path.join(job["work_dir"], "model.onnx"))
json.dump({"variants": [{"name": "fp32", "size_bytes": 1, "latency_ms": {"1": 0.5}}],
           "published": "fp32", "opset": 17, "source_format": job["source_format"],
           "parity": {"max_abs": 0.0, "cosine": 1.0, "samples": 4, "against": "onnx"}},
          open(os.path.join(job["work_dir"], "report.json"), "w"))
emit("benchmark", 0.95, "finished")
"""


def ferry(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ferry ")
    return lines[0]


def test_models_list_describe_and_stats(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = ("--target", server.target)
    code, out, _ = ferry(capsys, "models", "list", *t)
    assert code == 0 and "MODEL" in out
    assert any(line.split()[:3] == ["mlp", "1", "READY"] for line in out.splitlines())
    code, out, _ = ferry(capsys, "models", "list", "--json", *t)
    assert {m["name"] for m in json.loads(out)} == {"mlp", "two_io", "fixed"}
    code, out, _ = ferry(capsys, "models", "describe", "mlp", *t)
    assert code == 0 and "input" in out and "[-1, 64]" in out and "batching: up to" in out
    code, out, _ = ferry(capsys, "models", "describe", "fixed", "--json", *t)
    assert json.loads(out)["inputs"][0]["shape"] == [3]
    ferry(capsys, "infer", "mlp", "--random", *t)
    code, out, _ = ferry(capsys, "models", "stats", "mlp", "--json", *t)
    assert code == 0 and json.loads(out)[0]["success"]["count"] >= 1
    code, out, _ = ferry(capsys, "models", "stats", *t)
    assert code == 0 and "COMPUTE_MS" in out


def test_models_list_says_why_a_model_has_no_version(
    server: Any, repo_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model whose version folders were all deleted was missing from the list, with no word
    of why it served nothing (the repository index said so); it is a row of its own now."""
    import shutil

    from ferry.client import RepositoryClient

    shutil.rmtree(repo_path / "fixed" / "1")
    with RepositoryClient(server.management_target, timeout=60) as repo:
        assert list(repo.refresh().unloaded) == ["fixed/1"]
    code, out, _ = ferry(capsys, "models", "list", "--target", server.target)
    (row,) = [line.split() for line in out.splitlines() if line.startswith("fixed ")]
    assert code == 0 and row[:3] == ["fixed", "-", "UNLOADED"] and "version folders" in out


def test_infer_from_files_to_files(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with InferenceClient(server.target, timeout=30) as client:
        expected = np.asarray(client.infer("mlp", {"input": x})["logits"])
    t = ("--target", server.target)
    code, out, _ = ferry(
        capsys, "infer", "mlp", "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.npz"), *t
    )
    assert code == 0 and "saved" in out
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_allclose(saved["logits"], expected, rtol=1e-6)
    code, _, _ = ferry(
        capsys,
        "infer",
        "mlp",
        "-i",
        f"input={tmp_path / 'x.npy'}",
        "-o",
        str(tmp_path / "out.npy"),
        *t,
    )
    assert code == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6)
    (tmp_path / "in.json").write_text(json.dumps({"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]}))
    code, out, _ = ferry(capsys, "infer", "two_io", "-i", str(tmp_path / "in.json"), "--json", *t)
    doc = json.loads(out)
    assert code == 0 and doc["outputs"]["sum"]["data"] == [[2.0, 3.0, 4.0, 5.0]]
    assert doc["outputs"]["scaled"]["datatype"] == "INT64"
    code, out, _ = ferry(capsys, "infer", "mlp", "--random", "--batch-size", "3", *t)
    assert code == 0 and "logits FP32 [3, 10]" in out


def strict_json(text: str) -> Any:
    """Parse as jq or JSON.parse would: NaN, Infinity and -Infinity are not JSON."""

    def refuse(word: str) -> Any:
        raise AssertionError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_json(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """NaN and infinite outputs came out as the bare words NaN and Infinity, which strict JSON
    readers refuse; they are the strings Python's float() reads back, on stdout and in -o."""
    np.save(tmp_path / "x.npy", np.array([np.nan, np.inf, -np.inf], np.float32))
    t = ("--target", server.target)
    code, out, _ = ferry(capsys, "infer", "fixed", "-i", str(tmp_path / "x.npy"), "--json", *t)
    assert code == 0
    data = strict_json(out)["outputs"]["output"]["data"]
    assert data == ["NaN", "Infinity", "-Infinity"]
    assert np.isnan(float(data[0])) and [float(v) for v in data[1:]] == [np.inf, -np.inf]
    code, _, _ = ferry(
        capsys, "infer", "fixed", "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.json"), *t
    )
    assert code == 0
    assert strict_json((tmp_path / "o.json").read_text())["outputs"]["output"]["data"] == data


def test_json_text_writes_null_for_figures_that_are_not_numbers() -> None:
    """Every other --json document (statistics, jobs, reports) goes through json_text: a figure
    that is not finite is null."""
    from ferry.cli._common import json_text

    doc = {"mean": float("nan"), "rows": [(1.0, float("inf")), {"x": float("-inf")}]}
    assert strict_json(json_text(doc)) == {"mean": None, "rows": [[1.0, None], {"x": None}]}


def test_infer_errors_say_what_to_fix(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    t = ("--target", server.target)
    code, _, err = ferry(capsys, "infer", "mlp", "-i", str(tmp_path / "missing.npy"), *t)
    assert code == 2 and "does not exist" in one_error_line(err)
    code, _, err = ferry(capsys, "infer", "mlp", *t)
    assert code == 2 and "--random" in one_error_line(err)
    code, _, err = ferry(capsys, "infer", "nope", "--random", *t)
    assert code == 1 and "ferry models list" in one_error_line(err)
    np.save(tmp_path / "bad.npy", np.ones((1, 5), np.float32))
    code, _, err = ferry(capsys, "infer", "mlp", "-i", str(tmp_path / "bad.npy"), *t)
    assert code == 1 and "ferry models describe" in one_error_line(err)
    # the inputs are fine: the hint sent the user to them instead of the output names
    for outputs in (["nope"], ["logits", "logits"]):
        flags = [f for o in outputs for f in ("--output", o)]
        code, _, err = ferry(capsys, "infer", "mlp", "--random", *flags, *t)
        line = one_error_line(err)
        assert code == 1 and "output names (--output)" in line and "inputs" not in line, line
    code, _, err = ferry(capsys, "infer", "two_io", "--random", "-o", str(tmp_path / "o.npy"), *t)
    assert code == 2 and ".npz" in one_error_line(err)
    code, _, err = ferry(capsys, "models", "list", "--target", closed_port(), "--timeout", "5")
    assert code == 3 and "ferry serve" in one_error_line(err)


def test_a_loadtest_whose_server_went_away_exits_3(
    server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A level with some answers and then UNAVAILABLE (the server gone mid-run) exited 0, so a
    script took a run against a dead server for a result."""
    import ferry.cli.loadtest as cli_loadtest
    from ferry.client.loadtest import LevelResult, LoadTestReport

    report = LoadTestReport(model="mlp", target=server.target)
    latency = {k: 1.0 for k in ("p50", "p90", "p95", "p99", "max", "mean")}
    report.levels.append(
        LevelResult("closed", 2, "unary", "ferry", 1, 2.0, 148, {"UNAVAILABLE": 40}, latency)
    )
    monkeypatch.setattr(cli_loadtest, "run", lambda config, progress=None: report)
    code, out, err = ferry(capsys, "loadtest", "mlp", "--target", server.target, "-n", "10")
    assert code == 3, (out, err)
    assert "UNAVAILABLE at level 2 (40)" in one_error_line(err)
    assert "148" in out  # the partial figures are still shown


def test_json_inputs_are_never_cast_to_other_numbers(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A plain cast sent 1.7 to the INT64 input as 1 and 1e300 to FP32 as inf, and answered;
    an int past INT64 crashed with a traceback. The SDK's rules apply instead."""
    t = ("--target", server.target)
    cases = [
        ({"a": [[1, 2, 3, 4]], "b": [[1.7, 1, 1, 1]]}, 1, "must be INT64"),
        ({"a": [[1e300, 2, 3, 4]], "b": [[1, 1, 1, 1]]}, 2, "out of the model's float32 range"),
        ({"a": [[1, 2, 3, 4]], "b": [[2**70, 1, 1, 1]]}, 2, "input 'b'"),
        (
            {"a": [[1, 2, 3, 4]], "b": {"data": [[300, 1, 1, 1]], "datatype": "INT8"}},
            2,
            "300 is out of the model's int8 range",
        ),
    ]
    for doc, want, words in cases:
        (tmp_path / "in.json").write_text(json.dumps(doc))
        code, _, err = ferry(capsys, "infer", "two_io", "-i", str(tmp_path / "in.json"), *t)
        assert (code, words in one_error_line(err)) == (want, True), (doc, code, err)


def test_json_input_nested_otherwise_than_its_shape_is_refused(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """{"data": ..., "shape": [2, 4]} with the rows nested transposed ([4, 2]) was reshaped by
    its element count alone and sent: each row answered for values that were not its own, exit
    0. The nesting must be the shape's (or flat), as the server requires of OIP JSON."""
    t = ("--target", server.target)
    rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    b = {"data": [0] * 8, "shape": [2, 4]}
    transposed = {"a": {"data": [list(c) for c in zip(*rows, strict=True)], "shape": [2, 4]}}
    (tmp_path / "in.json").write_text(json.dumps({**transposed, "b": b}))
    code, _, err = ferry(capsys, "infer", "two_io", "-i", str(tmp_path / "in.json"), *t)
    assert code == 2, err
    assert "nested as [4, 2], which is not its shape [2, 4]" in one_error_line(err)
    for same in (rows, rows[0] + rows[1]):
        (tmp_path / "in.json").write_text(
            json.dumps({"a": {"data": same, "shape": [2, 4]}, "b": b})
        )
        code, out, err = ferry(
            capsys, "infer", "two_io", "-i", str(tmp_path / "in.json"), "--json", *t
        )
        assert code == 0, err
        assert json.loads(out)["outputs"]["sum"]["data"] == rows


def test_health(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = ("--target", server.target)
    code, out, _ = ferry(capsys, "health", *t)
    assert (code, out.split()[-1]) == (0, "SERVING")
    assert ferry(capsys, "health", "mlp", *t)[0] == 0
    code, out, _ = ferry(capsys, "health", "no_such_model", *t)
    assert code == 1 and "SERVICE_UNKNOWN" in out
    code, out, _ = ferry(capsys, "health", "--wait", "20", *t)
    assert (code, out.split()[-1]) == (0, "SERVING")
    code, out, _ = ferry(capsys, "health", "--target", closed_port())
    assert code == 3 and "UNREACHABLE" in out


def test_health_wait_refused_by_the_server_is_not_unreachable(
    repo_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ferry health --wait` to a server that requires a token for health, without one, said
    UNREACHABLE (exit 3, "nothing answered") where the same check without --wait said
    UNAUTHENTICATED (exit 1): the server answered, and says why."""
    from serverutil import ServerThread

    monkeypatch.delenv("FERRY_TOKEN", raising=False)
    with ServerThread(repo_path, inference_token="sekrit", health_requires_token=True) as srv:
        t = ("--target", srv.target)
        for wait in ((), ("--wait", "20")):
            code, out, err = ferry(capsys, "health", *wait, *t)
            assert (code, out.split()[-1]) == (1, "UNAUTHENTICATED"), wait
            # Says what to do about it (it read as "not serving" with no hint).
            assert "needs a token" in err and "FERRY_TOKEN (or --token)" in err, (wait, err)
            code, out, _ = ferry(capsys, "health", *wait, *t, "--token", "sekrit")
            assert (code, out.split()[-1]) == (0, "SERVING"), wait


def test_health_wait_past_the_servers_watch_bound_asks_check_instead(
    repo_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server holding --max-health-watches streams refuses one more RESOURCE_EXHAUSTED, and
    `ferry health --wait` printed that and failed although the server was serving: it asks
    Check instead, within the same wait."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from serverutil import ServerThread

    with (
        ServerThread(repo_path, max_health_watches=1) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        held = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60
        )
        next(held)  # the one stream the server allows is open
        code, out, _ = ferry(capsys, "health", "--wait", "20", "--target", srv.target)
        held.cancel()
    assert (code, out.split()[-1]) == (0, "SERVING"), out


def test_loadtest_writes_json_and_csv(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = ferry(
        capsys,
        "loadtest",
        "mlp",
        "--target",
        server.target,
        "-c",
        "1,2",
        "-n",
        "30",
        "--warmup",
        "0",
        "--json",
        str(tmp_path / "r.json"),
        "--csv",
        str(tmp_path / "r.csv"),
        "--no-progress",
    )
    assert code == 0 and "p99" in out and "queue" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [lv["ok"] for lv in doc["levels"]] == [30, 30]
    assert (tmp_path / "r.csv").read_text().count("\n") == 3
    # Both to stdout, one after the other, could be parsed as neither.
    code, _, err = ferry(capsys, "loadtest", "mlp", "--target", server.target, "--json", "-",
                         "--csv", "-")  # fmt: skip
    assert code == 2 and "both write to stdout" in one_error_line(err)
    code, out, err = ferry(
        capsys,
        "loadtest",
        "mlp",
        "--target",
        server.target,
        "--mode",
        "stream",
        "-n",
        "20",
        "--warmup",
        "0",
        "--json",
        "-",
    )
    assert code == 0 and json.loads(out)["levels"][0]["mode"] == "stream" and "p50" in err


def test_loadtest_refusals(server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = ferry(capsys, "loadtest", "mlp", "--target", "192.0.2.1:8001", "-n", "5")
    assert code == 2 and "--allow-remote" in one_error_line(err)
    code, _, err = ferry(capsys, "loadtest", "mlp", "-d", "4000", "--target", server.target)
    assert code == 2 and "cap" in one_error_line(err)
    # Not a refusal: the Open Inference Protocol's stream (ModelStreamInfer) is load tested.
    code, out, _ = ferry(
        capsys,
        "loadtest",
        "mlp",
        "--mode",
        "stream",
        "--protocol",
        "kserve",
        "-n",
        "10",
        "--warmup",
        "0",
        "--json",
        "-",
        "--target",
        server.target,
    )
    (level,) = json.loads(out)["levels"]
    assert code == 0 and level["protocol"] == "kserve" and level["ok"] == 10
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        code, _, err = ferry(
            capsys,
            "loadtest",
            "mlp",
            "-n",
            "5",
            "--target",
            server.target,
            "--plot",
            str(tmp_path / "p.png"),
        )
        assert code == 2 and "ferry-serve[plot]" in one_error_line(err)


def _fake_conversion_server(start_server: Any, tmp_path: Path) -> tuple[Any, Path, tuple[str, str]]:
    """A server whose conversions run FAKE_CHILD, a tiny ONNX file to convert, and the CLI's
    --target for its management listener."""
    from ferry.server.examples import mlp_model

    repo = tmp_path / "conv-repo"
    repo.mkdir()
    srv = start_server(repo)
    assert srv.app is not None
    child = tmp_path / "child.py"
    child.write_text(FAKE_CHILD)
    srv.app.conversion.runner.child_command = [sys.executable, str(child)]
    model_file = tmp_path / "tiny.onnx"
    model_file.write_bytes(mlp_model(sizes=(8, 4)).SerializeToString())
    return srv, model_file, ("--target", srv.management_target)


def test_upload_and_convert_with_a_progress_callback(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, model_file, t = _fake_conversion_server(start_server, tmp_path)
    code, out, _ = ferry(capsys, "upload", "tiny", str(model_file), "--json", *t)
    upload_id = json.loads(out)["upload_id"]
    assert code == 0 and json.loads(out)["format"] == "onnx"
    code, out, err = ferry(
        capsys, "convert", upload_id, "--input", "input:FP32:-1,8", "--progress", *t
    )
    assert (
        code == 0 and "version 1" in out and "published" in out and "%" in err
    )  # the bar was drawn
    # No list of modes in the CLI: the name goes to the server, whose refusal lists its own.
    code, _, err = ferry(capsys, "convert", upload_id, "--quantize", "int3", "--no-progress", *t)
    assert code == 1 and "unknown quantization mode 'int3'" in err and "dynamic_int8" in err
    code, out, _ = ferry(
        capsys,
        "convert",
        str(model_file),
        "--model",
        "tiny",
        "--input",
        "input:FP32:-1,8",
        "--no-progress",
        *t,
    )
    assert code == 0 and "version 2" in out and "published" in out
    code, _, err = ferry(capsys, "convert", str(model_file), "--input", "x:FP32:1", *t)
    assert code == 2 and "--model" in one_error_line(err)
    with pytest.raises(SystemExit) as info:  # argparse explains the NAME:DTYPE:DIMS form
        main(["convert", "f" * 32, "--input", "bad", *t])
    assert info.value.code == 2 and "input:FP32:-1,64" in capsys.readouterr().err


def test_convert_max_batch_size_is_the_new_versions_serving_batch(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --max-batch-size went to the export check alone: the version served the load's default
    # batch (32) whatever the flag said.
    srv, model_file, t = _fake_conversion_server(start_server, tmp_path)
    code, out, _ = ferry(
        capsys,
        "convert",
        str(model_file),
        "--model",
        "tiny",
        "--max-batch-size",
        "8",
        "--instance-count",
        "2",
        "--no-progress",
        *t,
    )
    assert code == 0 and "version 1" in out
    config = json.loads((tmp_path / "conv-repo" / "tiny" / "1" / "config.json").read_text())
    assert config == {"batching": {"max_batch_size": 8}, "instances": {"count": 2}}
    with InferenceClient(srv.target) as client:
        assert client.model_metadata("tiny").batching.max_batch_size == 8


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["jobs", "cancel", "f" * 32, "--json"], "ferry jobs cancel"),
        (["models", "list", "--bogus"], "ferry models list"),
        (["health", "--bogus"], "ferry health"),
    ],
)
def test_an_unknown_flag_is_refused_with_its_commands_usage(
    argv: list[str], command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ferry jobs cancel ID --json` said "usage: ferry [-h] [--version] COMMAND ..." and
    "ferry: error: unrecognized arguments: --json": neither the command nor its flags."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"usage: {command} [-h]" in err and f"{command}: error: unrecognized arguments" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["models"],
        ["models", "list"],
        ["infer"],
        ["health"],
        ["loadtest"],
        ["upload"],
        ["convert"],
        ["serve"],
    ],
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "usage: ferry" in out
    if argv == ["serve"]:
        assert "--repository" in out  # the server's own parser, imported only for serve


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["loadtest", "mlp", "-c", "x"])
    assert info.value.code == 2 and "1,4,16,64" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["127.0.0.1:port", ":8001", "127.0.0.1:1,127.0.0.1:"])
def test_a_target_grpc_cannot_reach_is_a_usage_error(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was taken, and every command failed at its first call instead."""
    for argv in (["models", "list"], ["infer", "m", "--random"], ["health"]):
        code, _, err = ferry(capsys, *argv, "--target", target)
        assert code == 2 and "HOST:PORT" in one_error_line(err)


@pytest.mark.parametrize("target", ["a.example:1,b.example:1", "127.0.0.1:port"])
def test_a_target_refusal_says_what_a_cli_user_can_do(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several host names were answered with the SDK's load_balancing='round_robin', which no
    flag sets; `ferry loadtest` added "compare the inputs", as if the model's inputs were wrong."""
    for argv in (["models", "list"], ["loadtest", "m"], ["upload", "m", "x.pt"]):
        code, _, err = ferry(capsys, *argv, "--target", target)
        line = one_error_line(err)
        assert code == 2 and "load_balancing" not in line and "inputs" not in line, line
    code, _, err = ferry(capsys, "models", "list", "--target", "a.example:1,b.example:1")
    assert "--target 10.0.0.1:8001,10.0.0.2:8001" in one_error_line(err)


def test_architecture_kwargs_naming_a_key_twice_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Read as its last value, silently, a repeated key built another model than was meant."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"PK\x03\x04")
    kwargs = '{"in_features": 8, "hidden": [256], "hidden": [8], "out_features": 2}'
    with pytest.raises(SystemExit) as info:
        main(
            ["upload", "m", str(weights), "--architecture", "mlp", "--architecture-kwargs", kwargs]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2 and "'hidden' is given twice" in err


def test_architecture_kwargs_nested_past_the_parser_are_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The JSON parser's recursion guard escaped argparse: a traceback, not a usage line."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"PK\x03\x04")
    kwargs = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(SystemExit) as info:
        main(
            ["upload", "m", str(weights), "--architecture", "mlp", "--architecture-kwargs", kwargs]
        )
    assert info.value.code == 2 and "nested too deeply" in capsys.readouterr().err
