"""The retention rule's plan, the store's notes of what it removed, and the out-of-memory
judgement, each without a server (the integration tests run them through gRPC)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

from ferry.server.convert import out_of_memory
from ferry.server.convert.retention import RetentionRule, plan
from ferry.server.convert.store import SCHEMA_VERSION, JobState, JobStore, UploadRecord
from ferry.server.errors import ErrorKind, FerryError, InvalidArgument, LimitExceeded

DAY_MS = 86400 * 1000


def record(upload_id: str, size: int, created_ms: int) -> UploadRecord:
    return UploadRecord(
        upload_id, "m", "onnx", f"/u/{upload_id}.onnx", "0" * 64, size, "", "{}", "", created_ms
    )


def test_bytes_rule_removes_oldest_first_until_under() -> None:
    uploads = [record("a", 10, 1), record("b", 10, 2), record("c", 10, 3)]
    removed = plan(RetentionRule(max_bytes=25, max_age_s=0), 40, uploads, now_ms=4)
    # 40 bytes kept in all (10 of them in use, not a candidate): a and b go, c stays
    assert [(r.upload_id, "over --upload-retention-bytes 25" in why) for r, why in removed] == [
        ("a", True),
        ("b", True),
    ]


def test_age_rule_and_the_kept_ids() -> None:
    now = 10 * DAY_MS
    uploads = [record("old", 1, 0), record("fresh", 1, now - 1000), record("new", 1, 0)]
    removed = plan(RetentionRule(max_bytes=0, max_age_s=86400), 3, uploads, now, keep={"new"})
    assert [r.upload_id for r, _ in removed] == ["old"]
    assert "over --upload-retention-seconds 86400" in removed[0][1]
    assert plan(RetentionRule(0, 0), 3, uploads, now) == []
    assert not RetentionRule(0, 0).active


def test_the_plan_reads_the_candidates_only_as_far_as_it_removes() -> None:
    """Every upload applies the rule: read to the end, each one cost a pass over every kept
    record on the server's event loop (6 s per upload with 200,000 kept)."""

    def oldest_first() -> Iterator[UploadRecord]:
        yield record("a", 10, 1)
        yield record("kept-by-caller", 10, 2)
        yield record("b", 10, 3)
        yield record("c", 10, 4)  # stays: the total is under the bound by now
        raise AssertionError("read past the first upload that stays")

    removed = plan(
        RetentionRule(max_bytes=25, max_age_s=0), 40, oldest_first(), 5, {"kept-by-caller"}
    )
    assert [r.upload_id for r, _ in removed] == ["a", "b"]


def test_the_retention_order_is_indexed_in_a_database_made_before_its_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite3"
    JobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX uploads_by_age")
    store = JobStore(path)
    names = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "uploads_by_age" in names
    store.add_upload(record("a" * 32, 1, 1))
    total, candidates = store.retention_order()
    assert (total, [r.upload_id for r in candidates]) == (1, ["a" * 32])
    store.close()


def test_store_notes_removals_and_never_removes_one_in_use(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.sqlite3")
    for rec in (record("a" * 32, 5, 1), record("b" * 32, 7, 2)):
        store.add_upload(rec)
    store.db.execute(
        "INSERT INTO jobs (job_id, model, upload_id, format, sha256, state, stage, fraction, "
        "message, spec_json, created_ms) VALUES ('j', 'm', ?, 'onnx', '', ?, 'load', 0, '', "
        "'{}', 3)",
        ("b" * 32, JobState.RUNNING.value),
    )
    total, candidates = store.retention_order()
    assert (total, [r.upload_id for r in candidates]) == (12, ["a" * 32])
    assert not store.remove_by_retention("b" * 32, "in use")
    assert store.remove_by_retention("a" * 32, "it was old")
    with pytest.raises(FerryError) as info:
        store.get_upload("a" * 32)
    assert info.value.kind is ErrorKind.UPLOAD_NOT_FOUND
    assert "removed by the upload retention rule" in info.value.message
    assert "(it was old)" in info.value.message
    with pytest.raises(FerryError, match="upload the model first"):
        store.get_upload("c" * 32)
    store.close()


def test_a_version_1_database_gains_the_removal_notes(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    JobStore(path).close()
    with sqlite3.connect(path) as db:  # as version 1 left it
        db.execute("DROP TABLE removed_uploads")
        db.execute("PRAGMA user_version = 1")
    store = JobStore(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.add_upload(record("a" * 32, 1, 1))
    assert store.remove_by_retention("a" * 32, "why")
    store.close()


def test_out_of_memory_is_judged_over_the_whole_chain() -> None:
    def wrapped(inner: BaseException) -> InvalidArgument:
        try:
            try:
                raise inner
            except Exception:
                raise InvalidArgument("not an ONNX model: corrupt or truncated upload?") from None
        except InvalidArgument as exc:
            return exc

    arena = DecodeError("Error parsing message with type 'onnx.ModelProto': Arena alloc failed")
    assert out_of_memory.is_out_of_memory(wrapped(arena))
    assert out_of_memory.is_out_of_memory(wrapped(MemoryError()))
    assert out_of_memory.is_out_of_memory(RuntimeError("std::bad_alloc"))
    assert not out_of_memory.is_out_of_memory(wrapped(DecodeError("Error parsing message")))
    error = out_of_memory.exceeded(4 << 30)
    assert isinstance(error, LimitExceeded)
    assert "4294967296 bytes" in error.message and "--conversion-memory-bytes" in error.message
    assert "no limit set" in out_of_memory.exceeded(0).message
