"""The conversion state store and the torch-free helpers around it: no sockets, no child."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import struct
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.server.convert import store as store_module
from ferry.server.convert import uploads, validation
from ferry.server.convert.store import JobRecord, JobState, JobStore, UploadRecord, now_ms
from ferry.server.core import versions
from ferry.server.errors import (
    ErrorKind,
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    JobNotFound,
    Unavailable,
)


def _job(
    job_id: str, model: str = "m", created: int | None = None, work_dir: str = ""
) -> JobRecord:
    return JobRecord(
        job_id=job_id, model=model, upload_id="u" * 32, format="onnx", sha256="0" * 64,
        state=JobState.QUEUED, stage="queued", fraction=0.0, message="waiting", version=0,
        error_kind="", error_message="", spec_json="{}", report_json="", work_dir=work_dir,
        job_dir="", created_ms=created if created is not None else now_ms(), started_ms=0,
        finished_ms=0, last_seq=0,
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "state.sqlite3")


def test_upload_round_trip_and_unknown_upload(store: JobStore) -> None:
    rec = UploadRecord("a" * 32, "m", "onnx", "/x.onnx", "f" * 64, 10, "", "{}", "d", now_ms())
    store.add_upload(rec)
    assert store.get_upload("a" * 32) == rec
    with pytest.raises(FerryError) as info:
        store.get_upload("b" * 32)
    assert info.value.kind is ErrorKind.UPLOAD_NOT_FOUND


def test_events_are_numbered_in_order_and_follow_the_job(store: JobStore) -> None:
    store.add_job(_job("j1", work_dir="/repo/m/.tmp-job-j1"))
    store.start("j1", "started")
    assert store.get_job("j1").work_dir == "/repo/m/.tmp-job-j1"  # named when queued
    store.append_event("j1", "export", 0.2, "exporting")
    store.finish("j1", JobState.SUCCEEDED, stage="done", fraction=1.0, message="ok", version=3)
    events = store.events("j1")
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.stage for e in events] == ["queued", "load", "export", "done"]
    assert [e.state for e in events] == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert [e.seq for e in store.events("j1", after=2)] == [3, 4]
    job = store.get_job("j1")
    assert (job.state, job.version, job.stage, job.last_seq, job.work_dir) == (
        JobState.SUCCEEDED,
        3,
        "done",
        4,
        "",  # a finished job has no staging folder
    )
    assert store.job_for_version("m", 3) == "j1"
    assert store.job_for_version("m", 2) == ""


def test_list_jobs_newest_first_and_by_model(store: JobStore) -> None:
    store.add_job(_job("j1", "a", created=1))
    store.add_job(_job("j2", "b", created=2))
    store.add_job(_job("j3", "a", created=3))
    assert [j.job_id for _, j in store.page_jobs()] == ["j3", "j2", "j1"]
    assert [j.job_id for _, j in store.page_jobs("a")] == ["j3", "j1"]
    assert [j.job_id for _, j in store.page_jobs(limit=1)] == ["j3"]
    # A page goes on strictly after the position of the last record it held.
    ((position, first),) = store.page_jobs(limit=1)
    assert first.job_id == "j3"
    assert [j.job_id for _, j in store.page_jobs(after=position)] == ["j2", "j1"]
    assert [j.job_id for _, j in store.page_jobs("a", after=position)] == ["j1"]
    with pytest.raises(JobNotFound):
        store.get_job("nope")


def test_state_survives_reopening_and_interrupted_jobs_fail(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = JobStore(path)
    first.add_job(_job("done"))
    first.finish("done", JobState.SUCCEEDED, stage="done", fraction=1.0, message="ok", version=1)
    first.add_job(_job("running", work_dir="/repo/m/.tmp-x"))
    first.start("running", "started")
    first.add_job(_job("queued"))
    first.close()

    second = JobStore(path)
    interrupted = second.fail_interrupted("restarted")
    assert sorted(j.job_id for j in interrupted) == ["queued", "running"]
    assert next(j for j in interrupted if j.job_id == "running").work_dir == "/repo/m/.tmp-x"
    for job_id in ("queued", "running"):
        job = second.get_job(job_id)
        assert job.state is JobState.FAILED
        assert (job.error_kind, job.error_message) == ("UNAVAILABLE", "restarted")
        assert second.events(job_id)[-1].state is JobState.FAILED
    assert second.get_job("done").state is JobState.SUCCEEDED
    assert second.fail_interrupted("again") == []


def test_a_closed_store_answers_unavailable(store: JobStore) -> None:
    store.close()
    with pytest.raises(Unavailable):
        store.page_jobs()


def test_failed_transaction_leaves_nothing(store: JobStore) -> None:
    store.add_job(_job("j1"))
    with pytest.raises(Exception):  # noqa: B017 - sqlite's IntegrityError
        store.add_job(_job("j1"))
    assert [e.seq for e in store.events("j1")] == [1]


# ---- upload format checks: structure only, nothing deserialized ----
def _torch_like_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", b"not read by the server")
        zf.writestr("archive/version", b"3")
    return buffer.getvalue()


def test_state_dict_must_be_a_torch_zip(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(_torch_like_zip())
    uploads.check_format("state_dict", path)
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(InvalidArgument, match="bare pickle"):
        uploads.check_format("state_dict", path)
    path.write_bytes(_torch_like_zip()[:40])
    with pytest.raises(InvalidArgument, match="corrupt or truncated"):
        uploads.check_format("state_dict", path)


def test_safetensors_header_is_checked(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    uploads.check_format("safetensors", path)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)  # truncated data
    with pytest.raises(InvalidArgument, match="outside the file"):
        uploads.check_format("safetensors", path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + header)
    with pytest.raises(InvalidArgument, match="header length"):
        uploads.check_format("safetensors", path)


def test_onnx_must_parse(tmp_path: Path) -> None:
    from ferry.server.examples import mlp_model

    path = tmp_path / "m.onnx"
    path.write_bytes(mlp_model().SerializeToString())
    uploads.check_format("onnx", path)
    path.write_bytes(b"\xff" * 100)
    with pytest.raises(InvalidArgument, match="not an ONNX model"):
        uploads.check_format("onnx", path)


def test_code_formats_refused_unless_allowed() -> None:
    header = uploads.UploadHeader(model="m", format="exported_program")
    with pytest.raises(FailedPrecondition, match="--allow-code-formats"):
        uploads.check_header(header, limit=100, allow_code_formats=False)
    uploads.check_header(header, limit=100, allow_code_formats=True)
    with pytest.raises(Exception, match="limit of 100 bytes"):
        uploads.check_header(
            uploads.UploadHeader(model="m", format="onnx", size_bytes=101),
            limit=100,
            allow_code_formats=False,
        )


# ---- spec tensors and the config edit ----
def test_npz_is_loadable_without_pickle_even_for_awkward_names(tmp_path: Path) -> None:
    arrays = {"file": np.arange(6, dtype=np.float32).reshape(3, 2), "allow_pickle": np.ones(3)}
    validation.save_npz(tmp_path / "t.npz", arrays)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as loaded:
        assert sorted(loaded.files) == ["allow_pickle", "file"]
        np.testing.assert_array_equal(loaded["file"], arrays["file"])


def test_toml_edit_keeps_comments_and_tables() -> None:
    text = "# my model\nversion_policy = { latest = 1 }\n\n[batching]\nmax_batch_size = 8\n"
    edited = versions._edit_toml(text, "default_version", 2)
    edited = versions._edit_toml(edited, "version_policy", "{ latest = 3 }")
    assert edited.startswith("# my model\n")
    raw = tomllib.loads(edited)
    assert raw == {
        "default_version": 2,
        "version_policy": {"latest": 3},
        "batching": {"max_batch_size": 8},
    }
    cleared = versions._edit_toml(edited, "default_version", None)
    assert "default_version" not in tomllib.loads(cleared)
    with pytest.raises(FailedPrecondition, match="as a table"):
        versions._edit_toml("[version_policy]\nlatest = 1\n", "version_policy", "{ latest = 2 }")


def test_the_state_folder_sits_beside_the_repository(tmp_path: Path) -> None:
    from ferry.server.convert.service import ConversionService, default_state_dir
    from ferry.server.core.registry import ModelRegistry
    from ferry.server.core.repository import ModelRepository
    from ferry.server.runtime.session import open_session
    from ferry.server.settings import Settings

    repo = ModelRepository(tmp_path / "models")
    assert default_state_dir(repo.root) == tmp_path / "models.ferry"
    inside = Settings(repository=repo.root, state_dir=str(repo.root / "state"))
    with pytest.raises(InvalidArgument, match="inside the model repository"):
        ConversionService(inside, repo, ModelRegistry(repo, open_session)).open()
    assert repo.list_models() == []


def test_a_damaged_state_database_turns_conversion_off_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged file (or a full disk: sqlite's "disk I/O error" making the WAL) stopped the
    server at start; now the start goes on (models serve), every conversion call is refused
    with one FerryError naming the file, and the state folder is free again, so the corrected
    file is opened by the next call."""
    from ferry.server.convert import service as service_module
    from ferry.server.convert.service import ConversionService
    from ferry.server.core.registry import ModelRegistry
    from ferry.server.core.repository import ModelRepository
    from ferry.server.runtime.session import open_session
    from ferry.server.settings import Settings

    monkeypatch.setattr(service_module, "REOPEN_EVERY_S", 0.0)
    repo = ModelRepository(tmp_path / "models")
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(b"not a database, " * 512)
    settings = Settings(repository=repo.root, state_dir=str(state))
    service = ConversionService(settings, repo, ModelRegistry(repo, open_session))
    service.open()
    with pytest.raises(FerryError, match=r"state\.sqlite3 cannot be opened or updated") as info:
        service.list_jobs()
    assert "move it away" in info.value.message
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION
    (state / "state.sqlite3").unlink()
    assert service.list_jobs() == ([], "")  # opened again: the lock was released
    asyncio.run(service.close())


def test_a_state_folder_on_a_full_disk_turns_conversion_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state folder (or its lock file) that cannot be made for a full disk stopped the
    start with "point --state-dir at a folder this user can write" (or an OSError): models
    serve, and conversion answers RESOURCE_EXHAUSTED until the folder can be made."""
    import errno
    import os

    from ferry.server.convert import service as service_module
    from ferry.server.convert.service import ConversionService
    from ferry.server.core.registry import ModelRegistry
    from ferry.server.core.repository import ModelRepository
    from ferry.server.runtime.session import open_session
    from ferry.server.settings import Settings

    monkeypatch.setattr(service_module, "REOPEN_EVERY_S", 0.0)
    repo = ModelRepository(tmp_path / "models")
    state = tmp_path / "state"
    settings = Settings(repository=repo.root, state_dir=str(state))
    service = ConversionService(settings, repo, ModelRegistry(repo, open_session))
    made = Path.mkdir

    def full(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "mkdir", full)
    service.open()
    with pytest.raises(FerryError, match=r"state folder .* cannot be made") as info:
        service.list_jobs()
    assert info.value.kind is ErrorKind.LIMIT_EXCEEDED
    monkeypatch.setattr(Path, "mkdir", made)  # space freed
    assert service.list_jobs() == ([], "")
    asyncio.run(service.close())


def test_finished_jobs_are_kept_up_to_a_bound_oldest_first(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every job and its events (and its report, up to 16 MiB) stayed in the database for
    good: it grew with every conversion ever run. Past the bound the oldest finished go."""
    monkeypatch.setattr(store_module, "MAX_JOBS_KEPT", 2)
    store.add_job(_job("live", created=0))  # never finished: never removed
    store.start("live", "started")
    for n in range(4):
        store.add_job(_job(f"j{n}", created=n + 1))
        store.finish(f"j{n}", JobState.FAILED, stage="queued", fraction=0.0, message="no")
    assert sorted(j.job_id for _, j in store.page_jobs()) == ["j2", "j3", "live"]
    assert store.events("j0") == [] and store.events("j1") == []
    assert [e.seq for e in store.events("j3")] == [1, 2]
    assert store.get_job("live").state is JobState.RUNNING
