"""Faults: SIGKILL, broken model files, clients that vanish, a full disk.

Nothing here sleeps to synchronise: states are established (an execution gate holds a model,
a publisher is seen to have published) and waits are bounded polls of a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from helpers import ExecutionGate, make_repo, wait_for, write_config
from sechelpers import ServerProcess
from serverutil import ServerThread

from ferry.client import InferenceClient, RetryPolicy
from ferry.client._requests import build_infer_request
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import model_conversion_pb2 as cpb
from ferry.proto.v1 import model_conversion_pb2_grpc as cpb_grpc
from ferry.server.core import repository as repository_module
from ferry.server.core.repository import MODEL_FILE, TMP_PREFIX, ModelRepository
from ferry.server.errors import ErrorKind, LimitExceeded
from ferry.server.examples import mlp_model, write_model

ONE = {"input": np.ones((1, 64), np.float32)}

# Publishes new versions of "mlp" as fast as it can until killed: the SIGKILL lands anywhere
# in staging, writing, fsync or rename.
PUBLISHER = """
import sys, onnx
from ferry.server.core.repository import ModelRepository, MODEL_FILE
from ferry.server.examples import mlp_model
repo = ModelRepository(sys.argv[1])
data = mlp_model(seed=1).SerializeToString()
while True:
    with repo.staging("mlp") as tmp:
        (tmp / MODEL_FILE).write_bytes(data)
        repo.publish("mlp", tmp)
"""


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_sigkill_under_load_leaves_a_consistent_repository(
    tmp_path: Path, server_process: type[ServerProcess]
) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"version_policy": {"all": True}})
    srv = server_process(root).start()
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(root)])
    stop = threading.Event()
    answered = [0]

    def load() -> None:
        with InferenceClient(srv.target, timeout=10, retry=RetryPolicy.disabled()) as client:
            while not stop.is_set():
                try:
                    client.infer("mlp", ONE)
                    answered[0] += 1
                except Exception:
                    if srv.proc is not None and srv.proc.poll() is not None:
                        return  # the server is gone: what this test does to it

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        repo = ModelRepository(root, create=False)
        wait_for(lambda: answered[0] >= 20, "inference answers under load")
        wait_for(lambda: len(repo.list_versions("mlp")) >= 4, "the publisher to publish")
    finally:
        srv.kill()
        publisher.kill()
        publisher.wait(30)
        stop.set()
        loader.join(30)
    versions = repo.list_versions("mlp")
    for v in versions:  # a version folder is complete or absent, never partial
        onnx.checker.check_model(onnx.load(str(repo.model_file("mlp", v))))
    # Whatever the kill interrupted, one interrupted write is certain from here on.
    planted = root / "mlp" / f"{TMP_PREFIX}planted"
    planted.mkdir()
    (planted / MODEL_FILE).write_bytes(mlp_model().SerializeToString()[:1000])
    restarted = server_process(root).start()
    assert temporaries(root) == []  # what the killed publisher left was cleaned at start
    with InferenceClient(restarted.target, timeout=30) as client:
        states = {m.version: m.state for m in client.list_models("mlp")}
        assert states == dict.fromkeys(versions, "READY")
        for v in versions:
            assert client.infer("mlp", ONE, version=v)["logits"].shape == (1, 10)


def test_truncated_model_fails_alone(tmp_path: Path) -> None:
    """Random bytes are covered by tests/integration; a file cut short is the other corruption."""
    root = make_repo(tmp_path / "repo", {"mlp": [mlp_model(), mlp_model(seed=2)]})
    write_config(root, "mlp", {"version_policy": {"all": True}})
    data = (root / "mlp" / "2" / MODEL_FILE).read_bytes()
    (root / "mlp" / "2" / MODEL_FILE).write_bytes(data[: len(data) // 2])
    (root / "cut" / "1").mkdir(parents=True)
    (root / "cut" / "1" / MODEL_FILE).write_bytes(data[:100])
    with (
        ServerThread(root) as srv,
        InferenceClient(srv.target, timeout=30, retry=RetryPolicy.disabled()) as client,
    ):
        status = {(m.name, m.version): m for m in client.list_models()}
        assert {k: m.state for k, m in status.items()} == {
            ("cut", 1): "FAILED",
            ("mlp", 1): "READY",
            ("mlp", 2): "FAILED",
        }
        assert status[("mlp", 2)].reason and status[("cut", 1)].reason
        assert client.infer("mlp", ONE, version=1)["logits"].shape == (1, 10)


async def _tasks() -> int:
    return len(asyncio.all_tasks())


def test_cancelled_streams_leak_no_tasks_and_never_run_queued_work(tmp_path: Path) -> None:
    """A client cancels an InferStream while one request executes and others are queued: the
    queued ones leave the queue without running, the executing one finishes, and the server's
    loop is back to the tasks it had before. Five rounds, so a leak would show as growth."""
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"batching": {"max_batch_size": 0}})
    before_tree = sorted(str(p) for p in root.rglob("*"))
    with ServerThread(root) as srv, grpc.insecure_channel(srv.target) as channel:
        assert srv.app is not None
        batcher = srv.app.registry.get("mlp", 1).batcher
        stream = channel.stream_stream(
            "/ferry.v1.Inference/InferStream",
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferStreamResponse.FromString,
        )
        baseline = srv.call(_tasks)
        for _round in range(5):
            gate = ExecutionGate(srv, "mlp")
            requests = [build_infer_request("mlp", ONE, request_id=str(i)) for i in range(6)]
            call = stream(iter(requests), timeout=60)
            gate.wait_entered()
            wait_for(lambda: batcher.queue_depth == 5, "five requests queued behind the gate")
            call.cancel()
            wait_for(lambda: batcher.queue_depth == 0, "the cancelled requests to leave the queue")
            gate.release()
            wait_for(lambda: batcher.in_flight == 0, "the executing request to finish")
            wait_for(lambda: srv.call(_tasks) <= baseline, "the stream's tasks to end")
            assert gate.calls == 1  # the queued requests never ran
            _ungate(gate)
    assert sorted(str(p) for p in root.rglob("*")) == before_tree


def _ungate(gate: ExecutionGate) -> None:
    """Put the original run back, so the next round's gate wraps the real session."""
    del gate.session.run  # the gate set an instance attribute over the class method


def test_disconnect_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    with ServerThread(root) as srv, grpc.insecure_channel(srv.management_target) as channel:
        assert srv.app is not None
        uploads = srv.app.conversion.state_dir.resolve() / "uploads"
        baseline = srv.call(_tasks)
        sent = threading.Event()
        hold = threading.Event()

        def messages() -> object:
            yield cpb.UploadModelRequest(
                header=cpb.UploadHeader(
                    model="m", format=cpb.SOURCE_FORMAT_ONNX, size_bytes=1 << 20
                )
            )
            yield cpb.UploadModelRequest(chunk=bytes(64 * 1024))
            sent.set()
            hold.wait(30)

        future = cpb_grpc.ModelConversionStub(channel).UploadModel.future(messages(), timeout=60)
        assert sent.wait(30)
        wait_for(lambda: any(uploads.iterdir()), "the partial upload file")
        future.cancel()
        hold.set()
        wait_for(lambda: not any(uploads.iterdir()), "the partial upload to be removed")
        wait_for(lambda: srv.call(_tasks) <= baseline, "the upload's tasks to end")
        with pytest.raises(grpc.FutureCancelledError):
            future.result()


def test_an_upload_that_stops_arriving_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stopped sending mid-upload (or vanished without closing its connection)
    held the partial file for as long as gRPC kept the stream. The bound is shortened so the
    test waits on it; nothing here measures time."""

    def messages(stop: threading.Event) -> Iterator[cpb.UploadModelRequest]:
        yield cpb.UploadModelRequest(chunk=bytes(64 * 1024))
        stop.wait(60)  # and nothing more, the stream left open

    details = _slow_upload_refused(tmp_path, monkeypatch, messages)
    assert "no message for 0.5 seconds after 65536 bytes" in details


def test_an_upload_trickling_empty_chunks_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause bound alone let a client that kept sending empty (or one-byte) chunks hold its
    stream and partial file for ever; an upload must average UPLOAD_MIN_RATE after its first
    UPLOAD_IDLE seconds. The bound is shortened so the test waits on it; nothing here measures
    time."""

    def messages(stop: threading.Event) -> Iterator[cpb.UploadModelRequest]:
        yield cpb.UploadModelRequest(chunk=b"\x08")
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end:  # never a pause of 0.5 s
            yield cpb.UploadModelRequest(chunk=b"")

    details = _slow_upload_refused(tmp_path, monkeypatch, messages)
    assert "arrived too slowly: 1 bytes in" in details


def _slow_upload_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunks: Callable[[threading.Event], Iterator[cpb.UploadModelRequest]],
) -> str:
    """Send an ONNX upload's header, then ``chunks(stop)`` (``stop`` is set once the call has
    ended), to a server whose UPLOAD_IDLE is 0.5 s; check that the upload was refused with
    DEADLINE_EXCEEDED and its partial file removed, and return the refusal's details."""
    from ferry.server.grpc import conversion

    monkeypatch.setattr(conversion, "UPLOAD_IDLE", 0.5)
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    with ServerThread(root) as srv, grpc.insecure_channel(srv.management_target) as channel:
        assert srv.app is not None
        uploads = srv.app.conversion.state_dir.resolve() / "uploads"
        stop = threading.Event()

        def messages() -> Iterator[cpb.UploadModelRequest]:
            yield cpb.UploadModelRequest(
                header=cpb.UploadHeader(model="m", format=cpb.SOURCE_FORMAT_ONNX)
            )
            yield from chunks(stop)

        try:
            with pytest.raises(grpc.RpcError) as info:
                cpb_grpc.ModelConversionStub(channel).UploadModel(messages(), timeout=60)
        finally:
            stop.set()
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        wait_for(lambda: not any(uploads.iterdir()), "the partial upload to be removed")
    return info.value.details() or ""


class _DiskFull:
    """Raise ENOSPC from the n-th write on: the disk fills up part-way through."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, *args: object, **kwargs: object) -> None:
        self.after -= 1
        if self.after < 0:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_version(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "mlp", mlp_model())
    data = mlp_model(seed=3).SerializeToString()
    full = _DiskFull(after=1)
    with pytest.raises(OSError) as info, repo.staging("mlp") as staged:
        with open(staged / MODEL_FILE, "wb") as fh:
            for start in range(0, len(data), 4096):
                full()
                fh.write(data[start : start + 4096])
        repo.publish("mlp", staged)
    assert info.value.errno == errno.ENOSPC
    assert repo.list_versions("mlp") == [1]
    assert temporaries(repo.root) == []


def test_disk_full_at_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync is where a full disk reports delayed-allocation writes: the version must not
    appear, and the staging folder must go."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "mlp", mlp_model())
    monkeypatch.setattr(repository_module, "_fsync_tree", _DiskFull(after=0))
    with pytest.raises(OSError) as info, repo.staging("mlp") as staged:
        (staged / MODEL_FILE).write_bytes(mlp_model(seed=4).SerializeToString())
        repo.publish("mlp", staged)
    assert info.value.errno == errno.ENOSPC
    assert repo.list_versions("mlp") == [1]
    assert temporaries(repo.root) == []


def test_disk_full_during_a_conversion_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion's publish step (serving config, load check, rename) on a full disk: the
    job's error says the disk is full (RESOURCE_EXHAUSTED, not INTERNAL), and neither a version
    nor a temporary is left."""
    from ferry.server.convert import publish
    from ferry.server.core.registry import ModelRegistry
    from ferry.server.runtime.session import open_session

    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "mlp", mlp_model())
    registry = ModelRegistry(repo, open_session, warm_up=False)
    real_open = open

    class FullFile:
        """The file opens; its first write finds the disk full."""

        def __init__(self, fh: Any) -> None:
            self._fh = fh

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self) -> FullFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._fh.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fh, name)

    def failing_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(path, mode, *args, **kwargs)
        return FullFile(fh) if "w" in mode or "x" in mode else fh

    # raising=False: open is the builtin, found through the module's globals once set there.
    monkeypatch.setattr(repository_module, "open", failing_open, raising=False)

    async def job() -> None:
        with repo.staging("mlp") as staged:
            (staged / MODEL_FILE).write_bytes(mlp_model(seed=5).SerializeToString())
            await publish.publish(repo, registry, "mlp", staged, {"max_batch_size": 8})

    with pytest.raises(LimitExceeded, match="disk is full") as info:
        asyncio.run(job())
    assert info.value.kind is ErrorKind.LIMIT_EXCEEDED  # RESOURCE_EXHAUSTED, not INTERNAL
    assert repo.list_versions("mlp") == [1]
    assert temporaries(repo.root) == []


# Installed through PYTHONPATH into the server's environment, which the conversion child
# inherits (its name is not one child_env keeps back): the child (and only it: its argv has --job) records its pid and blocks, so "the server
# dies during a conversion" is a state the test establishes, not a race it hopes to win.
HOLD_CHILD = """
import os, sys, threading
if "--job" in sys.argv and "--progress-fd" in sys.argv and sys.argv[0] != "-c":  # not the launcher
    with open(os.environ["HOLD_CHILD_PID_FILE"] + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.rename(os.environ["HOLD_CHILD_PID_FILE"] + ".tmp", os.environ["HOLD_CHILD_PID_FILE"])
    threading.Event().wait()
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_sigkill_during_a_conversion(tmp_path: Path, server_process: type[ServerProcess]) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_CHILD)
    pid_file = tmp_path / "child.pid"
    env = {"PYTHONPATH": str(hook), "HOLD_CHILD_PID_FILE": str(pid_file)}
    srv = server_process(root, management=True, env=env).start()
    with grpc.insecure_channel(srv.management_target) as channel:
        stub = cpb_grpc.ModelConversionStub(channel)
        header = cpb.UploadHeader(model="mlp", format=cpb.SOURCE_FORMAT_ONNX)
        chunk = mlp_model(seed=9).SerializeToString()
        upload = stub.UploadModel(
            iter([cpb.UploadModelRequest(header=header), cpb.UploadModelRequest(chunk=chunk)]),
            timeout=60,
        )
        job = stub.Convert(cpb.ConvertRequest(upload_id=upload.upload_id), timeout=60)
    child = 0
    try:
        wait_for(pid_file.exists, "the conversion child to start", timeout=60)
        child = int(pid_file.read_text())
        assert temporaries(root / "mlp"), "the running job has a staging folder"
        srv.kill()
        # The launcher set PR_SET_PDEATHSIG: the kernel ends the child with the server.
        wait_for(lambda: not _running(child), "the orphaned child to be killed", timeout=30)
    finally:
        if child:  # never leave a child behind, whatever failed above
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
    restarted = server_process(root, management=True).start()
    with grpc.insecure_channel(restarted.management_target) as channel:
        after = cpb_grpc.ModelConversionStub(channel).GetJob(
            cpb.GetJobRequest(job_id=job.job_id), timeout=30
        )
    assert after.state == cpb.JOB_STATE_FAILED
    assert after.error.message, "the interrupted job says why it failed"
    assert temporaries(root) == []
    assert ModelRepository(root, create=False).list_versions("mlp") == [1]
    jobs = Path(f"{root}.ferry") / "jobs"
    assert not jobs.exists() or list(jobs.iterdir()) == []
