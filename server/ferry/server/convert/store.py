"""Uploads, conversion jobs and their progress events, in one SQLite file in the state folder.

SQLite (stdlib) rather than JSON files because a job's state and its latest event must change
together: ``append_event`` and ``finish`` are single transactions, so a crash can never leave a
job whose state and history disagree. All calls are short and made from the server's event loop
thread; the store is not shared between processes.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.server.convert.pages import Position
from ferry.server.errors import (
    ErrorKind,
    FailedPrecondition,
    FerryError,
    JobNotFound,
    Unavailable,
)

SCHEMA_VERSION = 2  # 2: removed_uploads (what the retention rule removed, and why)
MAX_REMOVED_KEPT = 10_000  # removal notes kept for NOT_FOUND messages; the oldest go first
# Finished jobs kept, with their events and reports; past it the oldest finished go (the
# database grew with every conversion ever run). Queued and running jobs always stay.
MAX_JOBS_KEPT = 10_000
_UPLOADS_BY_AGE = "CREATE INDEX IF NOT EXISTS uploads_by_age ON uploads (created_ms)"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    format TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    architecture TEXT NOT NULL,
    architecture_kwargs TEXT NOT NULL,
    description TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    format TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    fraction REAL NOT NULL,
    message TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    error_kind TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    spec_json TEXT NOT NULL,
    report_json TEXT NOT NULL DEFAULT '',
    work_dir TEXT NOT NULL DEFAULT '',
    job_dir TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL,
    started_ms INTEGER NOT NULL DEFAULT 0,
    finished_ms INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS removed_uploads (
    upload_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    removed_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model, created_ms);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    stage TEXT NOT NULL,
    fraction REAL NOT NULL,
    message TEXT NOT NULL,
    state TEXT NOT NULL,
    error_kind TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


class JobState(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class UploadRecord:
    upload_id: str
    model: str
    format: str  # one of spec.SOURCE_FORMATS
    path: str
    sha256: str
    size_bytes: int
    architecture: str
    architecture_kwargs: str  # JSON object
    description: str
    created_ms: int


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    model: str
    upload_id: str
    format: str
    sha256: str
    state: JobState
    stage: str
    fraction: float
    message: str
    version: int
    error_kind: str
    error_message: str
    spec_json: str
    report_json: str
    work_dir: str
    job_dir: str
    created_ms: int
    started_ms: int
    finished_ms: int
    last_seq: int


@dataclass(frozen=True)
class EventRecord:
    job_id: str
    seq: int
    stage: str
    fraction: float
    message: str
    state: JobState
    error_kind: str
    time_ms: int


def now_ms() -> int:
    return int(time.time() * 1000)


def database_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the state disk, not a bug, so never INTERNAL."""
    return (
        isinstance(exc, sqlite3.OperationalError)
        and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    )


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._closed = False
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FerryError(
                f"state database {path} was written by a newer Ferry (schema {version} > "
                f"{SCHEMA_VERSION}); upgrade Ferry or use another --state-dir",
                kind=ErrorKind.FAILED_PRECONDITION,
            )
        if version < SCHEMA_VERSION:
            # Idempotent (IF NOT EXISTS); executescript commits on its own.
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # The retention rule's order; also for a database of this schema made before the index.
        self._db.execute(_UPLOADS_BY_AGE)

    def close(self) -> None:
        self._closed = True
        self._db.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._closed:
            raise Unavailable("the server is shutting down; conversion state is closed")
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- uploads ----
    def add_upload(self, rec: UploadRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.upload_id,
                    rec.model,
                    rec.format,
                    rec.path,
                    rec.sha256,
                    rec.size_bytes,
                    rec.architecture,
                    rec.architecture_kwargs,
                    rec.description,
                    rec.created_ms,
                ),
            )

    def get_upload(self, upload_id: str) -> UploadRecord:
        row = self.db.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        if row is None:
            removed = self.db.execute(
                "SELECT reason, removed_ms FROM removed_uploads WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            if removed is not None:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(removed[1] / 1000))
                raise FerryError(
                    f"upload {upload_id} was removed by the upload retention rule at {when} "
                    f"({removed[0]}): upload the model again; to keep uploads longer, raise "
                    "--upload-retention-bytes / --upload-retention-seconds (0: no limit)",
                    kind=ErrorKind.UPLOAD_NOT_FOUND,
                )
            raise FerryError(
                f"no upload {upload_id!r}: upload the model first (UploadModel returns the id)",
                kind=ErrorKind.UPLOAD_NOT_FOUND,
            )
        return UploadRecord(**dict(row))

    def page_uploads(
        self, model: str = "", limit: int = 100, after: Position | None = None
    ) -> list[tuple[Position, UploadRecord]]:
        """Newest first, strictly after ``after``, each with its position (convert.pages)."""
        return [
            (position, UploadRecord(**row))
            for position, row in self._page("uploads", model, limit, after)
        ]

    def _page(
        self, table: str, model: str, limit: int, after: Position | None
    ) -> list[tuple[Position, dict[str, Any]]]:
        clauses: list[str] = []
        args: list[Any] = []
        if model:
            clauses.append("model = ?")
            args.append(model)
        if after is not None:
            clauses.append("(created_ms < ? OR (created_ms = ? AND rowid < ?))")
            args += [after[0], after[0], after[1]]
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        rows = self.db.execute(
            f"SELECT rowid AS page_row, * FROM {table} {where}"
            "ORDER BY created_ms DESC, rowid DESC LIMIT ?",
            (*args, limit),
        )
        out = []
        for r in rows:
            raw = dict(r)
            out.append(((int(raw["created_ms"]), int(raw.pop("page_row"))), raw))
        return out

    def delete_upload(self, upload_id: str) -> UploadRecord:
        """Forget an upload that no live job reads (checked and removed in one transaction);
        returns it, so the caller can remove its file. Finished jobs keep their records."""
        with self._tx() as db:
            record = self.get_upload(upload_id)
            live = db.execute(
                "SELECT job_id FROM jobs WHERE upload_id = ? AND state IN (?, ?) LIMIT 1",
                (upload_id, JobState.QUEUED.value, JobState.RUNNING.value),
            ).fetchone()
            if live is not None:
                raise FailedPrecondition(
                    f"upload {upload_id} is being converted by job {live[0]}: wait for the job "
                    "or cancel it, then delete the upload"
                )
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
        return record

    def retention_order(self) -> tuple[int, Generator[UploadRecord, None, None]]:
        """The bytes of every kept upload, and the uploads no queued or running job reads,
        oldest first: the order the retention rule removes them in. Read as the caller goes
        (the rule stops at the first upload it keeps); close the generator when done."""
        total = self.db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM uploads").fetchone()[0]
        rows = self.db.execute(
            "SELECT * FROM uploads WHERE upload_id NOT IN "
            "(SELECT upload_id FROM jobs WHERE state IN (?, ?)) ORDER BY created_ms, rowid",
            (JobState.QUEUED.value, JobState.RUNNING.value),
        )

        def records() -> Generator[UploadRecord, None, None]:
            try:
                for r in rows:
                    yield UploadRecord(**dict(r))
            finally:
                rows.close()

        return int(total), records()

    def remove_by_retention(self, upload_id: str, reason: str) -> bool:
        """Forget an upload for the retention rule and note why, so that a later reference is
        told (NOT_FOUND naming the rule, not "no such upload"). False, and nothing changes,
        when a live job reads it by now. The oldest notes beyond MAX_REMOVED_KEPT go."""
        with self._tx() as db:
            live = db.execute(
                "SELECT 1 FROM jobs WHERE upload_id = ? AND state IN (?, ?) LIMIT 1",
                (upload_id, JobState.QUEUED.value, JobState.RUNNING.value),
            ).fetchone()
            row = db.execute(
                "SELECT model, size_bytes FROM uploads WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            if live is not None or row is None:
                return False
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
            db.execute(
                "INSERT OR REPLACE INTO removed_uploads VALUES (?, ?, ?, ?, ?)",
                (upload_id, row[0], row[1], reason, now_ms()),
            )
            db.execute(
                "DELETE FROM removed_uploads WHERE rowid NOT IN (SELECT rowid FROM "
                "removed_uploads ORDER BY removed_ms DESC, rowid DESC LIMIT ?)",
                (MAX_REMOVED_KEPT,),
            )
        return True

    def upload_paths(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT path FROM uploads")}

    # ---- jobs ----
    def add_job(self, rec: JobRecord) -> EventRecord:
        """Insert a QUEUED job together with its first event; its folders are named already."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (job_id, model, upload_id, format, sha256, state, stage, "
                "fraction, message, spec_json, work_dir, job_dir, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.job_id,
                    rec.model,
                    rec.upload_id,
                    rec.format,
                    rec.sha256,
                    rec.state.value,
                    rec.stage,
                    rec.fraction,
                    rec.message,
                    rec.spec_json,
                    rec.work_dir,
                    rec.job_dir,
                    rec.created_ms,
                ),
            )
            return self._append(
                db,
                job_id=rec.job_id,
                stage=rec.stage,
                fraction=rec.fraction,
                message=rec.message,
                state=rec.state,
                error_kind="",
            )

    def get_job(self, job_id: str) -> JobRecord:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no conversion job {job_id!r}; ListJobs shows the known jobs")
        return _job(row)

    def page_jobs(
        self, model: str = "", limit: int = 100, after: Position | None = None
    ) -> list[tuple[Position, JobRecord]]:
        """Newest first, strictly after ``after``, each with its position (convert.pages)."""
        return [(position, _job(row)) for position, row in self._page("jobs", model, limit, after)]

    def jobs_in(self, *states: JobState) -> list[JobRecord]:
        marks = ", ".join("?" for _ in states)
        rows = self.db.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_ms, rowid",
            [s.value for s in states],
        )
        return [_job(r) for r in rows]

    def job_for_version(self, model: str, version: int) -> str:
        row = self.db.execute(
            "SELECT job_id FROM jobs WHERE model = ? AND version = ? AND state = ? "
            "ORDER BY finished_ms DESC LIMIT 1",
            (model, version, JobState.SUCCEEDED.value),
        ).fetchone()
        return str(row[0]) if row is not None else ""

    def start(self, job_id: str, message: str) -> EventRecord:
        """The job's child is starting (its staging folder was named when it was queued)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, started_ms = ? WHERE job_id = ?",
                (JobState.RUNNING.value, now_ms(), job_id),
            )
            return self._append(
                db,
                job_id=job_id,
                stage="load",
                fraction=0.0,
                message=message,
                state=JobState.RUNNING,
                error_kind="",
            )

    def append_event(self, job_id: str, stage: str, fraction: float, message: str) -> EventRecord:
        """A progress event of a running job; the job's latest stage follows it."""
        with self._tx() as db:
            return self._append(
                db,
                job_id=job_id,
                stage=stage,
                fraction=fraction,
                message=message,
                state=JobState.RUNNING,
                error_kind="",
            )

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        stage: str,
        fraction: float,
        message: str,
        version: int = 0,
        error_kind: str = "",
        error_message: str = "",
        report_json: str = "",
    ) -> EventRecord:
        """Move a job to a terminal state and record its last event, in one transaction."""
        assert state.terminal
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, version = ?, error_kind = ?, error_message = ?, "
                "report_json = ?, finished_ms = ?, work_dir = '' WHERE job_id = ?",
                (
                    state.value,
                    version,
                    error_kind,
                    error_message,
                    report_json,
                    now_ms(),
                    job_id,
                ),
            )
            event = self._append(
                db,
                job_id=job_id,
                stage=stage,
                fraction=fraction,
                message=message,
                state=state,
                error_kind=error_kind,
            )
            _forget_oldest_finished(db, MAX_JOBS_KEPT)
            return event

    def events(self, job_id: str, after: int = 0) -> list[EventRecord]:
        rows = self.db.execute(
            "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
        )
        return [_event(r) for r in rows]

    def _append(
        self,
        db: sqlite3.Connection,
        *,
        job_id: str,
        stage: str,
        fraction: float,
        message: str,
        state: JobState,
        error_kind: str,
    ) -> EventRecord:
        row = db.execute("SELECT last_seq FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no conversion job {job_id!r}")
        event = EventRecord(
            job_id, row[0] + 1, stage, fraction, message, state, error_kind, now_ms()
        )
        db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                event.seq,
                stage,
                fraction,
                message,
                state.value,
                error_kind,
                event.time_ms,
            ),
        )
        db.execute(
            "UPDATE jobs SET last_seq = ?, stage = ?, fraction = ?, message = ? WHERE job_id = ?",
            (event.seq, stage, fraction, message, job_id),
        )
        return event

    # ---- restart ----
    def fail_interrupted(self, reason: str) -> list[JobRecord]:
        """Mark every job left QUEUED or RUNNING by a previous process FAILED; returns them as
        they were, so the caller can remove their folders."""
        interrupted = self.jobs_in(JobState.QUEUED, JobState.RUNNING)
        for job in interrupted:
            self.finish(
                job.job_id,
                JobState.FAILED,
                stage=job.stage,
                fraction=job.fraction,
                message=reason,
                error_kind=ErrorKind.UNAVAILABLE.value,
                error_message=reason,
            )
        return interrupted


def _forget_oldest_finished(db: sqlite3.Connection, keep: int) -> None:
    """Remove the finished jobs beyond the newest ``keep`` (by when they finished), and their
    events, in the caller's transaction."""
    done = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
    old = [
        row[0]
        for row in db.execute(
            "SELECT job_id FROM jobs WHERE state IN (?, ?, ?) "
            "ORDER BY finished_ms DESC, rowid DESC LIMIT -1 OFFSET ?",
            (*done, keep),
        )
    ]
    for job_id in old:
        db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
        db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))


def _job(row: sqlite3.Row | dict[str, Any]) -> JobRecord:
    raw = dict(row)
    raw["state"] = JobState(raw["state"])
    return JobRecord(**raw)


def _event(row: sqlite3.Row) -> EventRecord:
    raw = dict(row)
    raw["state"] = JobState(raw["state"])
    return EventRecord(**raw)
