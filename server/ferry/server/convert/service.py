"""The conversion core behind the ``ModelConversion`` RPCs: uploads, jobs and version management.

It owns the state folder, which sits *beside* the repository (``<repository>.ferry`` unless
``--state-dir`` says otherwise), never inside it: the repository treats every folder as a model.
The folder holds ``state.sqlite3`` (uploads, jobs, events), ``uploads/`` and ``jobs/<id>/`` (the
job contract and its tensors while the job lives), and ``lock``, which the server using the folder
holds (flock) so that no second server settles its live jobs as interrupted. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ferry.server.convert import (
    architectures,
    onnx_archive,
    pages,
    retention,
    spec,
    upload_check,
    uploads,
    validation,
)
from ferry.server.convert.jobs import JobRunner, staging_key
from ferry.server.convert.publish import interrupted_pin, published_version
from ferry.server.convert.store import (
    EventRecord,
    JobRecord,
    JobState,
    JobStore,
    UploadRecord,
    database_full,
    now_ms,
)
from ferry.server.convert.summary import published_line
from ferry.server.core import versions
from ferry.server.core.config import ModelConfig, load_config
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import (
    MODEL_FILE,
    TMP_PREFIX,
    ModelRepository,
    read_report,
    validate_model_name,
)
from ferry.server.errors import (
    ErrorKind,
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    LimitExceeded,
    Unavailable,
)
from ferry.server.settings import Settings

log = logging.getLogger("ferry.convert")

DB_FILE = "state.sqlite3"
REOPEN_EVERY_S = 5.0  # how often conversion calls try a state database that did not open
LOCK_FILE = "lock"  # flock'd by the server using the folder
RESTARTED = "the server restarted during the job; convert again"
WEIGHTS_ONLY = ("state_dict", "safetensors")
_ID = re.compile(r"[0-9a-f]{32}")
_R = TypeVar("_R")


def default_state_dir(repository: Path) -> Path:
    root = repository.resolve()
    return root.parent / f"{root.name}.ferry"


class ConversionService:
    def __init__(
        self, settings: Settings, repository: ModelRepository, registry: ModelRegistry
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.registry = registry
        configured = getattr(settings, "state_dir", "")
        self.state_dir = Path(configured) if configured else default_state_dir(repository.root)
        self._store: JobStore | None = None
        self._runner: JobRunner | None = None
        self._lock: int | None = None  # the state folder's lock file, held while open
        # Why the state database did not open (a full state disk, a damaged file): models
        # serve, conversion calls are refused saying this, and it is opened again on a call.
        self._open_error: FerryError | None = None
        self._reopen_at = 0.0  # time.monotonic() before which no call tries it again
        # Uploads a Convert call is queueing (it awaits between reading the upload and adding
        # its job): the retention rule leaves them alone. Upload id -> calls in flight.
        self._converting: collections.Counter[str] = collections.Counter()
        # The upload checks' processes, bounded like the conversions' (upload_check).
        self.check_slots = upload_check.CheckSlots(settings.max_concurrent_conversions)
        self.retention = retention.RetentionRule(
            max_bytes=settings.upload_retention_bytes,
            max_age_s=settings.upload_retention_seconds,
        )

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._reopen()
        if self._store is None:
            raise Unavailable("the conversion service is not running")
        return self._store

    @property
    def runner(self) -> JobRunner:
        if self._runner is None:
            self._reopen()
        if self._runner is None:
            raise Unavailable("the conversion service is not running")
        return self._runner

    def _reopen(self) -> None:
        """A conversion call while the state database is not open (``open`` failed): open it
        again (at most every REOPEN_EVERY_S), else refuse the call saying why."""
        if self._open_error is None:
            return
        if time.monotonic() >= self._reopen_at:
            self.open()
        if self._open_error is not None:
            raise FerryError(self._open_error.message, kind=self._open_error.kind)

    # ---- lifecycle ----
    def open(self) -> None:
        """Open the database and settle what a previous process left: interrupted jobs fail,
        their folders and any partial upload go."""
        state, root = self.state_dir.resolve(), self.repository.root.resolve()
        if state == root or root in state.parents:
            raise InvalidArgument(
                f"state folder {state} is inside the model repository, which would list it as "
                "a model: choose a --state-dir outside it"
            )
        for sub in (state, state / "uploads", state / "jobs"):
            if sub.exists() and not sub.is_dir():
                raise InvalidArgument(
                    f"state folder {sub} exists and is not a folder: point --state-dir at a "
                    "folder (it is created when missing) or move that file"
                )
            try:
                sub.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # as a database that won't open
                    self._turn_off(f"its state folder {sub} cannot be made ({exc.strerror})", True)
                    return
                raise InvalidArgument(
                    f"cannot create the state folder {sub}: {exc.strerror or exc}; point "
                    "--state-dir at a folder this user can write"
                ) from None
        try:
            self._lock = _lock_state(state)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._turn_off(
                f"its lock file {state / LOCK_FILE} cannot be made ({exc.strerror})", True
            )
            return
        try:
            self._settle(state)
        except BaseException as exc:
            if self._store is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._store.close()
                self._store = None
            os.close(self._lock)
            self._lock = None
            if not isinstance(exc, sqlite3.Error):
                raise
            # A full disk ("disk I/O error" making the WAL) or a damaged file: the server
            # stopped at start (with sqlite's traceback, later with this message), and a full
            # state disk, which conversion alone writes, took every model's serving down.
            # Models serve; conversion calls are refused with this until the file opens.
            why = f"its state database {state / DB_FILE} cannot be opened or updated ({exc})"
            self._turn_off(why, database_full(exc))
            return
        if self._open_error is not None:
            log.info("the conversion state database opened: conversion is on again")
        self._open_error = None
        s = self.settings
        self._runner = JobRunner(
            self.store,
            self.repository,
            self.registry,
            max_concurrent=s.max_concurrent_conversions,
            max_queued=s.max_queued_conversions,
            timeout=s.conversion_timeout,
            memory_bytes=s.conversion_memory_bytes,
            warm=s.warm_conversion_child,
        )

    def _turn_off(self, why: str, full: bool) -> None:
        """Serve models without conversion: its state (``why``) cannot be opened. A full state
        disk, which conversion alone writes, stopped the server at start, and so every
        model's serving; now conversion calls are refused with this until it opens."""
        self._open_error = FerryError(
            f"conversion is off on this server: {why}: free space on the disk of the state "
            "folder, or, if the database is damaged, move it away (its uploads and job "
            "history are lost) or point --state-dir at another folder and restart; models "
            "keep serving, and conversion comes back by itself once the state opens",
            kind=ErrorKind.LIMIT_EXCEEDED if full else ErrorKind.FAILED_PRECONDITION,
        )
        self._reopen_at = time.monotonic() + REOPEN_EVERY_S
        log.error("%s", self._open_error.message)

    def _settle(self, state: Path) -> None:
        """Open the database and settle what a previous process left."""
        self._store = JobStore(state / DB_FILE)
        for job in self._store.jobs_in(JobState.RUNNING):
            self._recover_published(job, state / "jobs")
        for job in self._store.fail_interrupted(RESTARTED):
            log.warning("conversion job %s was interrupted by a restart: marked FAILED", job.job_id)
            self._remove_work_dir(job)
            pin = interrupted_pin(self.repository, job.model)
            if pin:
                log.warning("%s", pin)
        # Half-written uploads, and whole ones no record names: a kill between an upload's
        # rename and its row (or between a delete's row and its file) left a file no listing,
        # retention rule or delete would ever see again.
        # By name, not path: a state folder moved elsewhere keeps its files.
        paths = [Path(p) for p in self._store.upload_paths()]
        named = {p.name for p in paths} | {p.parent.name for p in paths}  # archive: <id>/
        for entry in (state / "uploads").iterdir():
            if entry.name in named and not entry.name.startswith(TMP_PREFIX):
                continue
            if not entry.name.startswith(TMP_PREFIX):
                log.warning("removing %s: an upload file no upload record names", entry)
            if entry.is_dir() and not entry.is_symlink():  # an archive (being extracted)
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink(missing_ok=True)
        for entry in (state / "jobs").iterdir():  # no job is live yet: every folder is stale
            shutil.rmtree(entry, ignore_errors=True)
        for path in self._forget_by_retention():
            _remove_file(path, state / "uploads")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.close()
            # Let the job streams woken by the last events read them before the store closes;
            # a stream that comes back later ends with UNAVAILABLE.
            await asyncio.sleep(0)
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def _recover_published(self, job: JobRecord, jobs_dir: Path) -> None:
        """A job the restart stopped after its version was published ends SUCCEEDED with that
        version (publish.note_publishing), not FAILED with "convert again", which would
        publish the same model a second time."""
        # By name, not path (as the uploads): the database holds the absolute path the job
        # folder had, and a state folder moved (or mounted elsewhere) since was never looked
        # at, so a published version's job read FAILED "convert again". The name is checked.
        name = Path(job.job_dir).name
        if not job.job_dir or name != job.job_id or not name.isalnum():
            return
        job_dir = jobs_dir / name
        version = published_version(self.repository, job.model, job_dir)
        if not version:
            return
        report = read_report(self.repository.version_dir(job.model, version))
        summary = published_line(report)
        message = f"published as {job.model} version {version}"
        message += f": {summary}" if summary else ""
        message += " (the server restarted as the job finished)"
        pin = interrupted_pin(self.repository, job.model, version)
        if pin:  # a shadow publish stopped before the candidate was shadowed: it takes no traffic
            message += f"; {pin}"
        self.store.finish(
            job.job_id,
            JobState.SUCCEEDED,
            stage="done",
            fraction=1.0,
            message=message,
            version=version,
            report_json=report,
        )
        log.warning("conversion job %s, stopped by a restart: %s", job.job_id, message)

    def _remove_work_dir(self, job: JobRecord) -> None:
        """Only a staging folder of the job's own model is ever removed: the path comes from
        the database, and is checked rather than trusted. A job that never ran has none on disk;
        the model folder of one that did goes too when nothing else is in it (a first conversion
        that died leaves no empty model)."""
        if not job.work_dir:
            return
        path = Path(job.work_dir)
        try:
            mdir = self.repository.model_dir(job.model)
        except InvalidArgument:
            return
        if path.parent == mdir and path.name.startswith(TMP_PREFIX) and path.exists():
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                mdir.rmdir()  # only when empty

    # ---- uploads ----
    async def upload(
        self, header: uploads.UploadHeader, chunks: AsyncIterator[bytes]
    ) -> UploadRecord:
        s = self.settings
        uploads.check_header(
            header, limit=s.max_upload_bytes, allow_code_formats=s.allow_code_formats
        )
        store = self.store
        uploads_dir = self.state_dir.resolve() / "uploads"
        record = await uploads.receive(
            header,
            chunks,
            uploads_dir,
            limit=s.max_upload_bytes,
            check_memory_bytes=s.conversion_memory_bytes,
            check_timeout=s.conversion_timeout,
            check_slots=self.check_slots,
        )
        try:
            store.add_upload(record)
        except BaseException as exc:
            _remove_upload_file(Path(record.path), uploads_dir)
            if database_full(exc):
                raise uploads.disk_full_error("the job database could not grow") from None
            raise
        log.info(
            "upload %s for %s: %s, %d bytes, sha256 %s",
            record.upload_id,
            record.model,
            record.format,
            record.size_bytes,
            record.sha256,
        )
        # The upload is stored and its answer due whatever happens here: a file that will not
        # go is logged (its record is gone, so nothing lists or converts it), and so is a rule
        # the database cannot apply for a full disk (the next upload or start applies it).
        try:
            removed = self._forget_by_retention(keep=record.upload_id)
        except Exception as exc:
            if not database_full(exc):
                raise
            log.error("the upload retention rule was not applied: the state disk is full (%s)", exc)
            removed = []
        for path in removed:
            await asyncio.to_thread(_remove_file, path, uploads_dir)
        return record

    async def _apply_retention(self) -> None:
        """The retention rule now, its files removed; a database too full to note a removal
        leaves the rule to the next upload or start (logged), as after an upload."""
        try:
            removed = self._forget_by_retention()
        except Exception as exc:
            if not database_full(exc):
                raise
            log.error("the upload retention rule was not applied: the state disk is full (%s)", exc)
            return
        for path in removed:
            await asyncio.to_thread(_remove_file, path, self.state_dir.resolve() / "uploads")

    def _forget_by_retention(self, keep: str = "") -> list[Path]:
        """Apply the retention rule to the records (each removal noted, with its reason, for
        a later NOT_FOUND) and return the files to remove; logged, one line per upload."""
        rule = self.retention
        if not rule.active:
            return []
        store = self.store
        total, candidates = store.retention_order()
        keep_ids = {keep, *self._converting}
        try:
            removals = retention.plan(rule, total, candidates, now_ms(), keep_ids)
        finally:
            candidates.close()  # its read ends before the removals write
        files = []
        for record, reason in removals:
            if not store.remove_by_retention(record.upload_id, reason):
                continue
            log.warning(
                "upload %s for %s (%d bytes) removed by the retention rule: %s",
                record.upload_id,
                record.model,
                record.size_bytes,
                reason,
            )
            files.append(self._upload_file(record))  # checked where it is removed
        return files

    def list_uploads(
        self, model: str = "", limit: int = 0, page_token: str = ""
    ) -> tuple[list[UploadRecord], str]:
        """Newest first, at most ``limit`` (0: 100; at most 10,000) and no more than fit the
        answer's byte budget, so that no number of kept uploads can make the listing fail;
        with the token of the next page, empty after the last (convert.pages)."""
        return self._listing(
            self.store.page_uploads, _upload_bytes, model, limit, page_token, listing="uploads"
        )

    def _listing(
        self,
        fetch: Callable[[str, int, pages.Position | None], list[tuple[pages.Position, _R]]],
        size: Callable[[_R], int],
        model: str,
        limit: int,
        page_token: str,
        *,
        listing: str,
    ) -> tuple[list[_R], str]:
        if model:
            validate_model_name(model)
        after = pages.decode(page_token, model, listing)
        n = _page_size(limit)
        rows = fetch(model, n + 1, after)
        return _page(rows, n, self._list_budget(), size, model, listing=listing)

    async def delete_upload(self, upload_id: str) -> None:
        with _database_writes("delete the upload again"):
            await self._delete_upload(upload_id)

    async def _delete_upload(self, upload_id: str) -> None:
        upload_id = _check_id(upload_id, "upload")
        if upload_id in self._converting:
            # A Convert call has read it and is writing its job's files: deleted now, the job
            # was queued all the same and its child failed on the missing file ("crashed").
            raise FailedPrecondition(
                f"upload {upload_id} is being queued for conversion by a Convert call: wait "
                "for that job to end (or cancel it), then delete the upload"
            )
        try:
            record = self.store.delete_upload(upload_id)
        except Exception as exc:
            if not database_full(exc):
                raise
            await self._free_then_forget(upload_id)
            return
        uploads_dir = self.state_dir.resolve() / "uploads"
        path = self._upload_file(record)
        await asyncio.to_thread(_remove_upload_file, path, uploads_dir)
        log.info("upload %s for %s deleted", record.upload_id, record.model)

    async def _free_then_forget(self, upload_id: str) -> None:
        """The job database could not record a delete for a full state disk, which the delete
        is there to fix: it was refused, and the operator could free no space through Ferry.
        The upload passed the delete's checks (it exists, no job reads it; nothing ran on the
        loop since), so its file goes first, renamed out of Convert's sight at once (a rename
        needs no room) and then removed, and the record is deleted again in the room freed.
        Killed in between, the record stays with its file gone: Convert says so, a delete
        again finishes it, and the start removes the renamed file."""
        record = self.store.get_upload(upload_id)
        uploads_dir = self.state_dir.resolve() / "uploads"
        path = self._upload_file(record)
        archive = path.name == MODEL_FILE
        moved = path.parent if archive else path
        if moved.parent == uploads_dir and moved.name.startswith(upload_id):
            hidden = uploads_dir / f"{TMP_PREFIX}deleting-{moved.name}"
            with contextlib.suppress(FileNotFoundError):  # gone already (a delete before)
                moved.rename(hidden)
                gone = hidden / MODEL_FILE if archive else hidden
                await asyncio.to_thread(_remove_upload_file, gone, uploads_dir)
        try:
            self.store.delete_upload(upload_id)
        except Exception as exc:
            if not database_full(exc):
                raise
            raise LimitExceeded(
                f"the server's state disk is full: upload {upload_id}'s file was removed "
                f"({record.size_bytes} bytes freed), but the job database still could not "
                "record the delete: the operator must free space on the disk of the state "
                "folder (--state-dir), then delete the upload again"
            ) from None
        log.info(
            "upload %s for %s deleted (its file first: the state disk was full)",
            upload_id,
            record.model,
        )

    def _upload_file(self, record: UploadRecord) -> Path:
        """Where the upload's file is now: by name in this state folder's uploads/ (the name is
        what the start's clean-up goes by too). The record holds the absolute path it was
        stored at, so a state folder moved (with its repository, or mounted elsewhere) listed
        every upload while Convert said "file is gone" and a delete left the file."""
        stored = Path(record.path)
        uploads_dir = self.state_dir.resolve() / "uploads"
        if stored.name == MODEL_FILE:  # an archive: <id>/model.onnx (a file is <id><suffix>)
            return uploads_dir / stored.parent.name / MODEL_FILE
        return uploads_dir / stored.name

    @staticmethod
    def known_inputs(record: UploadRecord) -> list[spec.InputSpec]:
        """The inputs ``convert`` falls back on for this upload (a built-in's own), so a client
        can tell whether it must name them."""
        if record.format not in WEIGHTS_ONLY:
            return []
        # Records stored before kwargs were checked at upload may hold anything: such an
        # upload lists with no known inputs (its Convert says what is wrong) rather than
        # failing the listing of every upload.
        try:
            kwargs = json.loads(record.architecture_kwargs)
            if not isinstance(kwargs, dict):
                return []
            return architectures.default_input_specs(record.architecture, kwargs)
        except (ValueError, RecursionError, InvalidArgument):
            return []

    def _serving_providers(self, model: str) -> list[dict[str, Any]]:
        """The providers the model's config serves its versions with; the child measures
        there. A missing or broken config serves on the defaults (the registry reports a
        broken one)."""
        try:
            config = load_config(self.repository.model_dir(model))
        except FerryError:
            config = ModelConfig()
        return [{"name": p.name, "options": p.options_dict()} for p in config.onnxruntime.providers]

    # ---- jobs ----
    async def convert(
        self,
        upload_id: str,
        model: str,
        conversion: spec.ConversionSpec,
        tensors: validation.SpecTensors,
    ) -> JobRecord:
        upload_id = _check_id(upload_id, "upload")
        # The rule runs at an upload and at a start: on a server that took no upload since, one
        # past --upload-retention-seconds was still converted (and kept on disk). Applied here
        # too, such an upload is NOT_FOUND with the rule's reason, as after its removal.
        await self._apply_retention()
        with self._queueing(upload_id):
            upload = self.store.get_upload(upload_id)
            model = validate_model_name(model or upload.model)
            kwargs = _stored_kwargs(upload)
            source = self._upload_file(upload)
            if upload.format in WEIGHTS_ONLY:
                _check_architecture(upload.architecture)
                try:
                    architectures.check_kwargs(upload.architecture, kwargs)
                except InvalidArgument as exc:
                    raise InvalidArgument(
                        f"upload {upload_id} was stored with kwargs this server no longer "
                        f"accepts ({exc.message}): delete it and upload the weights again "
                        "with valid kwargs"
                    ) from None
                if not conversion.inputs:
                    conversion.inputs = architectures.default_input_specs(
                        upload.architecture, kwargs
                    )
            validation.validate_spec(conversion, tensors, source_format=upload.format)
            _check_model_folder(self.repository, model)
            job_id = uuid.uuid4().hex
            job_dir = self.state_dir.resolve() / "jobs" / job_id
            # Decided now, made when the job runs: job.json is complete when written, and written once.
            work_dir = self.repository.staging_path(model, staging_key(job_id))
            _assign_paths(job_dir, conversion, tensors)
            contract = spec.Job(
                job_id=job_id,
                model=model,
                source_path=str(source),
                source_format=upload.format,
                source_sha256=upload.sha256,
                architecture=upload.architecture,
                architecture_kwargs=kwargs,
                spec=conversion,
                work_dir=str(work_dir),
                allow_code_formats=self.settings.allow_code_formats,
                providers=self._serving_providers(model),
                external_data_threshold=self.settings.external_data_threshold_bytes,
            )
            validation.check_job(contract)  # the child's own checks, run before a child is spent
            self.runner.check_room()
            if not await asyncio.to_thread(os.path.isfile, source):
                raise FailedPrecondition(
                    f"upload {upload_id}'s file is gone: upload the model again"
                )
            try:
                job_dir.mkdir(mode=0o700)
                await asyncio.to_thread(_write_tensors, job_dir, contract, tensors)
                record = JobRecord(
                    job_id=job_id,
                    model=model,
                    upload_id=upload.upload_id,
                    format=upload.format,
                    sha256=upload.sha256,
                    state=JobState.QUEUED,
                    stage="queued",
                    fraction=0.0,
                    message="waiting for a conversion slot",
                    version=0,
                    error_kind="",
                    error_message="",
                    spec_json=spec.to_json(conversion),
                    report_json="",
                    work_dir=str(work_dir),
                    job_dir=str(job_dir),
                    created_ms=now_ms(),
                    started_ms=0,
                    finished_ms=0,
                    last_seq=0,
                )
                self.runner.check_room()  # again: the queue may have filled while files were written
                self.store.add_job(record)
            except BaseException as exc:
                shutil.rmtree(job_dir, ignore_errors=True)
                if isinstance(exc, OSError) and uploads.disk_full(exc):  # not a bug: no INTERNAL
                    detail = f"the job's files could not be written: {exc.strerror or exc}"
                    raise uploads.disk_full_error(detail, "convert again") from None
                if database_full(exc):
                    raise uploads.disk_full_error(
                        "the job database could not grow", "convert again"
                    ) from None
                raise
            self.runner.submit(job_id)  # cannot fail: room was checked with no await since
            return self.store.get_job(job_id)

    @contextlib.contextmanager
    def _queueing(self, upload_id: str) -> Iterator[None]:
        """While a Convert call reads the upload and adds its job, retention leaves it alone."""
        self._converting[upload_id] += 1
        try:
            yield
        finally:
            self._converting[upload_id] -= 1
            if self._converting[upload_id] <= 0:
                del self._converting[upload_id]

    def get_job(self, job_id: str) -> JobRecord:
        return self.store.get_job(_check_id(job_id, "job"))

    def list_jobs(
        self, model: str = "", limit: int = 0, page_token: str = ""
    ) -> tuple[list[JobRecord], str]:
        """As ``list_uploads``: newest first, within ``limit`` and the byte budget."""
        return self._listing(
            self.store.page_jobs, _job_bytes, model, limit, page_token, listing="jobs"
        )

    def _list_budget(self) -> int:
        """Half the largest message: what the estimate of a record's size leaves out (field
        tags, the parsed report beside its JSON, known inputs) fits in the other half."""
        return int(getattr(self.settings, "max_message_bytes", 80 << 20)) // 2

    async def cancel_job(self, job_id: str) -> JobRecord:
        with _database_writes("cancel the job again"):
            return await self.runner.cancel(_check_id(job_id, "job"))

    def watch(self, job_id: str) -> AsyncIterator[EventRecord]:
        return self.runner.watch(_check_id(job_id, "job"))

    # ---- versions ----
    async def get_model(self, name: str) -> tuple[versions.ModelView, dict[int, str]]:
        """The model's versions, and the job that produced each (when one did)."""
        view = await versions.describe(self.repository, self.registry, validate_model_name(name))
        try:
            store = self.store
        except FerryError:  # conversion is off (its database did not open): versions answer
            return view, {}
        jobs = {v.version: store.job_for_version(name, v.version) for v in view.versions}
        return view, jobs

    async def delete_version(self, name: str, version: int) -> None:
        await versions.delete_version(
            self.repository, self.registry, validate_model_name(name), version
        )

    async def set_default_version(self, name: str, version: int) -> None:
        if version < 0:
            raise InvalidArgument("version must be positive, or 0 to clear the default")
        await versions.set_default_version(
            self.repository, self.registry, validate_model_name(name), version
        )


@contextlib.contextmanager
def _database_writes(then: str) -> Iterator[None]:
    """A write the job database refuses for a full disk answered INTERNAL ("the server log has
    the traceback"); it is the operator's disk, and nothing changed."""
    try:
        yield
    except Exception as exc:
        if not database_full(exc):
            raise
        raise LimitExceeded(
            "the server's state disk is full (the job database could not grow); nothing "
            "changed: the operator must free space on the disk of the state folder "
            f"(--state-dir), then {then}"
        ) from None


def _lock_state(state: Path) -> int:
    """Hold the state folder for this server. A second server on the same folder (another
    port, one repository) settled the first's running jobs as "interrupted by a restart" and
    removed their folders under their live conversion processes."""
    path = state / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise FailedPrecondition(
            f"the state folder {state} is in use by another running Ferry server"
            + (f" (pid {holder})" if holder.isdigit() else "")
            + ": give this server its own --state-dir, or stop the other one"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # the pid only makes the message above clearer
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


def _remove_file(path: Path, uploads_dir: Path) -> None:
    try:
        _remove_upload_file(path, uploads_dir)
    except OSError as exc:
        log.error("could not remove %s, an upload the retention rule removed: %s", path, exc)


def _stored_kwargs(upload: UploadRecord) -> dict[str, Any]:
    """An upload's kwargs from its record, which an older server may have stored unchecked."""
    try:
        kwargs = json.loads(upload.architecture_kwargs)
    except (ValueError, RecursionError):
        kwargs = None
    if not isinstance(kwargs, dict):
        raise InvalidArgument(
            f"upload {upload.upload_id} was stored with unreadable architecture kwargs: delete "
            "it and upload the model again"
        )
    return kwargs


def _upload_bytes(record: UploadRecord) -> int:
    return 512 + sum(
        len(text.encode())
        for text in (record.architecture, record.architecture_kwargs, record.description)
    )


def _job_bytes(record: JobRecord) -> int:
    # The report goes out twice: parsed into ConversionReport and as report_json.
    texts = (record.message, record.error_message, record.spec_json, record.stage)
    return 1024 + 2 * len(record.report_json.encode()) + sum(len(t.encode()) for t in texts)


def _page_size(limit: int) -> int:
    return min(limit or 100, 10_000)


def _page(
    rows: list[tuple[pages.Position, _R]],
    limit: int,
    budget: int,
    size: Callable[[_R], int],
    model: str,
    *,
    listing: str,
) -> tuple[list[_R], str]:
    """The records of one page (``rows`` holds one more than ``limit`` when more follow) and
    the token of the next, when the limit or the byte budget left records out."""
    kept = _within(budget, [record for _, record in rows[:limit]], size)
    if len(rows) > len(kept):
        return kept, pages.encode(rows[len(kept) - 1][0], model, listing)
    return kept, ""


def _within(budget: int, records: list[_R], size: Callable[[_R], int]) -> list[_R]:
    """The leading records whose estimated sizes fit ``budget`` (the first always goes out: a
    single record is bounded by what its upload or job accepted)."""
    kept: list[_R] = []
    for record in records:
        budget -= size(record)
        if budget < 0 and kept:
            break
        kept.append(record)
    return kept


def _check_id(value: str, what: str) -> str:
    """Ids are lowercase hex; one given in capitals (copied from a tool that upper-cases) is
    the same id, not "malformed: expected 32 hex characters" when it is just that."""
    if len(value) == 32:
        value = value.lower()
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{what} id {value[:80]!r} is malformed: expected 32 hex characters")
    return value


def _check_model_folder(repository: ModelRepository, model: str) -> None:
    """A file where the model's folder would be failed the job as INTERNAL (FileExistsError
    making its staging folder): refused here, saying what is in the way."""
    mdir = repository.model_dir(model)
    if mdir.exists() and not mdir.is_dir():
        raise FailedPrecondition(
            f"{mdir} is a file, not a model folder: the repository has no room for model "
            f"{model!r}; move that file away or convert into another model name"
        )


def _check_architecture(name: str) -> None:
    if name not in architectures.available():  # names only: no plugin code is imported here
        raise architectures.unknown(name)


def _assign_paths(
    job_dir: Path, conversion: spec.ConversionSpec, tensors: validation.SpecTensors
) -> None:
    if tensors.calibration:
        conversion.quantization.calibration_file = str(job_dir / "calibration.npz")
    if tensors.samples:
        conversion.validation.sample_file = str(job_dir / "samples.npz")
    if tensors.references:
        conversion.validation.reference_file = str(job_dir / "references.npz")


def _write_tensors(job_dir: Path, contract: spec.Job, tensors: validation.SpecTensors) -> None:
    conversion = contract.spec
    for path, arrays in (
        (conversion.quantization.calibration_file, tensors.calibration),
        (conversion.validation.sample_file, tensors.samples),
        (conversion.validation.reference_file, tensors.references),
    ):
        if arrays:
            validation.save_npz(Path(path), arrays)
    (job_dir / "job.json").write_text(spec.to_json(contract))


def _remove_upload_file(path: Path, uploads_dir: Path) -> None:
    """Remove an upload's file, or an archive upload's folder (``<id>/model.onnx``). The path
    comes from the database: checked, not trusted, like a job's folder."""
    if path.parent.resolve() == uploads_dir:
        path.unlink(missing_ok=True)
    elif path.parent.parent.resolve() == uploads_dir and not path.parent.is_symlink():
        onnx_archive.remove(path.parent)
