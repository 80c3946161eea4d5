"""Uploads stay bounded: streamed in chunks, checked outside the serving process under the
conversion memory limit, removed by the retention rule, and out of memory is reported as the
limit it is (RESOURCE_EXHAUSTED naming the setting), never as a corrupt file.

Memory figures are the benchmark's (bench/upload_memory.py); these tests assert behaviour only.
The conversion jobs run a stand-in child (same contract as the real one) except where the real
child's own mapping of an allocation failure is the point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from helpers import wait_for
from onnx import TensorProto
from serverutil import ConversionServers, ServerThread

from ferry.client import (
    ConversionClient,
    InvalidInputError,
    JobFailedError,
    JobNotFoundError,
    LimitExceededError,
)
from ferry.server.convert import upload_check
from ferry.server.examples import large_model, mlp_model

# Blocks until killed, or kills itself the way the kernel's out-of-memory killer would.
FAKE_CHILD = r"""
import json, os, signal, sys, time
args = sys.argv[1:]
job = json.load(open(args[args.index("--job") + 1]))
out = os.fdopen(int(args[args.index("--progress-fd") + 1]), "w")
out.write(json.dumps({"stage": "load", "fraction": 0.0, "message": "loading",
                      "error_kind": ""}) + "\n")
out.flush()
if job["architecture_kwargs"].get("fake") == "oomkill":
    os.kill(os.getpid(), signal.SIGKILL)
while True:
    time.sleep(3600)
"""

Start = Callable[..., tuple[ServerThread, ConversionClient]]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    child = tmp_path / "fake_child.py"
    child.write_text(FAKE_CHILD)
    servers = ConversionServers(tmp_path / "repo", child_command=[sys.executable, str(child)])
    yield servers.start
    servers.close()


def uploads_dir(tmp_path: Path) -> Path:
    return tmp_path / "repo.ferry" / "uploads"


def tiny(seed: int) -> bytes:
    return mlp_model(sizes=(8, 16, 4), seed=seed).SerializeToString()


def big_onnx(path: Path, mb: int) -> Path:
    """A valid model whose one initializer holds nearly all of its ``mb`` MiB."""
    onnx.save(large_model(mb), str(path))
    return path


def vm_size_after_imports(*modules: str) -> int:
    """The address space a fresh interpreter holds once ``modules`` are imported: the floor a
    memory limit must clear before a model is read at all."""
    code = (
        f"import {', '.join(modules)}\n"
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
        "if l.startswith('VmSize:')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


# ---- retention ----
def test_retention_removes_the_oldest_unused_uploads_and_never_one_in_use(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = len(tiny(0))
    assert all(len(tiny(s)) == size for s in range(4))
    _, conv = start(upload_retention_bytes=size * 5 // 2)  # room for two uploads
    busy = conv.upload("m", tiny(0), format="onnx", architecture_kwargs={"fake": "block"})
    job = conv.convert(busy)  # runs (blocks) until cancelled: its upload is in use
    older = conv.upload("m", tiny(1), format="onnx")
    with caplog.at_level(logging.WARNING, logger="ferry.convert"):
        newest = conv.upload("m", tiny(2), format="onnx")  # three kept: one must go
    said = [r.getMessage() for r in caplog.records if "retention rule" in r.getMessage()]
    assert len(said) == 1 and older.upload_id in said[0] and f"({size} bytes)" in said[0]
    ids = [u.upload_id for u in conv.list_uploads()]
    assert ids == [newest.upload_id, busy.upload_id], "the oldest one not in use went"
    assert not (uploads_dir(tmp_path) / f"{older.upload_id}.onnx").exists()
    assert (uploads_dir(tmp_path) / f"{busy.upload_id}.onnx").exists()

    with pytest.raises(JobNotFoundError) as info:
        conv.convert(older)
    err = info.value
    assert err.code is grpc.StatusCode.NOT_FOUND and err.kind == "UPLOAD_NOT_FOUND"
    assert older.upload_id in err.message
    assert "removed by the upload retention rule" in err.message
    assert f"over --upload-retention-bytes {size * 5 // 2}" in err.message
    assert "raise --upload-retention-bytes" in err.message

    assert job.cancel().state == "CANCELLED"  # no longer in use: now the oldest goes
    last = conv.upload("m", tiny(3), format="onnx")
    assert [u.upload_id for u in conv.list_uploads()] == [last.upload_id, newest.upload_id]
    assert sorted(p.name for p in uploads_dir(tmp_path).iterdir()) == sorted(
        f"{u.upload_id}.onnx" for u in (last, newest)
    )


def test_retention_by_age_applies_at_start(start: Start, tmp_path: Path) -> None:
    srv, conv = start(upload_retention_seconds=0)
    old = conv.upload("m", tiny(0), format="onnx")
    recent = conv.upload("m", tiny(1), format="onnx")
    conv.close()
    srv.stop()
    with sqlite3.connect(tmp_path / "repo.ferry" / "state.sqlite3") as db:  # a week ago
        db.execute(
            "UPDATE uploads SET created_ms = created_ms - ? WHERE upload_id = ?",
            (7 * 86400 * 1000, old.upload_id),
        )
    _, conv = start(upload_retention_seconds=86400)
    assert [u.upload_id for u in conv.list_uploads()] == [recent.upload_id]
    assert not (uploads_dir(tmp_path) / f"{old.upload_id}.onnx").exists()
    with pytest.raises(JobNotFoundError, match="over --upload-retention-seconds 86400"):
        conv.convert(old.upload_id)


def test_an_upload_past_its_age_is_not_converted_on_a_server_that_took_no_upload_since(
    start: Start, tmp_path: Path
) -> None:
    """The age rule ran only at an upload and at a start: on a server that took no upload
    since, an upload past --upload-retention-seconds was still converted and kept on disk."""
    _, conv = start(upload_retention_seconds=86400)
    old = conv.upload("m", tiny(0), format="onnx")
    with sqlite3.connect(tmp_path / "repo.ferry" / "state.sqlite3") as db:  # a week ago
        db.execute(
            "UPDATE uploads SET created_ms = created_ms - ? WHERE upload_id = ?",
            (7 * 86400 * 1000, old.upload_id),
        )
    with pytest.raises(JobNotFoundError, match="over --upload-retention-seconds 86400") as info:
        conv.convert(old.upload_id)
    assert info.value.kind == "UPLOAD_NOT_FOUND"
    assert not (uploads_dir(tmp_path) / f"{old.upload_id}.onnx").exists()
    assert conv.list_uploads() == []


def test_retention_removes_an_archive_uploads_folder(start: Start, tmp_path: Path) -> None:
    """An onnx_archive upload is a folder (model.onnx and its data): the rule removes it whole."""
    model = mlp_model(sizes=(8, 16, 4), seed=0)
    (tmp_path / "src").mkdir()
    onnx.save_model(
        model,
        str(tmp_path / "src" / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    _, conv = start(upload_retention_bytes=1)  # every upload but the newest goes
    archive = conv.upload("big", tmp_path / "src")
    assert archive.format == "onnx_archive"
    assert (uploads_dir(tmp_path) / archive.upload_id).is_dir()
    newest = conv.upload("m", tiny(1), format="onnx")
    assert [u.upload_id for u in conv.list_uploads()] == [newest.upload_id]
    assert sorted(p.name for p in uploads_dir(tmp_path).iterdir()) == [f"{newest.upload_id}.onnx"]


def test_an_upload_stored_is_answered_when_the_retention_rule_cannot_write(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule runs after the upload is stored: a database refusing its write (a full disk)
    answered the stored upload INTERNAL, and its client uploaded it again."""
    srv, conv = start(upload_retention_bytes=1)
    assert srv.app is not None
    old = conv.upload("m", tiny(0), format="onnx")

    def full(*_: object) -> bool:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise exc

    monkeypatch.setattr(srv.app.conversion.store, "remove_by_retention", full)
    new = conv.upload("m", tiny(1), format="onnx")
    monkeypatch.undo()
    assert {u.upload_id for u in conv.list_uploads()} == {old.upload_id, new.upload_id}


def test_retention_off_keeps_everything(start: Start) -> None:
    size = len(tiny(0))
    _, conv = start(upload_retention_bytes=0, upload_retention_seconds=0)
    kept = [conv.upload("m", tiny(s), format="onnx") for s in range(3)]
    assert len(conv.list_uploads()) == 3
    assert sum(u.size_bytes for u in kept) == 3 * size


# ---- streaming ----
def test_a_path_upload_larger_than_a_message_streams_and_its_digest_matches(
    start: Start, tmp_path: Path
) -> None:
    path = big_onnx(tmp_path / "big.onnx", 6)
    limit = 2 << 20  # a message may hold 2 MiB: the file is three times that
    _, conv = start(max_message_bytes=limit)
    assert path.stat().st_size > 2 * limit
    up = conv.upload("big", path, chunk_size=1 << 20)
    data = path.read_bytes()
    assert (up.size_bytes, up.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (uploads_dir(tmp_path) / f"{up.upload_id}.onnx").read_bytes() == data
    view = memoryview(bytearray(data))  # a caller's buffer is sent as it is, not copied first
    again = conv.upload("big", view, format="onnx", chunk_size=1 << 20)
    assert again.sha256 == up.sha256


def test_a_large_upload_is_refused_by_its_check_process_as_precisely(
    start: Start, tmp_path: Path
) -> None:
    """Over IN_PROCESS_BYTES the check runs in a process of its own; what it refuses reaches the
    client with the same kind and message the in-process check gives."""
    _, conv = start()
    model = onnx.load(str(big_onnx(tmp_path / "big.onnx", 6)))
    stolen = TensorProto(name="stolen", data_type=TensorProto.FLOAT, dims=[4])
    stolen.data_location = TensorProto.EXTERNAL
    stolen.external_data.add(key="location", value="victim.safetensors")
    model.graph.initializer.append(stolen)
    with pytest.raises(InvalidInputError) as info:
        conv.upload("big", model.SerializeToString(), format="onnx")
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "initializer 'stolen'" in info.value.message
    assert "(file 'victim.safetensors')" in info.value.message
    garbage = np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidInputError, match="not an ONNX model"):
        conv.upload("big", garbage, format="onnx")
    assert list(uploads_dir(tmp_path).iterdir()) == []


# ---- out of memory ----
def test_an_onnx_upload_over_the_check_memory_limit_is_resource_exhausted(
    start: Start, tmp_path: Path
) -> None:
    """The upload's check parses the file in a process under --conversion-memory-bytes: a model
    that cannot be parsed within it is refused as that limit, never as a corrupt upload."""
    floor = vm_size_after_imports(
        "ferry.server.convert.upload_check", "ferry.server.convert.uploads", "onnx"
    )
    limit = floor + (24 << 20)  # the file is read whole, then parsed: about twice 24 MiB
    path = big_onnx(tmp_path / "big.onnx", 24)
    _, conv = start(conversion_memory_bytes=limit)
    with pytest.raises(LimitExceededError) as info:
        conv.upload("big", path)
    err = info.value
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and err.kind == "LIMIT_EXCEEDED"
    assert f"{limit} bytes" in err.message and "--conversion-memory-bytes" in err.message
    assert "corrupt" not in err.message and "truncated" not in err.message
    assert list(uploads_dir(tmp_path).iterdir()) == []  # nothing kept, no temporary either


def test_a_small_file_of_many_tiny_messages_is_checked_under_the_memory_limit(
    start: Start, tmp_path: Path
) -> None:
    """Bytes do not bound what a check costs, messages do: 1 MiB of empty nodes parses and walks
    to some 300 MiB. Checked in the serving process (no limit) it was accepted after a long
    stall there; under --conversion-memory-bytes it is refused as that limit."""
    floor = vm_size_after_imports(
        "ferry.server.convert.upload_check", "ferry.server.convert.uploads", "onnx"
    )
    limit = floor + (32 << 20)
    model = mlp_model(sizes=(8, 16, 4)).SerializeToString()
    nodes = b"\x0a\x00" * 500_000  # GraphProto.node (field 1): an empty NodeProto, two bytes
    size = len(nodes)
    length = bytearray()
    while True:  # the varint of the graph message's length
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    bomb = model + b"\x3a" + bytes(length) + nodes  # ModelProto.graph (field 7): merged in
    assert len(bomb) < 4 << 20
    _, conv = start(conversion_memory_bytes=limit)
    with pytest.raises(LimitExceededError) as info:
        conv.upload("bomb", bomb, format="onnx")
    assert "--conversion-memory-bytes" in info.value.message
    assert list(uploads_dir(tmp_path).iterdir()) == []


def test_an_archive_is_read_under_the_memory_limit(start: Start, tmp_path: Path) -> None:
    """tarfile reads each extended header whole (and parses it: three times its size): read in
    the serving process, a 300 MB pax header cost it 900 MB. The archive is read by the check
    process, under --conversion-memory-bytes, and such a header is refused as that limit."""
    import io
    import tarfile

    floor = vm_size_after_imports(
        "ferry.server.convert.upload_check", "ferry.server.convert.uploads", "onnx"
    )
    limit = floor + (32 << 20)
    body = b" comment=" + b"a" * (64 << 20) + b"\n"
    size = len(body) + len(str(len(body) + len(str(len(body)))))
    record = str(size).encode() + body
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(record)
    buffer = io.BytesIO()
    buffer.write(header.tobuf(format=tarfile.USTAR_FORMAT) + record + b"\0" * (-len(record) % 512))
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        data = tiny(0)
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    _, conv = start(conversion_memory_bytes=limit)
    with pytest.raises(LimitExceededError) as info_:
        conv.upload("big", buffer.getvalue(), format="onnx_archive")
    assert "--conversion-memory-bytes" in info_.value.message
    assert list(uploads_dir(tmp_path).iterdir()) == []


def test_a_conversion_killed_for_memory_is_resource_exhausted(start: Start) -> None:
    _, conv = start(conversion_memory_bytes=3 << 30)
    up = conv.upload("m", tiny(0), format="onnx", architecture_kwargs={"fake": "oomkill"})
    with pytest.raises(JobFailedError) as info:
        conv.convert(up).wait(progress=False)
    err = info.value
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and err.kind == "LIMIT_EXCEEDED"
    assert "SIGKILL" in err.message and "out-of-memory killer" in err.message
    assert f"{3 << 30} bytes" in err.message and "--conversion-memory-bytes" in err.message


# Runs the real child's entry (child.run) under an address-space limit set once everything it
# imports is imported, so the limit is the model's to exceed, whatever the interpreter holds.
REAL_CHILD_UNDER_LIMIT = r"""
import resource, sys
from ferry.server.convert.spec import job_from_json
from ferry.server.convert.worker import child, pipeline  # noqa: F401 (onnx, onnxruntime)
import onnx  # noqa: F401
job = job_from_json(open(sys.argv[1]).read())
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
limit = vm + int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
with open(sys.argv[2], "w") as progress:
    rc = child.run(job, child.Progress(progress))
print(limit)
sys.exit(rc)
"""


def test_the_conversion_child_reports_an_allocation_failure_as_the_limit(tmp_path: Path) -> None:
    """protobuf says 'Arena alloc failed' (a DecodeError), which the load stage used to call a
    corrupt or truncated file: the child reports the memory limit instead."""
    source = big_onnx(tmp_path / "big.onnx", 24)
    job = {
        "job_id": "j",
        "model": "m",
        "source_path": str(source),
        "source_format": "onnx",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "architecture": "",
        "architecture_kwargs": {},
        "spec": {},
        "work_dir": str(tmp_path / "work"),
        "allow_code_formats": False,
    }
    (tmp_path / "work").mkdir()
    (tmp_path / "job.json").write_text(json.dumps(job))
    progress = tmp_path / "progress.jsonl"
    script = [sys.executable, "-c", REAL_CHILD_UNDER_LIMIT]
    proc = subprocess.run(
        [*script, str(tmp_path / "job.json"), str(progress), str(24 << 20)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    limit = int(proc.stdout.strip().splitlines()[-1])
    last = json.loads(progress.read_text().splitlines()[-1])
    assert (last["stage"], last["error_kind"]) == ("load", "LIMIT_EXCEEDED"), last
    assert f"{limit} bytes" in last["message"] and "--conversion-memory-bytes" in last["message"]
    assert "corrupt" not in last["message"]
    assert not (tmp_path / "work" / "model.onnx").exists()


# The upload's check process, held at a gate until the test opens it.
GATED_CHECK = r"""
import os, sys, time
from pathlib import Path
gate = Path(sys.argv[1])
(gate / f"started-{os.getpid()}").touch()
while not (gate / "open").exists():
    time.sleep(0.01)
from ferry.server.convert.upload_check import main
sys.exit(main(sys.argv[2:]))
"""


def test_uploads_checked_together_run_no_more_check_processes_than_conversions(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each check process may grow to --conversion-memory-bytes: N uploads finishing together
    started N of them. They take turns, as many at once as --max-concurrent-conversions."""
    gate = tmp_path / "gate"
    gate.mkdir()
    script = tmp_path / "gated_check.py"
    script.write_text(GATED_CHECK)
    monkeypatch.setattr(upload_check, "COMMAND", [sys.executable, str(script), str(gate)])
    srv, conv = start(max_concurrent_conversions=1)
    assert srv.app is not None
    slots = srv.app.conversion.check_slots
    data = mlp_model(sizes=(64, 256, 10)).SerializeToString()
    assert len(data) > upload_check.IN_PROCESS_BYTES  # checked in a process of its own

    def started() -> int:
        return len(list(gate.glob("started-*")))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(conv.upload, f"m{i}", data, format="onnx") for i in range(3)]
        wait_for(lambda: slots.waiting == 2 and started() == 1, "one check running, two waiting")
        assert started() == 1
        (gate / "open").touch()
        done = [f.result(timeout=120) for f in futures]
    assert started() == 3 and slots.waiting == 0
    assert {u.sha256 for u in done} == {hashlib.sha256(data).hexdigest()}


# The upload's check process, writing the environment it was given before it checks.
ENV_CHECK = r"""
import json, os, sys
json.dump(dict(os.environ), open(sys.argv[1], "w"))
from ferry.server.convert.upload_check import main
sys.exit(main(sys.argv[2:]))
"""


def test_the_upload_check_process_is_not_given_the_servers_secrets(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check parses a client's file in a process of its own: it inherited the server's
    environment, the management token included. Secrets stay out; the rest still reaches it."""
    monkeypatch.setenv("FERRY_MANAGEMENT_TOKEN", "m-secret")
    monkeypatch.setenv("DB_PASSWORD", "db-secret")
    monkeypatch.setenv("SOME_PLAIN_SETTING", "kept")
    report = tmp_path / "check_env.json"
    script = tmp_path / "env_check.py"
    script.write_text(ENV_CHECK)
    monkeypatch.setattr(upload_check, "COMMAND", [sys.executable, str(script), str(report)])
    _, conv = start()
    data = mlp_model(sizes=(64, 256, 10)).SerializeToString()
    assert len(data) > upload_check.IN_PROCESS_BYTES  # checked in a process of its own
    conv.upload("m", data, format="onnx")
    env = json.loads(report.read_text())
    assert not [k for k, v in env.items() if v in ("m-secret", "db-secret")]
    assert env["SOME_PLAIN_SETTING"] == "kept" and env["MALLOC_ARENA_MAX"] == "2"


# The upload's check process, first starting a process of its own session (out of reach of the
# group kill) that holds its stdout and stderr open, and noting its pid.
DAEMON_CHECK = r"""
import subprocess, sys, time
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                          start_new_session=True)
open(sys.argv[1], "w").write(str(daemon.pid))
from ferry.server.convert.upload_check import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_process_the_upload_check_left_running_does_not_hold_the_upload(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check's output was read until every holder of its pipes closed them: a process it
    started in a session of its own held the upload until --conversion-timeout said the check
    "took over" it (a check that had passed), and then for good."""
    pid_file = tmp_path / "daemon.pid"
    script = tmp_path / "daemon_check.py"
    script.write_text(DAEMON_CHECK)
    monkeypatch.setattr(upload_check, "COMMAND", [sys.executable, str(script), str(pid_file)])
    _, conv = start()
    data = mlp_model(sizes=(64, 256, 10)).SerializeToString()
    assert len(data) > upload_check.IN_PROCESS_BYTES  # checked in a process of its own
    try:
        up = conv.upload("m", data, format="onnx", timeout=60)  # the daemon lives 300 s
        assert up.size_bytes == len(data)
        os.kill(int(pid_file.read_text()), 0)  # still running: the upload did not wait for it
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
