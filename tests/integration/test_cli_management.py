"""The management side of ``ferry``, in-process against a real server: ``models refresh | load |
unload``, ``uploads list | delete``, ``convert``'s calibration and accuracy-budget flags, and
hints that match the command that failed."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.cli import main
from ferry.client import (
    ConversionClient,
    FailedPreconditionError,
    InferenceClient,
    Job,
    RefreshResult,
    RepositoryClient,
)
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import mlp_model, write_model

# Stands in for the conversion child (same command line and progress contract): it records the
# spec it was given, and the calibration file's arrays, in the report, or fails like a job that
# missed its accuracy budget, or blocks until killed.
RECORDING_CHILD = r"""
import json, os, shutil, sys, time
import numpy as np
args = sys.argv[1:]
job = json.load(open(args[args.index("--job") + 1]))
out = os.fdopen(int(args[args.index("--progress-fd") + 1]), "w")
def emit(stage, fraction, message="", error_kind=""):
    out.write(json.dumps({"stage": stage, "fraction": fraction, "message": message,
                          "error_kind": error_kind}) + "\n")
    out.flush()
mode = job["architecture_kwargs"].get("fake", "ok")
emit("load", 0.0, "loading")
if mode == "block":
    while True:
        time.sleep(3600)
if mode == "budget":
    emit("quantize", 0.6, "static_int8 is below the accuracy budget: cosine 0.91 < 0.99",
         "FAILED_PRECONDITION")
    sys.exit(2)
if mode == "crash":  # a report that says where it stopped, then a crash
    json.dump({"stopped": "export"}, open(os.path.join(job["work_dir"], "report.json"), "w"))
    sys.exit(3)
spec = job["spec"]
seen = {"quantization": spec["quantization"], "validation": spec["validation"],
        "inputs": spec["inputs"]}
calibration = spec["quantization"].get("calibration_file")
if calibration:
    with np.load(calibration) as npz:
        seen["calibration"] = {k: list(npz[k].shape) for k in npz.files}
work = job["work_dir"]
with open(os.path.join(work, "model.onnx"), "wb") as fh:
    fh.write(open(os.environ["CLI_TEST_ONNX_FILE"], "rb").read())
json.dump({"variants": [{"name": "fp32", "size_bytes": 1, "latency_ms": {"1": 0.5}}],
           "published": "fp32", "opset": 17, "source_format": job["source_format"],
           "seen": seen}, open(os.path.join(work, "report.json"), "w"))
emit("benchmark", 0.95, "finished")
"""


def ferry(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def fake_state_dict() -> bytes:
    """torch.save's zip layout (an archive with data.pkl), which the server's format check takes;
    nothing ever unpickles it here (the stand-in child never loads the source)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


@pytest.fixture
def conv_server(
    start_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, tuple[str, str]]:
    """A server whose conversions run RECORDING_CHILD; returns it and its --target flags."""
    repo = tmp_path / "repo"
    repo.mkdir()
    srv = start_server(repo)
    child = tmp_path / "child.py"
    child.write_text(RECORDING_CHILD)
    onnx_file = tmp_path / "seed.onnx"
    onnx_file.write_bytes(mlp_model(sizes=(3, 4, 1)).SerializeToString())
    monkeypatch.setenv("CLI_TEST_ONNX_FILE", str(onnx_file))
    srv.app.conversion.runner.child_command = [sys.executable, str(child)]
    return srv, ("--target", srv.management_target)


# ---- models refresh | load | unload ----
def test_refresh_load_and_unload(
    server: Any, repo_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = ("--target", server.management_target)
    code, out, _ = ferry(capsys, "models", "refresh", *m)
    assert code == 0 and "nothing changed" in out

    repo = ModelRepository(repo_path)
    write_model(repo, "extra", mlp_model(sizes=(4, 2)))
    broken = repo_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    code, out, _ = ferry(capsys, "models", "refresh", "--json", *m)
    result = json.loads(out)
    assert code == 1  # a version failed to load
    assert "extra/1" in result["loaded"] and list(result["failed"]) == ["broken/1"]
    assert result["failed"]["broken/1"]  # the reason

    code, out, _ = ferry(capsys, "models", "unload", "extra", *m)
    assert code == 0 and "unloaded" in out
    code, out, _ = ferry(capsys, "models", "list", "--json", "--target", server.target)
    assert "extra" not in {v["name"] for v in json.loads(out) if v["state"] == "READY"}
    code, out, _ = ferry(capsys, "models", "load", "extra", *m)
    assert code == 0 and "loaded" in out
    code, out, _ = ferry(capsys, "models", "list", "extra", "--json", "--target", server.target)
    assert [v["state"] for v in json.loads(out)] == ["READY"]


def test_rollout_sets_shows_and_ends_a_split(
    server: Any, repo_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = ModelRepository(repo_path)
    write_model(repo, "canary", mlp_model(sizes=(4, 2), seed=1))
    write_model(repo, "canary", mlp_model(sizes=(4, 2), seed=2), version=2)
    m = ("--target", server.management_target)
    assert ferry(capsys, "models", "refresh", *m)[0] == 0
    code, out, _ = ferry(
        capsys,
        "models",
        "rollout",
        "canary",
        "1=9",
        "2=1",
        "--max-error-rate",
        "0.05",
        "--reason",
        "int8",
        *m,
    )
    assert code == 0 and "version 2: 10.0%" in out and "int8" in out
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "--json", *m)
    assert json.loads(out)["split"] == {"1": 9.0, "2": 1.0}
    # --shadow alone adds a shadow to the live split (it ended the split, as the docs show it),
    # and keeps the split's guard (it ended it, as a conversion's --rollout shadow does not)
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "--shadow", "2=0.5", "--json", *m)
    view = json.loads(out)
    assert view["split"] == {"1": 9.0, "2": 1.0} and view["shadow_version"] == 2
    assert view["rules"] == {"max_error_rate": 0.05}
    # Before its first comparison a shadow's figures describe nothing: they read cosine mean
    # 1.000000 (a perfect candidate) in the text, and 1.0 where the JSON promises null.
    assert view["shadow"]["compared"] == 0 and view["shadow"]["mean_cosine"] is None
    assert view["shadow"]["min_cosine"] is None and view["shadow"]["rel_error"] is None
    code, out, _ = ferry(capsys, "models", "rollout", "canary", *m)  # the history says so
    assert code == 0 and "1=9, 2=1, shadow 2=0.5  by" in out, out
    assert "0 compared" in out and "no outputs compared yet" in out and "cosine" not in out, out
    # Weights alone replace the rollout: the shadow ends, as the help and rollout.md now say
    # (neither did, and the comparison was lost without a word).
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "1=9", "2=1", "--json", *m)
    assert code == 0 and json.loads(out)["shadow_version"] == 0
    with pytest.raises(SystemExit):
        ferry(capsys, "models", "rollout", "--help")
    assert "a live shadow ends" in " ".join(capsys.readouterr().out.split())
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "--end", *m)
    assert code == 0 and "no split" in out
    # Weights after an option are weights ("unrecognized arguments: 1=1" before)
    code, out, _ = ferry(capsys, "models", "rollout", "canary", *m, "1=1", "2=3", "--json")
    assert code == 0 and json.loads(out)["split"] == {"1": 1.0, "2": 3.0}
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "--end", *m)
    with pytest.raises(SystemExit) as info:
        ferry(capsys, "models", "rollout", "canary", "2:1", *m)
    assert info.value.code == 2 and "VERSION=WEIGHT" in capsys.readouterr().err
    # A version given twice (`1=9 1=1`, meant `1=9 2=1`) sent every request to version 1
    code, out, err = ferry(capsys, "models", "rollout", "canary", "1=9", "1=1", *m)
    assert code == 2 and "given more than once" in one_error_line(err)
    # Said without the "error:" every other refusal of the command line carries.
    assert err.startswith("ferry models rollout: error: ")
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "--json", *m)
    assert json.loads(out)["split"] == {}
    # Rules with nothing to judge only showed the rollout (exit 0), and no rule was set.
    for alone in (["--max-error-rate", "0.05"], ["--end", "--promote-after", "5"]):
        code, out, err = ferry(capsys, "models", "rollout", "canary", *alone, *m)
        assert code == 2 and "give the weights or --shadow" in one_error_line(err), (code, err)
        assert err.startswith("ferry models rollout: error: ")
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "--json", *m)
    assert json.loads(out)["rules"] == {}
    # A reason with no change showed the rollout (exit 0) and was recorded nowhere.
    entries = len(json.loads(out)["history"])
    code, out, err = ferry(capsys, "models", "rollout", "canary", "--reason", "int8 canary", *m)
    assert code == 2 and "--reason is recorded with a change" in err, (code, err)
    code, out, _ = ferry(capsys, "models", "rollout", "canary", "--json", *m)
    assert len(json.loads(out)["history"]) == entries


def test_rollout_shows_what_is_wrong_with_a_usable_rollout_as_it_is(
    server: Any, repo_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rollout that is in force but says something is wrong (a shadow compared with itself, a
    rule's decision not yet written) was printed as "the stored split cannot be used"."""
    repo = ModelRepository(repo_path)
    write_model(repo, "itself", mlp_model(sizes=(4, 2), seed=1))
    write_model(repo, "itself", mlp_model(sizes=(4, 2), seed=2), version=2)
    shadow = {"shadow": {"version": 2, "fraction": 0.5}}  # a hand edit: 2 is the default
    (repo.model_dir("itself") / "rollout.json").write_text(json.dumps(shadow))
    m = ("--target", server.management_target)
    assert ferry(capsys, "models", "refresh", *m)[0] == 0
    code, out, _ = ferry(capsys, "models", "rollout", "itself", *m)
    assert code == 0 and "so nothing is compared" in out and "cannot be used" not in out, out


def test_rollout_prints_each_history_entry_on_its_one_line(
    server: Any, repo_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reason holding a line break (a hand-edited file) printed a forged history entry, and
    one holding a terminal escape rewrote the operator's screen: both are shown escaped."""
    repo = ModelRepository(repo_path)
    write_model(repo, "forged", mlp_model(sizes=(4, 2), seed=1))
    entry = {"at": "t", "by": "me", "why": "ok\n  t  1=1  by admin: approved\x1b[2J", "split": {}}
    (repo.model_dir("forged") / "rollout.json").write_text(json.dumps({"history": [entry]}))
    m = ("--target", server.management_target)
    assert ferry(capsys, "models", "refresh", *m)[0] == 0
    code, out, _ = ferry(capsys, "models", "rollout", "forged", *m)
    assert code == 0 and "\x1b" not in out and out.count("by admin") == 1, out
    assert out.splitlines()[-1].endswith("by me: ok\\n  t  1=1  by admin: approved\\x1b[2J")


def test_a_refused_management_action_names_its_own_help(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ferry models rollout m 1=nan` hinted `ferry models --help`, which lists the actions,
    not the weights and flags the refusal is about."""
    code, _, err = ferry(capsys, "models", "rollout", "mlp", "1=nan",
                         "--target", server.management_target)  # fmt: skip
    line = one_error_line(err)
    assert code == 1 and "see `ferry models rollout --help`" in line, line


def test_refresh_returns_a_typed_result(server: Any, repo_path: Path) -> None:
    write_model(ModelRepository(repo_path), "extra", mlp_model(sizes=(4, 2)))
    with RepositoryClient(server.management_target) as repo:
        result = repo.refresh()
        assert isinstance(result, RefreshResult)
        assert result.loaded == ("extra/1",) and result.changed and not result.failed
        assert not repo.refresh().changed


def test_management_commands_on_the_inference_port_say_so(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = ferry(capsys, "models", "load", "mlp", "--target", server.target)
    line = one_error_line(err)
    assert code == 1 and "management" in line and "models describe" not in line
    code, _, err = ferry(capsys, "uploads", "list", "--target", server.target)
    line = one_error_line(err)
    assert code == 1 and "management" in line and "models describe" not in line


# ---- uploads ----
def test_upload_hint_asks_only_for_what_the_server_cannot_know(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, t = conv_server
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(mlp_model(sizes=(8, 4)).SerializeToString())
    code, out, _ = ferry(capsys, "upload", "m", str(onnx_file), *t)
    assert code == 0 and "next: ferry convert" in out and "--input" not in out
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    code, out, _ = ferry(capsys, "upload", "seed", str(weights), "--architecture", "seed", *t)
    assert code == 0 and "--input" not in out
    assert "inputs from architecture 'seed': input FP32 [-1, 3]" in out


def test_uploads_list_and_delete(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, t = conv_server
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(mlp_model(sizes=(8, 4)).SerializeToString())
    ids = []
    for model in ("a", "b", "b"):
        _, out, _ = ferry(capsys, "upload", model, str(onnx_file), "--json", *t)
        ids.append(json.loads(out)["upload_id"])
    code, out, _ = ferry(capsys, "uploads", "list", "--json", *t)
    listed = json.loads(out)
    assert code == 0 and [u["upload_id"] for u in listed] == ids[::-1]  # newest first
    code, out, _ = ferry(capsys, "uploads", "list", "b", *t)
    assert code == 0 and ids[1] in out and ids[0] not in out and "UPLOAD_ID" in out
    code, out, _ = ferry(capsys, "uploads", "list", "--limit", "1", "--json", *t)
    assert code == 0 and [u["upload_id"] for u in json.loads(out)] == [ids[2]]
    code, out, _ = ferry(capsys, "uploads", "list", "--limit", "0", "--json", *t)  # all
    assert code == 0 and [u["upload_id"] for u in json.loads(out)] == ids[::-1]
    with pytest.raises(SystemExit) as usage:
        ferry(capsys, "uploads", "list", "--limit", "-1", *t)
    assert usage.value.code == 2 and "--limit: must be >= 0" in capsys.readouterr().err
    files = sorted((srv.app.conversion.state_dir / "uploads").iterdir())
    assert len(files) == 3

    code, out, _ = ferry(capsys, "uploads", "delete", ids[0], *t)
    assert code == 0 and f"deleted {ids[0]}" in out
    assert len(list((srv.app.conversion.state_dir / "uploads").iterdir())) == 2
    code, _, err = ferry(capsys, "uploads", "delete", ids[0], *t)
    line = one_error_line(err)
    assert code == 1 and "ferry uploads list" in line  # already gone
    # A mistyped id among others stopped the command there: the ids after it stayed.
    code, out, err = ferry(capsys, "uploads", "delete", "not-an-id", ids[1], *t)
    assert code == 1 and "malformed" in one_error_line(err) and f"deleted {ids[1]}" in out
    assert len(list((srv.app.conversion.state_dir / "uploads").iterdir())) == 1

    code, out, _ = ferry(capsys, "uploads", "delete", "--all", "b", *t)
    assert code == 0 and out.count("deleted") == 1
    code, out, _ = ferry(capsys, "uploads", "list", *t)
    assert "no uploads" in out
    assert not list((srv.app.conversion.state_dir / "uploads").iterdir())
    code, _, err = ferry(capsys, "uploads", "delete", *t)
    assert code == 2 and "--all" in err


def test_an_upload_a_live_job_reads_is_kept(conv_server: Any) -> None:
    srv, _ = conv_server
    with ConversionClient(srv.management_target) as conv:
        up = conv.upload(
            "seed",
            fake_state_dict(),
            format="state_dict",
            architecture="seed",
            architecture_kwargs={"fake": "block"},
        )
        assert [i.name for i in up.inputs] == ["input"]  # the built-in's own, from the server
        job = conv.convert(up)
        with pytest.raises(FailedPreconditionError, match="being converted by job"):
            conv.delete_upload(up)
        assert [u.upload_id for u in conv.list_uploads()] == [up.upload_id]
        job.cancel()
        conv.delete_upload(up)  # a finished job keeps its record, not the file
        assert conv.list_uploads() == []
        assert conv.job(job.id).upload_id == up.upload_id


def test_a_wait_ended_by_timeout_or_ctrl_c_names_the_job_still_running(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """The waiting ends, not the job: 'interrupted' or 'raise --timeout' alone left a user who
    had not seen the job's id unable to follow or stop it."""
    srv, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    flags = ("--architecture", "seed", "--architecture-kwargs", '{"fake": "block"}')
    code, _, err = ferry(capsys, "convert", str(weights), "--model", "seed", *flags,
                         "--timeout", "3", "--no-progress", *t)  # fmt: skip
    line = one_error_line(err)
    with ConversionClient(srv.management_target) as conv:
        (job,) = conv.list_jobs()
        assert code == 1 and "DEADLINE_EXCEEDED" in line
        assert f"job {job.id} keeps running" in line and f"ferry jobs cancel {job.id}" in line
        assert conv.job(job.id).state == "RUNNING"

        def interrupted(self: Any, *args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(Job, "wait", interrupted)
        code, _, err = ferry(capsys, "jobs", "wait", job.id, *t)
        line = one_error_line(err)
        assert code == 130 and "interrupted" in line and f"ferry jobs wait {job.id}" in line
        conv.cancel(job.id)


def test_a_wait_cut_off_by_the_server_names_the_job(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server gone while `ferry jobs wait` followed a job (killed, or stopped) was answered
    "nothing answered at HOST:PORT: management listens on 127.0.0.1:8003 unless ...", an
    address that had been answering all along, and the job was not named."""
    srv, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    flags = ("--architecture", "seed", "--architecture-kwargs", '{"fake": "block"}')
    code, out, err = ferry(capsys, "convert", str(weights), "--model", "seed", *flags,
                           "--no-wait", *t)  # fmt: skip
    assert code == 0, err
    job_id = out.split()[1]
    runner = srv.app.conversion.runner
    original, watching, hold = runner.watch, threading.Event(), asyncio.Event()

    async def watch(job: str) -> AsyncIterator[Any]:
        # The stream sends what it has, then nothing more: as a server killed mid-job.
        async for event in original(job):
            yield event
            watching.set()
            await hold.wait()

    runner.watch = watch
    ended: dict[str, int] = {}
    follower = threading.Thread(
        target=lambda: ended.update(code=main(["jobs", "wait", job_id, "--no-progress", *t]))
    )
    follower.start()
    try:
        assert watching.wait(60)
    finally:
        srv.stop()
        follower.join(60)
    line = one_error_line(capsys.readouterr().err)
    assert ended["code"] == 3 and f"followed job {job_id}" in line, line
    assert f"ferry jobs show {job_id}" in line and "8003" not in line


# ---- convert flags ----
def test_convert_flags_reach_the_job(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32))
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=np.zeros((5, 3), np.float32))
    code, out, err = ferry(
        capsys,
        "convert",
        str(weights),
        "--model",
        "seed",
        "--architecture",
        "seed",
        "--quantize",
        "static_int8",
        "--calibration",
        str(calib),
        "--calibration-method",
        "percentile",
        "--min-cosine",
        "0.95",
        "--min-top1-agreement",
        "0.5",
        "--rtol",
        "0.01",
        "--atol",
        "0.001",
        "--keep-failed",
        "--validation-inputs",
        str(samples),
        "--no-progress",
        "--json",
        *t,
    )
    assert code == 0, err
    seen = json.loads(out)["seen"]
    assert seen["calibration"] == {"input": [20, 3]}
    q, v = seen["quantization"], seen["validation"]
    assert q["mode"] == "static_int8" and q["calibration"] == "percentile"
    assert v["min_cosine"] == 0.95 and v["min_top1_agreement"] == 0.5
    assert v["rtol"] == 0.01 and v["atol"] == 0.001 and v["keep_failed"] is True
    assert v["sample_file"]


def test_convert_with_rollout_shadow_keeps_the_serving_version(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first conversion serves; the second, --rollout shadow, becomes a shadow candidate:
    version 1 keeps the traffic, and the rollout says so."""
    srv, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    common = (str(weights), "--model", "seed", "--architecture", "seed", "--no-progress", *t)
    code, out, err = ferry(capsys, "convert", *common)
    assert code == 0, err
    code, out, err = ferry(
        capsys, "convert", *common, "--rollout", "shadow", "--rollout-fraction", "0.25"
    )
    assert code == 0, err
    assert "shadow candidate" in out and "version 1 keeps serving" in out
    with RepositoryClient(srv.management_target) as repo:
        view = repo.get_rollout("seed")
    assert view.split == {1: 1.0} and (view.shadow_version, view.shadow_fraction) == (2, 0.25)
    assert "conversion job" in view.history[-1].by
    with InferenceClient(srv.target) as client:
        x = {"input": np.ones((1, 3), np.float32)}
        assert {client.infer("seed", x, request_id=str(i)).version for i in range(20)} == {1}


def test_convert_usage_errors(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, t = conv_server
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.zeros((2, 3), np.float32))
    code, _, err = ferry(capsys, "convert", "f" * 32, "--calibration", str(calib), *t)
    assert code == 2 and "--quantize" in one_error_line(err)
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    code, _, err = ferry(
        capsys, "convert", "f" * 32, "--quantize", "static_int8", "--calibration", str(bad), *t
    )
    assert code == 2 and "np.savez" in one_error_line(err)


def test_convert_of_a_missing_file_says_it_is_missing(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped path went to the server as an upload id: "upload id 'modle.onnx' is
    malformed" and exit 1, where `ferry upload` of the same path says the file is missing."""
    _, t = conv_server
    missing = tmp_path / "modle.onnx"
    code, _, err = ferry(capsys, "convert", str(missing), "--model", "m", *t)
    line = one_error_line(err)
    assert code == 2 and f"{missing}: no such file or folder" in line and "malformed" not in line
    # An id, in any case, is still the server's to judge.
    code, _, err = ferry(capsys, "convert", "F" * 32, *t)
    assert code == 1 and "no upload 'ffff" in one_error_line(err)


def test_convert_of_an_upload_id_refuses_the_upload_flags(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ferry convert ID --architecture-kwargs '{...corrected}'` dropped the flag without a word
    and converted the weights with the kwargs stored at upload: the same failure again, or a
    version built from what the user had just corrected."""
    srv, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    code, out, err = ferry(capsys, "upload", "seed", str(weights), "--architecture", "seed",
                           "--architecture-kwargs", '{"fake": "ok"}', "--json", *t)  # fmt: skip
    assert code == 0, err
    upload_id = json.loads(out)["upload_id"]
    for flags in (
        ("--architecture-kwargs", '{"fake": "budget"}'),
        ("--architecture", "mlp"),
        ("--format", "safetensors"),
        ("--description", "retry"),
    ):
        code, _, err = ferry(capsys, "convert", upload_id, *flags, "--no-wait", *t)
        line = one_error_line(err)
        assert code == 2 and flags[0] in line and "give the file instead of the id" in line
    with ConversionClient(srv.management_target) as conv:
        assert conv.list_jobs() == []  # nothing was converted


def test_convert_of_a_file_refused_keeps_no_upload(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ferry convert FILE` uploads, then converts: a refused spec left the upload behind, its
    id never shown, one more on every corrected retry."""
    srv, t = conv_server
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_model(sizes=(3, 4, 1)).SerializeToString())
    code, _, err = ferry(capsys, "convert", str(model), "--model", "m", "--quantize", "int3", *t)
    assert code == 1 and "unknown quantization mode" in err
    with ConversionClient(srv.management_target) as conv:
        assert conv.list_uploads() == []


@pytest.mark.parametrize("job_started", [False, True])
def test_convert_of_a_file_interrupted_keeps_no_stray_upload(
    conv_server: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    job_started: bool,
) -> None:
    """A Ctrl-C between `ferry convert FILE`'s upload and its job left the upload behind, its
    id never shown; now it is removed, or (the Convert got through and a job reads it) the
    message names the job that keeps running."""
    srv, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    real = ConversionClient.convert

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Job:
        if job_started:
            real(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ConversionClient, "convert", interrupted)
    flags = ("--architecture", "seed", "--architecture-kwargs", '{"fake": "block"}')
    code, _, err = ferry(capsys, "convert", str(weights), "--model", "seed", *flags, *t)
    line = one_error_line(err)
    assert code == 130 and "interrupted" in line
    with ConversionClient(srv.management_target) as conv:
        if not job_started:
            assert conv.list_uploads() == [] and conv.list_jobs() == []
            return
        (job,) = conv.list_jobs()
        assert f"job {job.id} keeps running" in line and f"ferry jobs cancel {job.id}" in line
        conv.cancel(job.id)


def test_convert_no_wait_json_prints_the_job_as_json(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ferry convert ... --no-wait --json` printed the human line ("job ... QUEUED; follow it
    with ..."), so a script reading the job id from the JSON failed to parse it."""
    srv, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    flags = ("--architecture", "seed", "--architecture-kwargs", '{"fake": "block"}')
    code, out, _ = ferry(capsys, "convert", str(weights), "--model", "seed", *flags,
                         "--no-wait", "--json", *t)  # fmt: skip
    assert code == 0
    printed = json.loads(out)
    with ConversionClient(srv.management_target) as conv:
        (job,) = conv.list_jobs()
        assert printed["job_id"] == job.id and printed["model"] == "seed"
        assert printed["state"] in ("QUEUED", "RUNNING")
        conv.cancel(job.id)


def test_conversion_errors_hint_in_convert_terms(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())
    code, out, _ = ferry(
        capsys,
        "upload",
        "seed",
        str(weights),
        "--architecture",
        "seed",
        "--architecture-kwargs",
        '{"fake": "budget"}',
        "--json",
        *t,
    )
    upload_id = json.loads(out)["upload_id"]
    code, _, err = ferry(capsys, "convert", upload_id, "--quantize", "dynamic_int8", *t)
    line = one_error_line(err)
    assert code == 1 and "accuracy budget" in line and "--keep-failed" in line
    assert "models describe" not in line
    # A refusal of the spec names convert's help, not the inference inputs.
    code, _, err = ferry(capsys, "convert", upload_id, "--min-cosine", "7", *t)
    line = one_error_line(err)
    assert code == 1 and "min_cosine" in line and "ferry convert --help" in line
    assert "models describe" not in line
    # Another command's refusal names its own help, not convert's.
    unknown = tmp_path / "model.weights"
    unknown.write_bytes(b"\x00" * 8)
    for argv in (("upload", "seed", str(unknown)), ("jobs", "show", "nope")):
        _, _, err = ferry(capsys, *argv, *t)
        line = one_error_line(err)
        assert f"ferry {' '.join(argv[: 2 if argv[0] == 'jobs' else 1])} --help" in line, line
        assert "ferry convert --help" not in line, line


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "refresh"],
        ["models", "load"],
        ["models", "unload"],
        ["models", "rollout"],
        ["uploads"],
        ["uploads", "list"],
        ["uploads", "delete"],
    ],
)
def test_new_commands_have_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0 and "usage: ferry" in capsys.readouterr().out


def test_uploads_help_names_the_retention_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """`ferry uploads --help` said uploads stay until deleted, while the server removes those
    past --upload-retention-seconds (7 days) or --upload-retention-bytes: a user who kept an
    upload to convert again later found it gone (NOT_FOUND) with the help saying it could not."""
    with pytest.raises(SystemExit):
        main(["uploads", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "retention rule" in out and "7 days" in out, out


def test_convert_and_jobs_wait_json_print_a_failed_job(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`convert --json` and `jobs wait --json` printed nothing when the job failed (no JSON for
    a script, no report), and the error's hint said "rerun with --json for the job's report":
    a second conversion, which printed nothing either. The failed job is printed now, and the
    hint names `ferry jobs show ID --json`."""
    _, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())

    def upload(fake: str) -> str:
        code, out, err = ferry(
            capsys, "upload", "seed", str(weights), "--architecture", "seed",
            "--architecture-kwargs", json.dumps({"fake": fake}), "--json", *t,
        )  # fmt: skip
        assert code == 0, err
        return str(json.loads(out)["upload_id"])

    code, out, err = ferry(capsys, "convert", upload("crash"), "--no-progress", "--json", *t)
    line = one_error_line(err)
    job_id = line.split("conversion job ")[1].split()[0]
    assert code == 1 and json.loads(out) == {"stopped": "export"}
    assert f"`ferry jobs show {job_id} --json`" in line and "rerun" not in line
    code, out, err = ferry(capsys, "jobs", "wait", job_id, "--no-progress", "--json", *t)
    shown = json.loads(out)
    assert code == 1 and "crashed" in one_error_line(err)
    assert shown["state"] == "FAILED" and shown["report"] == {"stopped": "export"}
    # No report at all: the job, with its error.
    code, out, err = ferry(capsys, "convert", upload("budget"), "--no-progress", "--json", *t)
    printed = json.loads(out)
    assert code == 1 and "accuracy budget" in one_error_line(err)
    assert printed["state"] == "FAILED" and "accuracy budget" in printed["error_message"]


# ---- jobs list | show | wait | cancel ----
def test_jobs_list_show_wait_and_cancel(
    conv_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A conversion outlives the command that started it (--no-wait, a closed terminal): the
    CLI finds it again, follows it, and stops it, where before only the SDK could."""
    _, t = conv_server
    weights = tmp_path / "seed.pt"
    weights.write_bytes(fake_state_dict())

    def started(fake: str) -> str:
        code, out, err = ferry(
            capsys, "upload", "seed", str(weights), "--architecture", "seed",
            "--architecture-kwargs", json.dumps({"fake": fake}), "--json", *t,
        )  # fmt: skip
        assert code == 0, err
        code, out, err = ferry(capsys, "convert", json.loads(out)["upload_id"], "--no-wait", *t)
        assert code == 0, err
        job_id = out.split()[1]
        assert f"ferry jobs wait {job_id}" in out and f"ferry jobs cancel {job_id}" in out
        return job_id

    done, failed, hung = started("ok"), started("budget"), started("block")
    code, out, err = ferry(capsys, "jobs", "wait", done, "--no-progress", *t)
    assert code == 0 and f"job {done}" in out and "version 1" in out, err
    code, _, err = ferry(capsys, "jobs", "wait", failed, "--no-progress", *t)
    assert code == 1 and "accuracy budget" in one_error_line(err)

    code, out, _ = ferry(capsys, "jobs", "list", "--json", *t)
    listed = {j["job_id"]: j for j in json.loads(out)}
    assert code == 0 and list(listed) == [hung, failed, done]  # newest first
    assert listed[done]["state"] == "SUCCEEDED" and listed[done]["version"] == 1
    assert listed[failed]["state"] == "FAILED"
    assert listed[failed]["error_code"] == "FAILED_PRECONDITION"
    code, out, _ = ferry(capsys, "jobs", "list", "seed", "--limit", "1", *t)
    assert code == 0 and hung in out and done not in out and "JOB_ID" in out

    code, out, _ = ferry(capsys, "jobs", "show", failed, *t)
    assert code == 0 and failed in out and "accuracy budget" in out
    code, out, _ = ferry(capsys, "jobs", "show", done, "--json", *t)
    assert code == 0 and json.loads(out)["report"]["published"] == "fp32"

    code, out, err = ferry(capsys, "jobs", "cancel", hung, *t)
    assert code == 0 and f"job {hung} CANCELLED" in out, err
    code, out, _ = ferry(capsys, "jobs", "show", hung, "--json", *t)
    assert json.loads(out)["state"] == "CANCELLED"

    code, _, err = ferry(capsys, "jobs", "show", "f" * 32, *t)
    assert code == 1 and "ferry jobs list" in one_error_line(err)
    code, _, err = ferry(capsys, "jobs", "show", "not-an-id", *t)
    assert code == 1 and "malformed" in one_error_line(err)
    code, out, _ = ferry(capsys, "jobs", "list", "other", *t)
    assert code == 0 and "no jobs for 'other'" in out
