"""ModelConversion over real gRPC: uploads, jobs, restarts and version management.

Most tests run a stand-in child (FAKE_CHILD below, same command-line and progress contract as
``ferry.server.convert.worker.child``) so that queueing, cancellation, timeouts and failure mapping are
exercised deterministically and fast; the ``slow`` ones run the real child, which exports with
torch. Nothing waits on the clock: progress is followed through WatchJob events.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import wait_for
from serverutil import ConversionServers, ServerThread

from ferry.client import (
    ConversionClient,
    ConversionError,
    DeadlineExceededError,
    FailedPreconditionError,
    InferenceClient,
    InvalidInputError,
    JobFailedError,
    JobNotFoundError,
    LimitExceededError,
    ModelNotFoundError,
    Pruning,
    Quantization,
    ServerOverloadedError,
    Serving,
)
from ferry.proto.v1 import model_conversion_pb2 as pb
from ferry.proto.v1 import model_conversion_pb2_grpc as pb_grpc
from ferry.server.convert import uploads as uploads_module
from ferry.server.convert.store import JobRecord, JobState, JobStore, now_ms
from ferry.server.convert.strategies import pruning as pruning_methods
from ferry.server.convert.strategies import quantization as quantization_modes
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import mlp_model, write_model

FAKE_CHILD = r"""
import json, os, shutil, sys, time
args = sys.argv[1:]
job = json.load(open(args[args.index("--job") + 1]))
out = os.fdopen(int(args[args.index("--progress-fd") + 1]), "w")
def emit(stage, fraction, message="", error_kind=""):
    out.write(json.dumps({"stage": stage, "fraction": fraction, "message": message,
                          "error_kind": error_kind}) + "\n")
    out.flush()
mode = job["architecture_kwargs"].get("fake", "ok")
if mode == "env":  # report the environment the child was given, then succeed
    json.dump(dict(os.environ), open(job["architecture_kwargs"]["env_to"], "w"))
    mode = "ok"
work = job["work_dir"]
emit("load", 0.0, "loading")
print("exporter chatter on stdout")
emit("export", 0.15, "exporting")
if mode == "block":
    while True:
        time.sleep(3600)
if mode == "daemon":  # a process of its own session, holding the pipes after the child exits
    import subprocess
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              start_new_session=True, pass_fds=(out.fileno(),))
    shutil.copy(job["source_path"], os.path.join(work, "model.onnx"))
    json.dump({"variants": [{"name": "fp32", "size_bytes": 1, "latency_ms": {"1": 0.5}}],
               "published": "fp32", "opset": 17, "source_format": job["source_format"],
               "daemon_pid": daemon.pid}, open(os.path.join(work, "report.json"), "w"))
    emit("benchmark", 0.95, "finished")
    sys.exit(0)
if mode == "chatty":  # progress without end, then a model
    for i in range(3000):
        emit("convert", 0.5, f"step {i}")
    mode = "ok"
if mode == "ok":
    shutil.copy(job["source_path"], os.path.join(work, "model.onnx"))
    os.makedirs(os.path.join(work, ".scratch"))
    report = {"variants": [{"name": "fp32", "size_bytes": 1, "latency_ms": {"1": 0.5}}],
              "published": "fp32", "opset": 17, "source_format": job["source_format"],
              "parity": {"max_abs": 0.0, "cosine": 1.0, "samples": 4, "against": "onnx"}}
    json.dump(report, open(os.path.join(work, "report.json"), "w"))
    emit("benchmark", 0.95, "finished")
    sys.exit(0)
if mode == "litter":  # what libraries leave behind, and a report that points elsewhere
    shutil.copy(job["source_path"], os.path.join(work, "model.onnx"))
    telemetry = os.path.join(work, "Microsoft", "DeveloperTools", ".onnxruntime")
    os.makedirs(telemetry)
    for path in (os.path.join(telemetry, "onnxruntime.db"), os.path.join(work, ".ses"),
                 os.path.join(work, "onnxruntime_profile_0.json"), os.path.join(work, "deviceid")):
        open(path, "w").write("{}")
    json.dump({"published": "elsewhere"}, open("outside.json", "w"))
    os.symlink(os.path.abspath("outside.json"), os.path.join(work, "report.json"))
    emit("benchmark", 0.95, "finished")
    sys.exit(0)
if mode == "fail":
    json.dump({"variants": [], "published": None,
               "error": {"stage": "export", "kind": "INVALID_ARGUMENT", "message": "no"}},
              open(os.path.join(work, "report.json"), "w"))
    emit("export", 0.15, "unsupported operator aten::foo: use opset 18", "FAILED_PRECONDITION")
    sys.exit(2)
if mode == "hog":
    hog = bytearray(1 << 30)
if mode == "crash":
    print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture
def fake_child(tmp_path: Path) -> list[str]:
    path = tmp_path / "fake_child.py"
    path.write_text(FAKE_CHILD)
    return [sys.executable, str(path)]


Start = Callable[..., tuple[ServerThread, ConversionClient]]


@pytest.fixture
def start(tmp_path: Path, fake_child: list[str]) -> Iterator[Start]:
    """start(fake=True, **settings) -> (server, conversion client) on tmp_path/repo."""
    servers = ConversionServers(tmp_path / "repo", child_command=fake_child)
    yield servers.start
    servers.close()


def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "repo.ferry"


def onnx_bytes(seed: int = 0) -> bytes:
    return mlp_model(sizes=(8, 16, 4), seed=seed).SerializeToString()


def leftovers(tmp_path: Path) -> list[str]:
    """Anything partial: staging folders in the repository, temp uploads, job folders."""
    repo = tmp_path / "repo"
    found = [str(p) for p in repo.rglob(".tmp-*")]
    found += [str(p) for p in (state_dir(tmp_path) / "uploads").glob(".tmp-*")]
    found += [str(p) for p in (state_dir(tmp_path) / "jobs").iterdir()]
    return found


def infer(srv: ServerThread, model: str, x: np.ndarray, version: int | None = None) -> Any:
    with InferenceClient(srv.target, timeout=60) as client:
        return client.infer(model, {"input": x}, version=version)


# ---- uploads ----
def test_upload_returns_sha256_and_keeps_the_file(start: Start, tmp_path: Path) -> None:
    _, conv = start()
    data = onnx_bytes()
    up = conv.upload("mlp", data, format="onnx", description="tiny", chunk_size=1000)
    assert up.sha256 == hashlib.sha256(data).hexdigest()
    assert (up.size_bytes, up.format, up.model, up.description) == (
        len(data),
        "onnx",
        "mlp",
        "tiny",
    )
    stored = state_dir(tmp_path) / "uploads" / f"{up.upload_id}.onnx"
    assert stored.read_bytes() == data


def test_upload_over_the_limit_is_refused_while_receiving(start: Start, tmp_path: Path) -> None:
    srv, conv = start(max_upload_bytes=4096)
    stub = pb_grpc.ModelConversionStub(grpc.insecure_channel(srv.management_target))
    header = pb.UploadHeader(model="big", format=pb.SOURCE_FORMAT_ONNX)  # no size announced

    def requests() -> Iterator[pb.UploadModelRequest]:
        yield pb.UploadModelRequest(header=header)
        for _ in range(16):
            yield pb.UploadModelRequest(chunk=b"\0" * 1024)

    with pytest.raises(grpc.RpcError) as info:
        stub.UploadModel(requests(), timeout=60)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4096 bytes" in info.value.details()
    assert list((state_dir(tmp_path) / "uploads").iterdir()) == []
    # Announced sizes are refused before any byte is sent, through the SDK's exception.
    with pytest.raises(LimitExceededError, match="--max-upload-bytes"):
        conv.upload("big", b"\0" * 5000, format="onnx")


def test_corrupt_truncated_and_mismatched_uploads(start: Start, tmp_path: Path) -> None:
    srv, conv = start()
    with pytest.raises(InvalidInputError, match="not an ONNX model"):
        conv.upload("m", b"\x08" + b"\xff" * 64, format="onnx")
    with pytest.raises(InvalidInputError, match="safetensors"):
        conv.upload("m", b"\x10" + b"\0" * 7 + b"{}", format="safetensors", architecture="seed")
    stub = pb_grpc.ModelConversionStub(grpc.insecure_channel(srv.management_target))
    data = onnx_bytes()
    for header, what in (
        (pb.UploadHeader(model="m", format="SOURCE_FORMAT_ONNX", size_bytes=len(data) + 1),
         "truncated"),
        # More bytes than announced is no truncation: refused at the first byte past it.
        (pb.UploadHeader(model="m", format="SOURCE_FORMAT_ONNX", size_bytes=len(data) - 1),
         "longer than its header announced"),
        (pb.UploadHeader(model="m", format="SOURCE_FORMAT_ONNX", expected_sha256="0" * 64),
         "corrupted"),
    ):  # fmt: skip
        requests = [pb.UploadModelRequest(header=header), pb.UploadModelRequest(chunk=data)]
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadModel(iter(requests), timeout=60)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert what in info.value.details()
    with pytest.raises(InvalidInputError, match="invalid model name"):
        conv.upload("../escape", data, format="onnx")
    assert list((state_dir(tmp_path) / "uploads").iterdir()) == []


def test_an_upload_message_that_is_neither_header_nor_chunk_is_named_as_such(
    start: Start, tmp_path: Path
) -> None:
    """An empty UploadModelRequest after the header was refused as 'only the first message of
    an upload may be a header', a header the client never sent."""
    srv, _ = start()
    stub = pb_grpc.ModelConversionStub(grpc.insecure_channel(srv.management_target))
    data = onnx_bytes()
    header = pb.UploadHeader(model="m", format="SOURCE_FORMAT_ONNX")
    for middle, what in (
        (pb.UploadModelRequest(), "after 10 bytes of the upload carries neither a header nor"),
        (pb.UploadModelRequest(header=header), "only the first message of an upload may be"),
    ):
        requests = [
            pb.UploadModelRequest(header=header),
            pb.UploadModelRequest(chunk=data[:10]),
            middle,
            pb.UploadModelRequest(chunk=data[10:]),
        ]
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadModel(iter(requests), timeout=60)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert what in info.value.details(), info.value.details()
    assert list((state_dir(tmp_path) / "uploads").iterdir()) == []


class _CreatesFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_bare_pickle_is_refused_unread(start: Start, tmp_path: Path) -> None:
    _, conv = start()
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _CreatesFile(marker)})
    with pytest.raises(InvalidInputError, match="bare pickle"):
        conv.upload("evil", payload, format="state_dict", architecture="seed")
    assert not marker.exists()
    assert list((state_dir(tmp_path) / "uploads").iterdir()) == []


def test_code_bearing_formats_are_refused_by_default(start: Start, tmp_path: Path) -> None:
    _, conv = start()
    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(b"PK\x03\x04 whatever")
    with pytest.raises(FailedPreconditionError, match="--allow-code-formats") as info:
        conv.upload("prog", pt2)  # the suffix says exported_program
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(FailedPreconditionError, match="--allow-code-formats"):
        conv.upload("prog", b"PK\x03\x04", format="torchscript")


def test_a_client_leaving_mid_upload_leaves_no_file(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, _ = start()
    written, finished, release = threading.Event(), threading.Event(), threading.Event()
    real_receive = uploads_module.receive

    async def receive(header: Any, chunks: Any, folder: Path, **kw: Any) -> Any:
        async def observed() -> Any:
            async for chunk in chunks:
                yield chunk
                written.set()  # asked for the next chunk: the first one is on disk

        try:
            return await real_receive(header, observed(), folder, **kw)
        finally:
            finished.set()

    monkeypatch.setattr(uploads_module, "receive", receive)

    def requests() -> Iterator[pb.UploadModelRequest]:
        yield pb.UploadModelRequest(header=pb.UploadHeader(model="m", format="SOURCE_FORMAT_ONNX"))
        yield pb.UploadModelRequest(chunk=b"\0" * 1000)
        release.wait(60)

    stub = pb_grpc.ModelConversionStub(grpc.insecure_channel(srv.management_target))
    call = stub.UploadModel.future(requests(), timeout=60)
    assert written.wait(60)
    assert [p.name[:5] for p in (state_dir(tmp_path) / "uploads").iterdir()] == [".tmp-"]
    call.cancel()
    assert finished.wait(60)
    release.set()
    assert list((state_dir(tmp_path) / "uploads").iterdir()) == []


def test_a_client_leaving_during_an_archive_extraction_leaves_no_folder(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The extraction runs in a thread, which a cancelled call does not stop: it went on to
    leave the whole extracted folder (.tmp-<id>.d, up to --max-upload-bytes) until a restart."""
    from ferry.server.convert import onnx_archive

    srv, _ = start()
    extracting, release, finished = threading.Event(), threading.Event(), threading.Event()
    real_member_name, real_receive = onnx_archive._member_name, uploads_module.receive

    def member_name(*args: Any) -> Any:  # the archive is open, its first member read
        extracting.set()
        release.wait(60)
        return real_member_name(*args)

    async def receive(*args: Any, **kwargs: Any) -> Any:
        try:
            return await real_receive(*args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(onnx_archive, "_member_name", member_name)
    monkeypatch.setattr(uploads_module, "receive", receive)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = onnx_bytes()
        member = tarfile.TarInfo("model.onnx")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    requests = [
        pb.UploadModelRequest(
            header=pb.UploadHeader(model="m", format="SOURCE_FORMAT_ONNX_ARCHIVE")
        ),
        pb.UploadModelRequest(chunk=buffer.getvalue()),
    ]
    stub = pb_grpc.ModelConversionStub(grpc.insecure_channel(srv.management_target))
    call = stub.UploadModel.future(iter(requests), timeout=60)
    assert extracting.wait(60)
    call.cancel()
    assert finished.wait(60)
    release.set()
    uploads = state_dir(tmp_path) / "uploads"
    wait_for(lambda: not any(uploads.iterdir()), "the extracted folder to go")


# ---- jobs with the stand-in child ----
def convert_fake(conv: ConversionClient, model: str, mode: str, seed: int = 0, **kw: Any) -> Any:
    up = conv.upload(model, onnx_bytes(seed), format="onnx", architecture_kwargs={"fake": mode})
    return conv.convert(up, **kw)


def test_the_conversion_process_is_not_given_the_servers_secrets(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code reached through an upload runs in the child: it inherited the server environment,
    the management and inference tokens included. Secrets stay out; the rest still reaches it."""
    monkeypatch.setenv("FERRY_MANAGEMENT_TOKEN", "m-secret")
    monkeypatch.setenv("FERRY_INFERENCE_TOKEN", "i-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("TLS_KEY_PASSPHRASE", "pass-secret")
    monkeypatch.setenv("FERRY_HARMLESS_PROBE", "kept-out-too")
    monkeypatch.setenv("SOME_PLAIN_SETTING", "kept")
    # onnxruntime's switch that lets an uploaded model's metadata set its session options
    monkeypatch.setenv("ORT_LOAD_CONFIG_FROM_MODEL", "1")
    _, conv = start()
    report = tmp_path / "child_env.json"
    up = conv.upload(
        "envm",
        onnx_bytes(),
        format="onnx",
        architecture_kwargs={"fake": "env", "env_to": str(report)},
    )
    assert conv.convert(up).wait(progress=False).state == "SUCCEEDED"
    env = json.loads(report.read_text())
    secrets = {"m-secret", "i-secret", "aws-secret", "hf-secret", "pass-secret"}
    assert not [k for k, v in env.items() if v in secrets or k.startswith("FERRY_")]
    assert "ORT_LOAD_CONFIG_FROM_MODEL" not in env
    assert env["SOME_PLAIN_SETTING"] == "kept" and env["PATH"] == os.environ["PATH"]
    assert env["MALLOC_ARENA_MAX"] == "2"


def test_success_publishes_serves_and_reports(
    start: Start, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, conv = start()
    serving = Serving(max_batch_size=8, instance_count=1, combine_requests=False)
    job = convert_fake(conv, "mlp8", "ok", serving=serving)
    assert job.state in ("QUEUED", "RUNNING")
    done = job.wait(progress=True)
    assert "] 100% done: published as mlp8 version 1" in capsys.readouterr().err
    events = list(job.events())  # a finished job's stream replays its history, then ends
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] == 1
    assert [e.stage for e in events[:2]] == ["queued", "load"]
    assert [e.stage for e in events[-2:]] == ["publish", "done"]
    assert events[-1].state == "SUCCEEDED" and events[-1].fraction == 1.0
    assert all(a.fraction <= b.fraction for a, b in itertools.pairwise(events))
    assert (done.state, done.version, done.error_code) == ("SUCCEEDED", 1, None)
    assert done.report is not None and done.report.published == "fp32"
    assert done.report.parity is not None and done.report.parity.samples == 4
    # Served, with the serving config the job asked for, and only the version's files kept.
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert infer(srv, "mlp8", x)["logits"].shape == (3, 4)
    with InferenceClient(srv.target) as client:
        batching = client.model_metadata("mlp8").batching
        assert (batching.max_batch_size, batching.combine_requests) == (8, False)
    assert sorted(p.name for p in (tmp_path / "repo" / "mlp8" / "1").iterdir()) == [
        "config.json",
        "model.onnx",
        "report.json",
    ]
    info = conv.get_model("mlp8")
    (v1,) = info.versions
    assert (info.default_version, v1.state, v1.job_id, v1.is_default) == (1, "READY", job.id, True)
    assert v1.report is not None and v1.report.variants[0].latency_ms == {1: 0.5}
    assert leftovers(tmp_path) == []
    listed = conv.list_jobs("mlp8")
    assert [j.id for j in listed] == [job.id] and listed[0].state == "SUCCEEDED"
    assert conv.list_jobs("other") == []
    assert [e.seq for e in conv.job(job.id).events()] == seqs


def test_convert_max_batch_size_is_also_the_versions_serving_batch(start: Start) -> None:
    """``convert(max_batch_size=N)`` set only the batch the export is checked at, so the
    version was served at the load's default (32), while ``ferry convert --max-batch-size N``
    (ffdd3bb) also states it as the version's serving batch: the SDK and the CLI now agree. A
    batch stated in ``Serving`` stays the serving batch."""
    srv, conv = start()
    convert_fake(conv, "batch8", "ok", max_batch_size=8).wait(progress=False)
    stated = Serving(max_batch_size=4)
    convert_fake(conv, "stated4", "ok", max_batch_size=8, serving=stated).wait(progress=False)
    with InferenceClient(srv.target) as client:
        assert client.model_metadata("batch8").batching.max_batch_size == 8
        assert client.model_metadata("stated4").batching.max_batch_size == 4


def test_a_version_holds_only_its_own_files(start: Start, tmp_path: Path) -> None:
    """Whatever else the child left in the staging folder (telemetry databases, session and
    profile files, a report.json that is a link to another file) is removed before the server
    reads the folder: the published version holds model.onnx and config.json, nothing more."""
    srv, conv = start()
    done = convert_fake(conv, "tidy", "litter", serving=Serving(max_batch_size=4)).wait(
        progress=False
    )
    assert (done.state, done.version) == ("SUCCEEDED", 1)
    assert done.report is None  # the linked report was never read
    version = tmp_path / "repo" / "tidy" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["config.json", "model.onnx"]
    assert infer(srv, "tidy", np.zeros((1, 8), np.float32))["logits"].shape == (1, 4)
    assert leftovers(tmp_path) == []


def test_keep_version_files_keeps_regular_files_only(tmp_path: Path) -> None:
    from ferry.server.convert.jobs import keep_version_files

    (tmp_path / "model.onnx").write_bytes(b"m")
    (tmp_path / "elsewhere.json").write_text("{}")
    staged = tmp_path / "staged"
    (staged / ".scratch" / "tmp").mkdir(parents=True)
    (staged / "model.onnx").symlink_to(tmp_path / "model.onnx")
    (staged / "report.json").mkdir()
    (staged / "config.json").write_text("{}")  # publish writes the config, never the child
    assert keep_version_files(staged) == [".scratch", "config.json", "model.onnx", "report.json"]
    assert list(staged.iterdir()) == []
    assert (tmp_path / "model.onnx").read_bytes() == b"m"  # a link is removed, not followed
    (staged / "model.onnx").write_bytes(b"m")
    (staged / "report.json").write_text("{}")
    assert keep_version_files(staged) == []
    assert sorted(p.name for p in staged.iterdir()) == ["model.onnx", "report.json"]


def test_domain_failure_carries_kind_code_and_report(start: Start, tmp_path: Path) -> None:
    _, conv = start()
    job = convert_fake(conv, "newmodel", "fail")
    with pytest.raises(JobFailedError) as info:
        job.wait(progress=False)
    err = info.value
    assert isinstance(err, ConversionError)
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION and err.kind == "FAILED_PRECONDITION"
    assert "unsupported operator aten::foo" in err.message
    assert err.report is not None and err.report.error is not None
    assert err.job.state == "FAILED" and err.job.stage == "export"
    events = list(job.events())
    assert events[-1].error_kind == "FAILED_PRECONDITION" and events[-1].state == "FAILED"
    assert not (tmp_path / "repo" / "newmodel").exists()  # no empty model folder either
    assert leftovers(tmp_path) == []


def test_crash_memory_and_timeout_fail_with_the_reason(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ferry.convert")
    srv, conv = start(conversion_memory_bytes=256 << 20)
    crashed = convert_fake(conv, "m", "crash")
    with pytest.raises(
        JobFailedError, match=r"crashed \(exit code 1\): RuntimeError: boom"
    ) as info:
        crashed.wait(progress=False)
    assert info.value.code is grpc.StatusCode.INTERNAL
    # The message sends the reader to the server log: the output is there at the default level.
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("Traceback (most recent call last)" in m and "boom" in m for m in logged)
    hog = convert_fake(conv, "m", "hog")
    with pytest.raises(JobFailedError, match="ran out of memory under its limit") as info:
        hog.wait(progress=False)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert srv.app is not None  # a short limit only now: a loaded machine may start slowly
    srv.app.conversion.runner.timeout = 1.0
    hung = convert_fake(conv, "m", "block")
    with pytest.raises(JobFailedError, match="timed out after 1 s") as info:
        hung.wait(progress=False)
    assert info.value.kind == "DEADLINE_EXCEEDED"
    assert leftovers(tmp_path) == []


def test_a_process_the_child_left_running_does_not_hold_the_job(start: Start) -> None:
    """A process the conversion process started in a session of its own (out of reach of the
    group kill) kept its stdout, stderr and progress pipe open, and the job stayed RUNNING
    until that process exited: for good for a daemon, past --conversion-timeout and CancelJob.
    The job ends once the child has exited and its pipes were drained."""
    _, conv = start()
    job = convert_fake(conv, "m", "daemon")
    pid = 0
    try:
        done = job.wait(timeout=60, progress=False)  # the daemon lives 120 s
        pid = json.loads(done.report_json)["daemon_pid"]
        assert done.state == "SUCCEEDED" and done.version == 1
        os.kill(pid, 0)  # still running: the job did not wait for it
    finally:
        if not pid:
            pid = json.loads(conv.job(job.id).report_json or "{}").get("daemon_pid", 0)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_cancel_mid_export_and_a_full_queue(start: Start, tmp_path: Path) -> None:
    _, conv = start(max_concurrent_conversions=1, max_queued_conversions=1)
    running = convert_fake(conv, "m", "block")
    queued = convert_fake(conv, "m", "block")
    with pytest.raises(ServerOverloadedError, match="queue is full"):
        convert_fake(conv, "m", "block")
    assert queued.refresh().state == "QUEUED"
    assert queued.cancel().state == "CANCELLED"
    for event in running.events():
        if event.stage == "export":
            break
    assert running.refresh().state == "RUNNING"
    with pytest.raises(DeadlineExceededError):
        running.wait(timeout=0.2, progress=False)
    job = running.cancel()
    assert (job.state, job.error_kind, job.version) == ("CANCELLED", "CANCELLED", None)
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "repo" / "m").exists()
    assert running.cancel().state == "CANCELLED"  # idempotent
    with pytest.raises(JobFailedError):
        running.wait(progress=False)


def test_first_conversions_running_together_that_all_fail_leave_no_model_folder(
    start: Start, tmp_path: Path
) -> None:
    """The job that made the new model's folder left it to the others still running; they had
    found it made, so nobody removed it: an empty model stayed after every job failed."""
    _, conv = start(max_concurrent_conversions=2)
    first, second = convert_fake(conv, "m", "block"), convert_fake(conv, "m", "block")
    for job in (first, second):
        for event in job.events():
            if event.stage == "export":
                break
    assert first.cancel().state == "CANCELLED"  # the one that made the folder ends first
    assert (tmp_path / "repo" / "m").is_dir()  # the other still stages there
    assert second.cancel().state == "CANCELLED"
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "repo" / "m").exists()


def test_a_child_flooding_progress_events_keeps_a_bounded_history(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each progress line was a row (and a transaction on the event loop), kept with the job
    and replayed by every WatchJob, however many the child sent."""
    from ferry.server.convert import jobs

    monkeypatch.setattr(jobs, "MAX_EVENTS", 50, raising=False)
    _, conv = start()
    job = convert_fake(conv, "m", "chatty")
    events = list(job.events())
    assert job.wait(progress=False).version == 1
    steps = [e for e in events if e.message.startswith("step ")]
    assert 0 < len(steps) <= 50 and len(events) <= 50 + 4  # queued, started, publish, end
    assert events[-1].state == "SUCCEEDED"


def test_no_waiting_room_still_runs_a_job_a_process_is_free_for(start: Start) -> None:
    """--max-queued-conversions 0 (no job waits) refused every job, an idle server's too."""
    _, conv = start(max_concurrent_conversions=1, max_queued_conversions=0)
    running = convert_fake(conv, "m", "block")
    with pytest.raises(ServerOverloadedError, match="queue is full"):
        convert_fake(conv, "m", "block")
    assert running.cancel().state == "CANCELLED"
    assert convert_fake(conv, "m", "ok").wait(progress=False).version == 1


def test_the_staging_folder_is_named_at_queue_time_and_job_json_written_once(
    start: Start, tmp_path: Path
) -> None:
    """job.json is complete when the job is queued: the runner never rewrites it (its mtime,
    set back to a fixed past instant after queueing, survives the start), and the staging folder
    it names is made only when the job runs, so a queued job leaves nothing in the repository."""
    srv, conv = start(max_concurrent_conversions=1)
    running = convert_fake(conv, "first", "block")
    queued = convert_fake(conv, "second", "block")
    assert queued.refresh().state == "QUEUED"
    staging = tmp_path / "repo" / "second" / f".tmp-job-{queued.id}"
    job_json = state_dir(tmp_path) / "jobs" / queued.id / "job.json"
    text = job_json.read_text()
    assert json.loads(text)["work_dir"] == str(staging)
    assert srv.app is not None
    assert srv.app.conversion.store.get_job(queued.id).work_dir == str(staging)
    assert not (tmp_path / "repo" / "second").exists()
    os.utime(job_json, ns=(1_000_000_000, 1_000_000_000))
    inode = job_json.stat().st_ino

    running.cancel()
    for event in queued.events():
        if event.stage == "export":  # the child read job.json and is working in the folder
            break
    assert queued.refresh().state == "RUNNING" and staging.is_dir()
    after = job_json.stat()
    assert (after.st_ino, after.st_mtime_ns, job_json.read_text()) == (inode, 1_000_000_000, text)
    assert srv.app.conversion.store.get_job(queued.id).work_dir == str(staging)
    assert queued.cancel().state == "CANCELLED"
    assert leftovers(tmp_path) == []
    assert list((tmp_path / "repo").iterdir()) == []


def test_convert_validates_before_spawning(start: Start) -> None:
    _, conv = start()
    up = conv.upload("m", onnx_bytes(), format="onnx")
    # The server's registry is the one list: the refusal names every mode it knows.
    with pytest.raises(InvalidInputError, match="unknown quantization mode") as refused:
        conv.convert(up, quantization="int3")
    assert all(name in str(refused.value) for name in quantization_modes.names())
    with pytest.raises(InvalidInputError, match="unknown pruning method") as refused:
        conv.convert(up, pruning=Pruning("l0_magic", 0.5))
    assert all(name in str(refused.value) for name in pruning_methods.names())
    with pytest.raises(InvalidInputError, match=r"pruning\.amount must be within"):
        conv.convert(up, pruning=Pruning("l1_unstructured", 1.5))
    # The field a client sets: the job contract's calibration_file is no request field.
    with pytest.raises(InvalidInputError, match=r"needs quantization\.calibration_inputs"):
        conv.convert(up, quantization="static_int8")
    with pytest.raises(InvalidInputError, match="invalid model name"):
        conv.convert(up, model="bad/name")
    # Without a shadow rollout the version takes every request: a fraction meant a share.
    with pytest.raises(InvalidInputError, match=r"rollout_fraction 0\.5 is set but rollout is"):
        conv.convert(up, rollout_fraction=0.5)
    with pytest.raises(InvalidInputError, match=r"instances\.count"):
        conv.convert(up, serving=Serving(instance_count=100))
    sd = conv.upload("s", _torch_like_zip(), format="state_dict", architecture="nosuch")
    with pytest.raises(InvalidInputError, match="unknown architecture 'nosuch'"):
        conv.convert(sd)
    with pytest.raises(Exception, match="no upload"):
        conv.convert("f" * 32)
    with pytest.raises(InvalidInputError, match="malformed"):
        conv.job("../../etc")
    with pytest.raises(JobNotFoundError):
        list(conv.watch("f" * 32))
    assert conv.list_jobs() == []


def test_an_upload_being_queued_is_not_deleted_under_its_job(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteUpload while Convert writes its job's files: the upload went, the job was queued
    all the same, and its child failed on the missing file as a crash (INTERNAL)."""
    from ferry.server.convert import service as service_module

    srv, conv = start()
    up = conv.upload("m", onnx_bytes(), format="onnx", architecture_kwargs={"fake": "ok"})
    write = service_module._write_tensors
    refused: list[Exception] = []

    def delete_meanwhile(*args: Any) -> None:
        with ConversionClient(srv.management_target, timeout=30) as other:
            with pytest.raises(FailedPreconditionError, match="being queued") as info:
                other.delete_upload(up.upload_id)
            refused.append(info.value)
        write(*args)

    monkeypatch.setattr(service_module, "_write_tensors", delete_meanwhile)
    job = conv.convert(up)
    monkeypatch.undo()
    assert refused and job.wait(progress=False).state == "SUCCEEDED"
    conv.delete_upload(up.upload_id)  # once the job has ended
    assert conv.list_uploads() == []


def test_a_file_where_the_model_folder_would_be_is_refused_at_convert(
    start: Start, tmp_path: Path
) -> None:
    """A file in the repository named as the model: the job failed INTERNAL (FileExistsError)."""
    _, conv = start()
    (tmp_path / "repo" / "notes").write_text("not a model")
    up = conv.upload("notes", onnx_bytes(), format="onnx", architecture_kwargs={"fake": "ok"})
    with pytest.raises(FailedPreconditionError, match="is a file, not a model folder"):
        conv.convert(up)
    assert conv.list_jobs() == []
    assert conv.convert(up, model="other").wait(progress=False).version == 1


def test_unset_spec_fields_keep_the_core_defaults() -> None:
    """The adapter states no default of its own: unset fields are convert/spec.py's."""
    from ferry.server.convert.spec import ConversionSpec, QuantizationSpec, ValidationSpec
    from ferry.server.grpc.conversion import _spec

    conversion, tensors = _spec(pb.ConversionSpec())
    assert conversion == ConversionSpec()
    assert not (tensors.calibration or tensors.samples or tensors.references)
    request = pb.ConversionSpec(opset=18)
    request.quantization.mode = "auto"
    request.quantization.per_channel = False
    request.validation.atol = 0.5
    conversion, _ = _spec(request)
    assert conversion == ConversionSpec(
        opset=18,
        quantization=QuantizationSpec(mode="auto", per_channel=False),
        validation=ValidationSpec(atol=0.5),
    )


def _torch_like_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", b"never read by the server")
    return buffer.getvalue()


def test_restart_fails_interrupted_jobs_and_keeps_finished_ones(
    start: Start, tmp_path: Path
) -> None:
    srv, conv = start()
    finished = convert_fake(conv, "kept", "ok").wait(progress=False)
    srv.stop()
    # What a crash mid-job leaves: RUNNING rows with their staging folders (one in the folder of
    # a model that had no version yet), a QUEUED row whose staging folder was named but never
    # made, job folders, a temp upload.
    store = JobStore(state_dir(tmp_path) / "state.sqlite3")
    crashed = {"c" * 32: "kept", "d" * 32: "fresh", "e" * 32: "waiting"}
    for created, (job_id, model) in enumerate(crashed.items(), start=now_ms()):
        staging = tmp_path / "repo" / model / f".tmp-job-{job_id}"
        job_dir = state_dir(tmp_path) / "jobs" / job_id
        job_dir.mkdir()
        store.add_job(JobRecord(
            job_id=job_id, model=model, upload_id=finished.upload_id, format="onnx",
            sha256=finished.source_sha256, state=JobState.QUEUED, stage="queued", fraction=0.0,
            message="", version=0, error_kind="", error_message="", spec_json="{}",
            report_json="", work_dir=str(staging), job_dir=str(job_dir), created_ms=created,
            started_ms=0, finished_ms=0, last_seq=0,
        ))  # fmt: skip
        if model != "waiting":
            staging.mkdir(parents=True)
            (staging / "model.onnx").write_bytes(b"partial")
            store.start(job_id, "started")
            store.append_event(job_id, "export", 0.2, "exporting")
    (state_dir(tmp_path) / "uploads" / ".tmp-partial").write_bytes(b"x")
    store.close()

    srv2, conv2 = start()
    lost = conv2.job("c" * 32)
    assert (lost.state, lost.error_kind) == ("FAILED", "UNAVAILABLE")
    assert "restarted during the job" in lost.error_message
    assert lost.stage == "export"
    with pytest.raises(JobFailedError, match="restarted"):
        lost.wait(progress=False)
    kept = conv2.job(finished.id)
    assert (kept.state, kept.version) == ("SUCCEEDED", 1)
    assert conv2.job(finished.id.upper()).id == finished.id  # the same id, in capitals
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["kept"]
    for job_id in ("d" * 32, "e" * 32):
        job = conv2.job(job_id)
        assert (job.state, job.error_kind) == ("FAILED", "UNAVAILABLE")
    x = np.zeros((1, 8), np.float32)
    assert infer(srv2, "kept", x).version == 1
    assert [j.id for j in conv2.list_jobs()] == ["e" * 32, "d" * 32, "c" * 32, finished.id]


def test_a_restart_removes_upload_files_no_record_names(start: Start, tmp_path: Path) -> None:
    """Killed after an upload's rename but before its row (or after a delete's row went but
    before its file did), the file stayed for good: no listing, retention or delete saw it."""
    srv, conv = start()
    kept = conv.upload("m", onnx_bytes(), format="onnx", architecture_kwargs={"fake": "ok"})
    srv.stop()
    uploads = state_dir(tmp_path) / "uploads"
    (uploads / f"{'a' * 32}.onnx").write_bytes(onnx_bytes())
    (uploads / ("b" * 32)).mkdir()
    (uploads / ("b" * 32) / "model.onnx").write_bytes(onnx_bytes())
    _, conv2 = start()
    assert [p.name for p in uploads.iterdir()] == [f"{kept.upload_id}.onnx"]
    assert conv2.convert(kept.upload_id).wait(progress=False).version == 1


def test_uploads_convert_and_delete_after_the_state_folder_moved(
    tmp_path: Path, fake_child: list[str]
) -> None:
    """Records hold the absolute path an upload was stored at: moved (the repository with its
    state folder, or mounted elsewhere), uploads listed while Convert said "file is gone" and
    a delete left the file."""
    first = ConversionServers(tmp_path / "old" / "repo", child_command=fake_child)
    _, conv = first.start()
    data = onnx_bytes()
    up = conv.upload("m", data, format="onnx", architecture_kwargs={"fake": "ok"})
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(data)
    archive = conv.upload("a", folder)
    assert archive.format == "onnx_archive"
    first.close()
    (tmp_path / "old").rename(tmp_path / "new")
    moved = ConversionServers(tmp_path / "new" / "repo", child_command=fake_child)
    try:
        _, conv = moved.start()
        assert {u.upload_id for u in conv.list_uploads()} == {up.upload_id, archive.upload_id}
        assert conv.convert(up.upload_id).wait(progress=False).version == 1
        uploads = tmp_path / "new" / "repo.ferry" / "uploads"
        for upload in (up, archive):
            conv.delete_upload(upload.upload_id)
        assert list(uploads.iterdir()) == []
    finally:
        moved.close()


# A server in a process of its own (so that it can be SIGKILLed) whose publish stops for good
# just before or just after the rename that makes the staging folder a version.
PAUSED_PUBLISH_SERVER = r"""
import sys, threading
from pathlib import Path
from serverutil import ServerThread
from ferry.server.core.repository import ModelRepository
where, repo, child = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
rename = ModelRepository.publish
calls = []
def paused(self, *args, **kwargs):
    calls.append(1)
    if where == "after-shadow" and len(calls) == 1:  # the version the shadow is compared with
        return rename(self, *args, **kwargs)
    if where.startswith("after"):
        rename(self, *args, **kwargs)
    print("PAUSED", flush=True)
    threading.Event().wait()
ModelRepository.publish = paused
srv = ServerThread(repo).start()
srv.app.conversion.runner.child_command = child
print(srv.management_target, flush=True)
threading.Event().wait()
"""


@pytest.mark.parametrize("where", ["before", "after", "after-shadow", "after-moved"])
def test_a_server_killed_mid_publish_reports_what_was_published(
    start: Start, tmp_path: Path, fake_child: list[str], where: str
) -> None:
    """SIGKILL around the rename: after it, the job is SUCCEEDED with the version that serves
    (it said FAILED "convert again", and converting again published the model twice); before
    it, FAILED with nothing published. "after-moved": the repository and its state folder are
    then moved (or mounted elsewhere) before the restart, and the job still reads SUCCEEDED
    (the note was looked for only at the job folder's old absolute path: FAILED)."""
    script = tmp_path / "server.py"
    script.write_text(PAUSED_PUBLISH_SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    repo = tmp_path / ("old/repo" if where == "after-moved" else "repo")
    repo.parent.mkdir(exist_ok=True)
    args = [sys.executable, str(script), where, str(repo), *fake_child]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        target = proc.stdout.readline().strip()
        assert target, "the server did not start"
        with ConversionClient(target, timeout=60) as conv:
            if where == "after-shadow":
                convert_fake(conv, "m", "ok").wait(progress=False)
                job = convert_fake(conv, "m", "ok", rollout="shadow")
            else:
                job = convert_fake(conv, "m", "ok")
            assert proc.stdout.readline().strip() == "PAUSED"
    finally:
        proc.kill()
        proc.wait()

    if where == "after-moved":
        (tmp_path / "old").rename(tmp_path / "repo-moved")
        moved = ConversionServers(tmp_path / "repo-moved" / "repo", child_command=fake_child)
        try:
            after = moved.start()[1].job(job.id)
        finally:
            moved.close()
        assert (after.state, after.version) == ("SUCCEEDED", 1), after.error_message
        return
    _, conv2 = start()
    after = conv2.job(job.id)
    if where == "after":
        assert (after.state, after.version) == ("SUCCEEDED", 1)
        assert "published as m version 1" in after.message
        assert after.report is not None and after.report.published == "fp32"
        info = conv2.get_model("m")
        assert [(v.version, v.job_id) for v in info.versions] == [(1, job.id)]
    elif where == "after-shadow":
        # Published, but stopped before it was made the shadow: the pin keeps it from traffic,
        # and the job says so rather than only "published".
        assert (after.state, after.version) == ("SUCCEEDED", 2)
        assert "left its pin (1=1.0)" in after.message and "--shadow 2=0.1" in after.message
    else:
        assert (after.state, after.error_kind, after.version) == ("FAILED", "UNAVAILABLE", None)
        assert not (tmp_path / "repo" / "m").exists()
    assert leftovers(tmp_path) == []


def test_a_job_end_the_database_refuses_is_recorded_later_and_the_queue_moves_on(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One refused write of a job's end (a full disk) left it RUNNING for good, with its
    version published, its watchers waiting and the job queued behind it QUEUED for ever."""
    from ferry.server.convert import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "END_RETRY_S", 0.01)
    srv, conv = start(max_concurrent_conversions=1)
    assert srv.app is not None
    store = srv.app.conversion.store
    finish = store.finish
    refused: list[str] = []

    def full_once(job_id: str, *args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(job_id)
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise exc
        return finish(job_id, *args, **kwargs)

    monkeypatch.setattr(store, "finish", full_once)
    first = convert_fake(conv, "a", "ok")
    second = convert_fake(conv, "b", "ok")
    assert (first.wait(timeout=60, progress=False).state, first.version) == ("SUCCEEDED", 1)
    assert (second.wait(timeout=60, progress=False).state, second.version) == ("SUCCEEDED", 1)
    assert refused == [first.id]


def test_a_full_job_database_during_a_job_fails_it_as_a_full_disk(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job database refusing a write while the job runs failed it as INTERNAL ("a bug:
    report it") with sqlite's words; it is the operator's full disk."""
    srv, conv = start()
    assert srv.app is not None
    store = srv.app.conversion.store
    record_start = store.start

    def full(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(store, "start", record_start)  # once
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise exc

    monkeypatch.setattr(store, "start", full)
    with pytest.raises(JobFailedError) as info:
        convert_fake(conv, "m", "ok").wait(timeout=60, progress=False)
    job = info.value.job
    assert (job.error_kind, job.error_code) == (
        "LIMIT_EXCEEDED",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "state disk is full" in job.error_message and "convert again" in job.error_message
    assert convert_fake(conv, "m", "ok").wait(timeout=60, progress=False).version == 1


def test_a_second_server_on_the_same_state_folder_is_refused(start: Start, tmp_path: Path) -> None:
    """A second server on one repository (another port) settled the first's running job as
    interrupted by a restart and removed its folders under its live conversion process."""
    from ferry.server.errors import FailedPrecondition

    _, conv = start()
    job = convert_fake(conv, "m", "block")
    for event in job.events():
        if event.stage == "export":
            break
    # The same state folder, named (a test server on a repository in use gets its own).
    second = ServerThread(tmp_path / "repo", state_dir=str(state_dir(tmp_path)))
    with pytest.raises(FailedPrecondition, match="in use by another running Ferry server"):
        second.start()
    second.stop()
    assert job.refresh().state == "RUNNING"
    assert (tmp_path / "repo" / "m" / f".tmp-job-{job.id}").is_dir()
    assert job.cancel().state == "CANCELLED"


def test_cancel_on_a_full_job_database_changes_nothing(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CancelJob of a queued job the database refuses (a full disk) answered INTERNAL, and the
    cancelled job left the queue while staying QUEUED for ever."""
    srv, conv = start(max_concurrent_conversions=1)
    assert srv.app is not None
    store = srv.app.conversion.store
    running = convert_fake(conv, "m", "block")
    queued = convert_fake(conv, "m", "ok")

    def full(*_: Any, **__: Any) -> Any:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise exc

    monkeypatch.setattr(store, "finish", full)
    with pytest.raises(LimitExceededError, match=r"state disk is full.*then cancel the job again"):
        queued.cancel()
    monkeypatch.undo()
    assert queued.refresh().state == "QUEUED"
    assert running.cancel().state == "CANCELLED"
    assert queued.wait(timeout=60, progress=False).version == 1  # still queued: it ran


@pytest.mark.parametrize("kind", ["file", "archive"])
def test_delete_upload_on_a_full_state_disk_frees_the_space(
    start: Start, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    """DeleteUpload on a full state disk was refused RESOURCE_EXHAUSTED "free space, then
    delete again": the job database could not record the delete, so the one call that frees
    space needed it first. The file goes first now, and the record in the room it freed; when
    even that is refused, the file is gone all the same and the answer says so."""
    srv, conv = start()
    assert srv.app is not None
    store = srv.app.conversion.store
    uploads = state_dir(tmp_path) / "uploads"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_bytes())
    source: Any = folder if kind == "archive" else onnx_bytes()
    kept = conv.upload("m", onnx_bytes(1), format="onnx")
    up = conv.upload("m", source, **({} if kind == "archive" else {"format": "onnx"}))
    delete = store.delete_upload
    refusals = [1]  # how many deletes the full database refuses before the room is freed

    def full_until_freed(upload_id: str) -> Any:
        if refusals[0] > 0:
            refusals[0] -= 1
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise exc
        return delete(upload_id)

    monkeypatch.setattr(store, "delete_upload", full_until_freed)
    conv.delete_upload(up.upload_id)
    assert [u.upload_id for u in conv.list_uploads()] == [kept.upload_id]
    assert sorted(p.name for p in uploads.iterdir()) == [f"{kept.upload_id}.onnx"]

    again = conv.upload("m", source, **({} if kind == "archive" else {"format": "onnx"}))
    refusals[0] = 2  # still full once the file is gone: the file goes, the record stays
    with pytest.raises(LimitExceededError, match=r"file was removed.*delete the upload again"):
        conv.delete_upload(again.upload_id)
    assert sorted(p.name for p in uploads.iterdir()) == [f"{kept.upload_id}.onnx"]
    with pytest.raises(FailedPreconditionError, match="file is gone"):
        conv.convert(again.upload_id)
    conv.delete_upload(again.upload_id)  # room again: the record goes too
    assert [u.upload_id for u in conv.list_uploads()] == [kept.upload_id]


def test_cancel_of_a_running_job_on_a_full_job_database_answers_at_once(
    start: Start, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CancelJob of a running job whose end the database refused waited for the end's
    retries, until the client's deadline; it now answers once the job is stopped, saying its
    end is recorded when space is freed, and it is."""
    from ferry.server.convert import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "END_RETRY_S", 0.01)
    srv, conv = start()
    assert srv.app is not None
    store = srv.app.conversion.store
    running = convert_fake(conv, "m", "block")
    for event in running.events():
        if event.stage == "export":
            break
    finish = store.finish
    refused: list[str] = []

    def full(job_id: str, *args: Any, **kwargs: Any) -> Any:
        if not refused or refused[-1] != "freed":
            refused.append(job_id)
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise exc
        return finish(job_id, *args, **kwargs)

    monkeypatch.setattr(store, "finish", full)
    with pytest.raises(LimitExceededError, match=r"job was stopped.*recorded once the operator"):
        conv.cancel(running.id)
    refused.append("freed")  # the disk has room again: the retried end goes in
    with pytest.raises(JobFailedError) as info:
        running.wait(timeout=60, progress=False)
    assert info.value.job.state == "CANCELLED"
    assert leftovers(tmp_path) == []


def test_a_publish_note_the_state_disk_cannot_take_does_not_fail_the_job(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restart note (publish.note_publishing) goes to the state folder: a full state disk
    failed a finished conversion there, saying the repository's disk was full."""
    from ferry.server.convert import publish

    write = publish.write_file_atomic

    def full_for_the_note(path: Path, data: bytes) -> None:
        if path.name == publish.PUBLISHING_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(publish, "write_file_atomic", full_for_the_note)
    _, conv = start()
    assert convert_fake(conv, "m", "ok").wait(timeout=60, progress=False).version == 1


def test_stopping_the_server_fails_running_jobs(start: Start, tmp_path: Path) -> None:
    srv, conv = start()
    job = convert_fake(conv, "m", "block")
    for event in job.events():
        if event.stage == "export":
            break
    srv.stop()
    _, conv2 = start()
    stopped = conv2.job(job.id)
    assert (stopped.state, stopped.error_kind) == ("FAILED", "UNAVAILABLE")
    assert "server stopped during the job" in stopped.error_message
    assert leftovers(tmp_path) == []


def test_set_default_and_delete_versions(start: Start, tmp_path: Path) -> None:
    srv, conv = start()
    for seed in (1, 2):
        convert_fake(conv, "multi", "ok", seed=seed).wait(progress=False)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    assert infer(srv, "multi", x).version == 2
    # Pinning v1 widens the default `latest = 1` policy so that v1 is served, and wins.
    info = conv.set_default_version("multi", 1)
    assert info.default_version == 1
    assert {v.version: v.state for v in info.versions} == {1: "READY", 2: "READY"}
    pinned = infer(srv, "multi", x)
    assert pinned.version == 1
    np.testing.assert_array_equal(pinned["logits"], infer(srv, "multi", x, version=1)["logits"])
    with pytest.raises(FailedPreconditionError, match="default_version"):
        conv.delete_version("multi", 1)
    conv.delete_version("multi", 2)
    assert [v.version for v in conv.get_model("multi").versions] == [1]
    with pytest.raises(ModelNotFoundError):
        infer(srv, "multi", x, version=2)
    assert conv.set_default_version("multi", None).default_version == 1
    assert not (tmp_path / "repo" / "multi" / "2").exists()
    with pytest.raises(ModelNotFoundError):
        conv.delete_version("multi", 7)
    with pytest.raises(ModelNotFoundError):
        conv.get_model("nosuch")


def test_converting_into_a_hand_made_model_adds_a_version(start: Start, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "plain", mlp_model(sizes=(8, 16, 4), seed=9))
    srv, conv = start()
    job = convert_fake(conv, "plain", "ok").wait(progress=False)
    assert job.version == 2
    info = conv.get_model("plain")
    assert [(v.version, v.job_id, v.report is None) for v in info.versions] == [
        (1, "", True),
        (2, job.id, False),
    ]
    assert infer(srv, "plain", np.zeros((1, 8), np.float32)).version == 2


def test_set_default_edits_a_toml_config_in_place(start: Start, tmp_path: Path) -> None:
    srv, conv = start()
    for seed in (1, 2):
        convert_fake(conv, "toml", "ok", seed=seed).wait(progress=False)
    config = tmp_path / "repo" / "toml" / "config.toml"
    config.write_text(
        "# keep me\nversion_policy = { all = true }\n\n[batching]\nmax_queue_size = 7\n"
    )
    conv.set_default_version("toml", 1)
    text = config.read_text()
    assert text.startswith("# keep me\n") and "default_version = 1\n" in text
    assert "max_queue_size = 7" in text
    assert infer(srv, "toml", np.zeros((1, 8), np.float32)).version == 1


# ---- the real child (torch) ----
REAL_CHILD = Path(uploads_module.__file__).parent / "worker" / "child.py"
MLP_KWARGS = {"in_features": 16, "hidden": [32], "out_features": 4}
# A process started ahead imports torch and primes the exporter: seconds alone, over the
# helpers' 20 s (WAIT_S) on a loaded 2-core box. A bound that only catches one that never gets ready.
WARM_UP_S = 180.0


def _mlp(seed: int = 0) -> Any:
    torch = pytest.importorskip("torch")
    from ferry.server.convert.worker import nets

    torch.manual_seed(seed)
    return nets.mlp(**MLP_KWARGS).eval(), torch.randn(
        6, 16, generator=torch.Generator().manual_seed(1)
    )


def _expected(module: Any, x: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.asarray(module(x).numpy())


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_state_dict_module_converts_and_serves(start: Start, tmp_path: Path) -> None:
    srv, conv = start(fake=False)
    module, x = _mlp()
    up = conv.upload(
        "sd", module, architecture="mlp", architecture_kwargs=MLP_KWARGS, example_inputs=x
    )
    assert up.format == "state_dict" and up.inputs[0].shape == [-1, 16]
    job = conv.convert(up)  # inputs, samples and the module's own outputs travel with the upload
    stages = [e.stage for e in job.events()]
    assert stages.index("load") < stages.index("export") < stages.index("publish")
    done = job.wait(progress=False)
    assert done.version == 1 and done.report is not None
    assert done.report.source_format == "state_dict" and done.report.published == "fp32"
    got = infer(srv, "sd", x.numpy())["output"]
    np.testing.assert_allclose(got, _expected(module, x), rtol=1e-4, atol=1e-5)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_module_exported_locally_uploads_as_onnx(start: Start) -> None:
    srv, conv = start(fake=False)
    module, x = _mlp(seed=3)
    up = conv.upload("local", module, example_inputs=x)
    assert up.format == "onnx" and up.reference_outputs is not None
    done = conv.convert(up).wait(progress=False)
    assert done.report is not None and done.report.parity is not None
    got = infer(srv, "local", x.numpy()[:1])["output"]
    np.testing.assert_allclose(got, _expected(module, x)[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_a_module_of_any_class_is_pruned_on_its_graph(start: Start, tmp_path: Path) -> None:
    """Issue #13 item 4: no architecture on the server, the SDK exports ONNX, and the server
    prunes the graph; the budget and the report's parity are against the module's own outputs."""
    import onnx
    import torch

    srv, conv = start(fake=False)
    torch.manual_seed(8)
    module = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).eval()
    with torch.no_grad():  # half of the hidden units barely matter: 50% stays within budget
        module[0].weight[:16] *= 1e-3
        module[0].bias[:16] *= 1e-3
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    up = conv.upload("anyclass", module, example_inputs=x)
    assert up.format == "onnx" and up.reference_outputs is not None
    done = conv.convert(up, pruning=Pruning("structured", 0.5)).wait(progress=False)
    report = done.report
    assert report is not None and report.pruning is not None and report.parity is not None
    assert report.pruning.method == "structured" and not report.pruning.fine_tuned
    assert report.pruning.params_after < report.pruning.params_before
    assert "1 of 2 weight layers pruned (32 -> 16 hidden channels)" in report.raw["pruning"]["note"]
    assert report.parity.against == "pytorch (reference_outputs)"  # the unpruned PyTorch model
    assert report.pruning.vs_unpruned is not None and report.pruning.vs_unpruned.cosine > 0.999
    served = onnx.load(str(tmp_path / "repo" / "anyclass" / str(done.version) / "model.onnx"))
    assert sorted(list(t.dims) for t in served.graph.initializer if len(t.dims) == 2) in (
        [[4, 16], [16, 16]],
        [[16, 4], [16, 16]],
    )
    got, want = infer(srv, "anyclass", x.numpy())["output"].ravel(), _expected(module, x).ravel()
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) > 0.999
    # Removing loud units too breaks the budget: refused, saying which figure and what to do.
    job = conv.convert(up, pruning=Pruning("structured", 0.9))
    with pytest.raises(JobFailedError) as info:
        job.wait(progress=False)
    err = info.value
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    for phrase in (
        "structured pruning at amount 0.9",
        "against the PyTorch model's reference outputs",
        "< min_cosine 0.99",
        "use a smaller pruning.amount",
    ):
        assert phrase in str(err), str(err)
    assert infer(srv, "anyclass", x.numpy())["output"].shape == (6, 4)  # version 1 still serves


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_safetensors_with_dynamic_int8(start: Start) -> None:
    from safetensors.torch import save

    srv, conv = start(fake=False)
    module, x = _mlp(seed=4)
    data = save({k: v.contiguous() for k, v in module.state_dict().items()})
    up = conv.upload(
        "st", data, format="safetensors", architecture="mlp", architecture_kwargs=MLP_KWARGS
    )
    # keep_slower: on a model this small int8 may well be slower than fp32, which without it
    # fails the job (tests/unit/test_conversion_trust.py holds that rule).
    quantization = Quantization(mode="dynamic_int8", keep_slower=True)
    done = conv.convert(up, inputs=[("input", "FP32", [-1, 16])], quantization=quantization).wait(
        progress=False
    )
    assert done.report is not None and done.report.published == "dynamic_int8"
    # The job's one line: what was published, its speed against fp32, its accuracy.
    assert done.message.startswith(f"published as st version {done.version}: dynamic_int8, ")
    assert "fp32" in done.message and "cosine" in done.message and "\n" not in done.message
    variant = done.report.variant("dynamic_int8")
    assert variant is not None and variant.vs_fp32 is not None and variant.vs_fp32.cosine > 0.99
    got, want = infer(srv, "st", x.numpy())["output"].ravel(), _expected(module, x).ravel()
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) > 0.95  # int8


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_code_formats_convert_when_allowed(start: Start, tmp_path: Path) -> None:
    import torch

    srv, conv = start(fake=False, allow_code_formats=True)
    module, x = _mlp(seed=5)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "m.pt2")
    torch.jit.save(torch.jit.trace(module, x), tmp_path / "m.ts")
    expected = _expected(module, x)
    pt2 = conv.convert(conv.upload("prog", tmp_path / "m.pt2")).wait(progress=False)
    assert pt2.report is not None and pt2.report.source_format == "exported_program"
    np.testing.assert_allclose(
        infer(srv, "prog", x.numpy())["output"], expected, rtol=1e-4, atol=1e-5
    )
    ts_up = conv.upload("script", tmp_path / "m.ts", format="torchscript")
    conv.convert(ts_up, inputs=[("input", "FP32", [-1, 16])]).wait(progress=False)
    np.testing.assert_allclose(
        infer(srv, "script", x.numpy())["output"], expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_pickle_payload_in_a_state_dict_never_runs(start: Start, tmp_path: Path) -> None:
    import torch

    _, conv = start(fake=False)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"0.weight": _CreatesFile(marker)}, buffer)
    up = conv.upload("evil", buffer.getvalue(), format="state_dict", architecture="seed")
    with pytest.raises(JobFailedError) as info:
        conv.convert(up).wait(progress=False)
    assert info.value.job.stage == "load"
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "safetensors" in info.value.message and "ONNX" in info.value.message  # what to do
    assert not marker.exists()
    assert not (tmp_path / "repo" / "evil").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_killing_the_child_mid_export_leaves_nothing(start: Start, tmp_path: Path) -> None:
    _, conv = start(fake=False)
    module, x = _mlp()
    job = conv.convert(
        conv.upload(
            "cut", module, architecture="mlp", architecture_kwargs=MLP_KWARGS, example_inputs=x
        )
    )
    for event in job.events():
        if event.stage == "export":
            break
    cancelled = job.cancel()
    assert cancelled.state == "CANCELLED" and cancelled.version is None
    assert not (tmp_path / "repo" / "cut").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_over_pruning_misses_the_accuracy_budget(start: Start, tmp_path: Path) -> None:
    from ferry.client import Validation

    _, conv = start(fake=False)
    module, x = _mlp(seed=6)
    up = conv.upload(
        "pruned", module, architecture="mlp", architecture_kwargs=MLP_KWARGS, example_inputs=x
    )
    job = conv.convert(
        up, pruning=Pruning("l1_unstructured", 0.9), validation=Validation(min_cosine=0.999)
    )
    with pytest.raises(JobFailedError, match="accuracy budget") as info:
        job.wait(progress=False)
    err = info.value
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    assert err.report is not None and err.report.pruning is not None
    figures = err.report.pruning.vs_unpruned
    assert figures is not None and figures.cosine < 0.999
    assert not (tmp_path / "repo" / "pruned").exists()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_a_server_stopping_during_the_warm_up_leaves_no_folder(start: Start) -> None:
    """A process started ahead and killed with the server, warmed up or not: its warm-up
    folder goes with it (a kill is a signal; the process cannot clean up after itself)."""
    srv, conv = start(fake=False, warm_conversion_child=True)
    assert srv.app is not None
    runner = srv.app.conversion.runner
    module, x = _mlp(seed=6)
    conv.convert(conv.upload("warm", module, example_inputs=x)).wait(progress=False)
    wait_for(lambda: runner._warm is not None, "a conversion process started ahead")
    assert runner._warm is not None
    scratch = runner._warm.scratch
    srv.stop()
    assert not scratch.exists()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_the_next_job_runs_in_a_process_started_ahead(start: Start, tmp_path: Path) -> None:
    """After a job, a conversion process is started ahead (torch imported, exporter primed):
    the next job runs in it, converts as a fresh one would, and a new one is started after."""
    srv, conv = start(fake=False, warm_conversion_child=True)
    assert srv.app is not None
    runner = srv.app.conversion.runner
    module, x = _mlp(seed=5)
    first = conv.convert(conv.upload("warm", module, example_inputs=x)).wait(progress=False)
    assert first.version == 1
    wait_for(
        lambda: runner._warm is not None and runner._warm.ready.exists(),
        "a conversion process started ahead and warmed up",
        timeout=WARM_UP_S,
    )
    assert runner._warm is not None
    # Its warm-up folder is gone once it is ready: a warm process ends by a signal, which no
    # exit handler sees (one folder per server start was left in the temporary directory).
    assert not runner._warm.scratch.exists()
    ahead = runner._warm.proc.pid
    second = conv.convert(conv.upload("warm", module, example_inputs=x)).wait(progress=False)
    assert second.version == 2 and second.report is not None
    assert second.report.parity is not None
    np.testing.assert_allclose(
        infer(srv, "warm", x.numpy()[:1])["output"], _expected(module, x)[:1], rtol=1e-4, atol=1e-5
    )
    wait_for(
        lambda: runner._warm is not None and runner._warm.proc.pid != ahead,
        "the next one",
        timeout=WARM_UP_S,
    )
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_masked_logits_are_judged_without_their_fill(start: Start, tmp_path: Path) -> None:
    """-inf masks made every cosine NaN: the model passed the budget, was published, and the
    job then failed INTERNAL on the null figure while the version served. A -1e9 mask let a
    90%-pruned classifier through with cosine 0.9999999999."""
    import torch

    class Masked(torch.nn.Module):
        def __init__(self, fill: float) -> None:
            super().__init__()
            self.fill = fill
            self.net = torch.nn.Sequential(
                torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
            )

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x).masked_fill(~mask, self.fill)
            return out

    srv, conv = start(fake=False)
    torch.manual_seed(0)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(16, 8, generator=torch.Generator().manual_seed(2)) > 0.2
    plain = Masked(float("-inf")).eval()
    done = conv.convert(conv.upload("inf", plain, example_inputs={"x": x, "mask": mask})).wait(
        progress=False
    )
    assert done.version == 1 and "cosine 1.000000 vs PyTorch" in done.message, done.message
    with InferenceClient(srv.target, timeout=60) as client:
        got = client.infer("inf", {"x": x.numpy(), "mask": mask.numpy()})["output"]
    with torch.no_grad():
        want = plain(x, mask).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # -inf where masked, as torch
    big = Masked(-1e9).eval()
    big.net.load_state_dict(plain.net.state_dict())
    up = conv.upload("big", big, example_inputs={"x": x, "mask": mask})
    with pytest.raises(JobFailedError, match="below the accuracy budget") as info:
        conv.convert(up, pruning=Pruning("l1_unstructured", 0.9)).wait(progress=False)
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert not (tmp_path / "repo" / "big").exists()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CHILD.exists(), reason="the conversion child is not there yet")
def test_a_graph_fixed_to_the_examples_dim_0_is_refused(start: Start, tmp_path: Path) -> None:
    """A seq-first LSTM (dim 0 is time) was published with a symbolic dim 0 and a Reshape fixed
    to the example's 4: every request of another length failed with INTERNAL."""
    import torch

    class SeqFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.rnn(x)[0]
            return out

    _, conv = start(fake=False)
    torch.manual_seed(0)
    up = conv.upload("lstm", SeqFirst().eval(), example_inputs=torch.randn(4, 3, 6))
    with pytest.raises(JobFailedError, match="symbolic batch that is dim 0") as info:
        conv.convert(up).wait(progress=False)
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "seq-first RNN" in str(info.value)
    assert not (tmp_path / "repo" / "lstm").exists()
