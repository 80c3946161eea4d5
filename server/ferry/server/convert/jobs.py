"""Running conversion jobs: a bounded queue, one child process per job, publication on success.

The child (``python -m ferry.server.convert.worker.child``) does everything that needs torch, in its own
session (process group) under an address-space limit, so a crash, a hang or a memory blow-up
costs one job and never the server. Its progress events arrive as JSON lines on a pipe; its
stdout and stderr go to the ``ferry.convert`` log. The job's work folder is a staging folder of
the repository, named when the job is queued (so ``job.json`` is written once, complete) and made
when it starts: on success it becomes the next version by one atomic rename, on any failure it
is removed, so the repository never holds anything partial.

How a child's end maps to the job (the kind then maps to a status through grpc/status.py):

==============================  ==========  ===============================================
child                           job         error kind
==============================  ==========  ===============================================
exit 0, model.onnx written      SUCCEEDED   (published; served once the registry loads it)
exit 0, graph does not load     FAILED      CONVERSION_FAILED (checked before publishing)
exit 2                          FAILED      the last event's error_kind (else
                                            CONVERSION_FAILED) and its message
exit 1 / other / signal         FAILED      INTERNAL ("crashed", with the child's own crash
                                            event or else its last stderr line);
                                            LIMIT_EXCEEDED when it ran out of memory
                                            (its output says so, or SIGKILL: the
                                            kernel's out-of-memory killer)
ran past the time limit         FAILED      DEADLINE_EXCEEDED ("timed out after N s")
CancelJob                       CANCELLED   CANCELLED
server stopped                  FAILED      UNAVAILABLE
==============================  ==========  ===============================================
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.server.convert import out_of_memory, publish, spec
from ferry.server.convert.child_env import child_environment
from ferry.server.convert.out_of_memory import text_says_out_of_memory
from ferry.server.convert.store import (
    EventRecord,
    JobRecord,
    JobState,
    JobStore,
    database_full,
)
from ferry.server.convert.summary import published_line
from ferry.server.core.config import load_config
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import (
    MODEL_DATA_FILE,
    MODEL_FILE,
    REPORT_FILE,
    ModelRepository,
    read_report,
)
from ferry.server.errors import (
    ErrorKind,
    FerryError,
    InternalError,
    LimitExceeded,
    QueueFull,
    Unavailable,
)

log = logging.getLogger("ferry.convert")

CHILD_MODULE = "ferry.server.convert.worker.child"
# onnxruntime's telemetry writes a device id and a database under the cache folder, which the
# child points into its scratch space; the child also switches it off itself.
CHILD_ENV = {"MALLOC_ARENA_MAX": "2", "PYTHONUNBUFFERED": "1", "ORT_DISABLE_TELEMETRY": "1"}
# What a child may leave (publish adds config.json): the model, its external data when it has
# any (models over 2 GiB), the report.
VERSION_FILES = (MODEL_FILE, MODEL_DATA_FILE, REPORT_FILE)
MAX_EVENT_LINE = 1 << 20
LOG_LINE = 1 << 16  # asyncio's default: a longer line of the child's output is skipped
# Progress events kept per job. The real child sends one per stage; a child that sent without
# end (code in a permitted code-bearing source writing to the channel, a loop gone wrong) grew
# the job database by a transaction per line, on the event loop, and every WatchJob replayed
# them all. Past this, progress lines are read and dropped; the job's end is always recorded.
MAX_EVENTS = 1000
STDERR_TAIL = 20
WARM_IDLE_S = 600.0  # a conversion process started ahead leaves after this long unused
WARM_REAP_S = 5.0  # at shutdown, how long a killed warm process is waited for
END_RETRY_S = 1.0  # a job's end the database refused is written again after this, doubling
END_RETRY_MAX_S = 60.0
# Once the child has exited, how long its pipes are read for what is left in them. A process it
# started in a session of its own (setsid: out of reach of the group kill) holds them open for
# as long as it lives; see ``_spawn``.
PIPES_DRAIN_S = 5.0
_KINDS = {k.value for k in ErrorKind}


@dataclass
class _Run:
    """What the runner knows about a job it started."""

    job_id: str
    model: str
    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None
    cancelled: bool = False
    publishing: bool = False
    last_error: tuple[str, str] | None = None  # (kind, message) of the child's failure event
    events: int = 0  # progress events recorded from the child (at most MAX_EVENTS)
    stderr: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL)
    )
    # Set once the first write of the job's end was tried (the child gone, its folders
    # removed), with what refused it: a cancel waits for this, not for the retries after it.
    end_tried: asyncio.Event = field(default_factory=asyncio.Event)
    end_refused: Exception | None = None


@dataclass
class _Outcome:
    state: JobState
    kind: str = ""
    message: str = ""


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        repository: ModelRepository,
        registry: ModelRegistry,
        *,
        max_concurrent: int = 1,
        max_queued: int = 16,
        timeout: float = 600.0,
        memory_bytes: int = 4 << 30,
        warm: bool = False,
    ) -> None:
        self.store = store
        self.repository = repository
        self.registry = registry
        self.max_concurrent = max(1, max_concurrent)
        self.max_queued = max(0, max_queued)
        self.timeout = timeout
        self.memory_bytes = memory_bytes
        # Tests point this at a stand-in child; the arguments after it are the contract's.
        self.child_command: list[str] = [sys.executable, "-m", CHILD_MODULE]
        self._default_child = list(self.child_command)
        # A conversion process started ahead of the next job (after a job: the first pays the
        # start itself), waiting with torch imported; one job per process all the same.
        self.warm = warm
        self._warm: _Warm | None = None
        self._dropped: list[asyncio.subprocess.Process] = []  # killed warm ones, to reap
        self._warm_task: asyncio.Task[None] | None = None
        self._pending: collections.deque[str] = collections.deque()
        self._runs: dict[str, _Run] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._closing = False
        self._stopping = asyncio.Event()  # set with _closing: wakes an end being retried
        self._tasks: set[asyncio.Task[None]] = set()
        # Models whose folder a job of this runner made (none existed when it started), until
        # the last of their running jobs ends: it removes the folder if that is still empty.
        self._made_models: set[str] = set()

    # ---- queue ----
    def submit(self, job_id: str) -> None:
        self.check_room()
        self._pending.append(job_id)
        self._pump()

    def check_room(self) -> None:
        if self._closing:
            raise Unavailable("the server is shutting down; convert again after it restarts")
        # A job waits only when every process is busy: with a free one it starts at once, so
        # --max-queued-conversions 0 (no waiting) refused every job, an idle server's too.
        if len(self._pending) >= self.max_queued and len(self._runs) >= self.max_concurrent:
            raise QueueFull(
                f"the conversion queue is full ({len(self._pending)} jobs waiting, server "
                "setting --max-queued-conversions); retry when a job has finished"
            )

    def _pump(self) -> None:
        while self._pending and len(self._runs) < self.max_concurrent and not self._closing:
            job = self.store.get_job(self._pending.popleft())
            run = self._runs[job.job_id] = _Run(job.job_id, job.model)
            run.task = asyncio.get_running_loop().create_task(
                self._run(run), name=f"job-{job.job_id}"
            )
            self._tasks.add(run.task)  # until its end is recorded, after it left _runs
            run.task.add_done_callback(self._tasks.discard)

    async def cancel(self, job_id: str) -> JobRecord:
        """Kill the job's child and wait until its folders are gone; a finished job is returned
        as it is."""
        job = self.store.get_job(job_id)
        if job.state.terminal:
            return job
        if job_id in self._pending:
            self._end(
                job,
                _Outcome(
                    JobState.CANCELLED, ErrorKind.CANCELLED.value, "cancelled before it started"
                ),
            )  # first: refused (a full disk), the job stays queued rather than QUEUED for ever
            self._pending.remove(job_id)
            return self.store.get_job(job_id)
        run = self._runs.get(job_id)
        if run is not None and run.task is not None:
            if not run.publishing:
                run.cancelled = True
                _kill(run.proc)
            # Not the whole task: with the job database refusing writes, the end's retries
            # held the call until the client's deadline. The task itself, should it end
            # before any write was tried (and unlike a shield, a caller leaving stops neither).
            tried = asyncio.ensure_future(run.end_tried.wait())
            try:
                await asyncio.wait({tried, run.task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                tried.cancel()
            refused = run.end_refused
            if refused is not None and not self.store.get_job(job_id).state.terminal:
                if database_full(refused):
                    raise LimitExceeded(
                        "the job was stopped, but the server's state disk is full: the job "
                        "database could not record its end, which is recorded once the "
                        "operator frees space on the disk of the state folder (--state-dir)"
                    )
                raise refused
        return self.store.get_job(job_id)

    async def close(self) -> None:
        """Server shutdown: queued jobs fail at once, running children are killed."""
        self._closing = True
        self._stopping.set()
        while self._pending:
            job = self.store.get_job(self._pending.popleft())
            self._end(
                job,
                _Outcome(
                    JobState.FAILED,
                    ErrorKind.UNAVAILABLE.value,
                    "the server stopped before the job ran; convert again",
                ),
            )
        starting = self._warm_task
        if starting is not None and not starting.done():
            await asyncio.gather(starting, return_exceptions=True)  # it drops what it started
        self._drop_warm()
        # Reaped here, while the loop runs: a killed process left to the garbage collector
        # closes its transport on a loop that has gone ("Event loop is closed" at exit).
        for proc in self._dropped:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await asyncio.wait_for(proc.wait(), WARM_REAP_S)
        self._dropped.clear()
        runs = list(self._runs.values())
        for run in runs:
            if not run.publishing:
                _kill(run.proc)
        tasks = list(self._tasks)  # the runs, and the ends still being recorded
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- events ----
    def _notify(self, job_id: str) -> None:
        changed = self._changed.pop(job_id, None)
        if changed is not None:
            changed.set()

    async def watch(self, job_id: str) -> AsyncIterator[EventRecord]:
        """Every event so far, then live ones, until the job's terminal event."""
        last = 0
        while True:
            # Nothing awaits between reading the store and taking the wake-up, so an event
            # appended meanwhile cannot be missed; a finished job takes no wake-up at all.
            terminal = self.store.get_job(job_id).state.terminal  # NOT_FOUND on the first pass
            events = self.store.events(job_id, after=last)
            changed = None if terminal else self._changed.setdefault(job_id, asyncio.Event())
            for event in events:
                last = event.seq
                yield event
            if changed is None:
                return
            if not events:
                await changed.wait()

    # ---- one job ----
    async def _run(self, run: _Run) -> None:
        job = self.store.get_job(run.job_id)
        try:
            outcome, version, report = await self._convert(run, job)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # Not a bug: the operator's disk is full. Say so, with what to do.
                kind = ErrorKind.LIMIT_EXCEEDED.value
                msg = (
                    f"the disk holding the model repository is full ({exc.strerror}); nothing "
                    "was published: free space and convert again"
                )
                log.error("conversion job %s: %s", job.job_id, msg)
            elif database_full(exc):
                # The job database could not record the job's progress: the state disk.
                kind = ErrorKind.LIMIT_EXCEEDED.value
                msg = (
                    "the server's state disk is full (the job database could not grow); nothing "
                    "was published: the operator must free space on the disk of the state folder "
                    "(--state-dir), then convert again"
                )
                log.error("conversion job %s: %s", job.job_id, msg)
            elif isinstance(exc, FerryError) and exc.kind is not ErrorKind.INTERNAL:
                # A refusal with its reason (a converted model that does not load, a publish
                # the repository refuses): the job says why; no traceback for it.
                log.warning("conversion job %s failed: %s", job.job_id, exc.message)
                kind, msg = exc.kind.value, exc.message
            else:
                log.exception("conversion job %s failed unexpectedly", job.job_id)
                kind = exc.kind.value if isinstance(exc, FerryError) else ErrorKind.INTERNAL.value
                msg = exc.message if isinstance(exc, FerryError) else f"{type(exc).__name__}: {exc}"
            outcome, version, report = _Outcome(JobState.FAILED, kind, msg), 0, ""
        finally:
            self._runs.pop(run.job_id, None)
        if not self._closing:
            self._pump()  # first: the slot is free whatever recording the end costs
        await self._record_end(run, outcome, version, report)

    async def _record_end(self, run: _Run, outcome: _Outcome, version: int, report: str) -> None:
        """Record the job's end, retried while the database refuses (a full disk): one failed
        write left the job RUNNING for good (a published version included), its watchers
        waiting for ever and every queued job behind it QUEUED. At shutdown it gives up; the
        next start settles the job (interrupted, or published: ``publish.note_publishing``)."""
        job_id = run.job_id
        delay = END_RETRY_S
        while True:
            try:
                self._end(self.store.get_job(job_id), outcome, version=version, report=report)
                run.end_refused = None
                run.end_tried.set()
                return
            except Exception as exc:  # logged: the job must still end
                run.end_refused = exc
                run.end_tried.set()
                if self._closing:
                    log.error("conversion job %s: its end was not recorded: %s", job_id, exc)
                    return
                log.error(
                    "conversion job %s: its end (%s) could not be recorded (%s); retrying in %g s",
                    job_id,
                    outcome.state.value,
                    exc,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, END_RETRY_MAX_S)

    async def _convert(self, run: _Run, job: JobRecord) -> tuple[_Outcome, int, str]:
        if not self.repository.has_model(job.model):
            self._made_models.add(job.model)
        try:
            with self.repository.staging(job.model, staging_key(job.job_id)) as staged:
                job_json = Path(job.job_dir) / "job.json"  # written once, when it was queued
                contract = spec.job_from_json(job_json.read_text())
                if contract.work_dir != str(staged):
                    raise InternalError(
                        f"job {job.job_id}'s contract names staging folder {contract.work_dir!r}, "
                        f"the runner staged {str(staged)!r}"
                    )
                self.store.start(job.job_id, "conversion process started")
                self._notify(job.job_id)
                outcome = await self._run_child(run, job_json, Path(job.job_dir))
                stray = await asyncio.to_thread(keep_version_files, staged)
                if stray:
                    log.info("job %s: removed from the staging folder: %s", job.job_id, stray)
                report = read_report(staged)
                if outcome.state is not JobState.SUCCEEDED:
                    return outcome, 0, report
                # Everything the job's result says is worked out before the version exists:
                # once publish returns, the version serves, and nothing may then fail the job
                # (a summary that raised on a null figure said FAILED for a serving version,
                # and each retry published another).
                summary = published_line(report)
                run.publishing = True
                self.store.append_event(job.job_id, "publish", 0.98, "publishing the new version")
                self._notify(job.job_id)
                config = batching_of_published(
                    contract.spec.serving_config,
                    report,
                    model_states_batch=self._model_states_batch(job.model),
                    job_batch=contract.spec.max_batch_size,
                )
                await asyncio.to_thread(publish.note_publishing, Path(job.job_dir), staged)
                version, note = await publish.publish(
                    self.repository,
                    self.registry,
                    job.model,
                    staged,
                    config,
                    rollout=contract.spec.rollout,
                    rollout_fraction=contract.spec.rollout_fraction,
                    by=f"conversion job {job.job_id}",
                )
                message = f"published as {job.model} version {version}{note}"
                message += f": {summary}" if summary else ""
                return _Outcome(JobState.SUCCEEDED, "", message), version, report
        finally:
            # A failed first conversion must not leave an empty model folder behind; rmdir
            # only removes an empty one, and only when no other job is using it. Made by
            # whichever job ran first, the folder is judged by the last to end: a job that
            # found it made by another's had left it, empty, after both failed.
            others = any(r.model == job.model for r in self._runs.values() if r is not run)
            if job.model in self._made_models and not others:
                self._made_models.discard(job.model)
                with contextlib.suppress(OSError):
                    self.repository.model_dir(job.model).rmdir()

    async def _spawn(
        self, args: list[str], cwd: Path, *, stdin: int
    ) -> tuple[asyncio.subprocess.Process, _Pipes]:
        """A conversion process (limited, killed with the server) and the read ends of its
        progress channel, stdout and stderr.

        Pipes of our own, not asyncio's: ``Process.wait()`` returns only once the process has
        exited *and* every pipe asyncio made for it has closed. A process the child started
        in a session of its own (out of reach of the group kill) held them open, and the job
        stayed RUNNING for as long as that process lived: for good for a daemon, past
        --conversion-timeout (which then said "timed out" of a child that had exited) and
        CancelJob."""
        pipes = [os.pipe() for _ in range(3)]
        (progress_r, progress_w), (out_r, out_w), (err_r, err_w) = pipes
        try:
            proc = await asyncio.create_subprocess_exec(
                *limited(self.memory_bytes, self.child_command),
                *args,
                "--progress-fd",
                str(progress_w),
                pass_fds=(progress_w,),
                stdin=stdin,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
                cwd=cwd,
                env=child_environment(CHILD_ENV),
            )
        except BaseException:
            for read_fd, _ in pipes:
                os.close(read_fd)
            raise
        finally:
            for _, write_fd in pipes:
                os.close(write_fd)
        return proc, _Pipes(progress_r, out_r, err_r)

    def _warm_allowed(self) -> bool:
        # A stand-in child (tests) knows no --warm: only the real one is started ahead.
        return self.warm and not self._closing and self.child_command == self._default_child

    def _prepare_warm(self) -> None:
        if not self._warm_allowed() or self._warm is not None:
            return
        if self._warm_task is not None and not self._warm_task.done():
            return
        self._warm_task = asyncio.get_running_loop().create_task(self._start_warm())

    async def _start_warm(self) -> None:
        ready = Path(tempfile.gettempdir()) / f"ferry-warm-{os.getpid()}-{id(self)}.ready"
        ready.unlink(missing_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="ferry-warm-"))
        try:
            proc, pipes = await self._spawn(
                ["--warm", "--warm-ready", str(ready), "--warm-scratch", str(scratch)],
                Path(tempfile.gettempdir()),
                stdin=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            log.warning("could not start a conversion process ahead: %s", exc)
            return
        self._warm = _Warm(proc, pipes, ready, scratch)
        if self._closing:
            self._drop_warm()
            return
        # Idle for long, it goes: a warm child holds torch's memory.
        asyncio.get_running_loop().call_later(WARM_IDLE_S, self._expire_warm, proc)

    def _expire_warm(self, proc: asyncio.subprocess.Process) -> None:
        if self._warm is not None and self._warm.proc is proc:
            self._drop_warm()

    def _drop_warm(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            _kill(warm.proc)
            self._dropped = [p for p in self._dropped if p.returncode is None] + [warm.proc]
            warm.pipes.close()
            warm.ready.unlink(missing_ok=True)
            # Killed during its warm-up, it could not remove its folder itself.
            shutil.rmtree(warm.scratch, ignore_errors=True)

    async def _take_warm(self) -> _Warm | None:
        """The process started ahead, if it has finished warming up (its ready file); else
        None, and the job starts a process of its own: a source that needs no torch (ONNX)
        starts in half a second, quicker than waiting out a warm-up."""
        if not self._warm_allowed() or self._warm is None:
            return None
        if self._warm.proc.returncode is not None or self._warm.proc.stdin is None:
            self._drop_warm()
            return None
        if not await asyncio.to_thread(self._warm.ready.exists):
            return None  # still warming: it stays for a later job
        warm, self._warm = self._warm, None
        warm.ready.unlink(missing_ok=True)
        return warm

    def _model_states_batch(self, model: str) -> bool:
        """Whether the model's own config states batching.max_batch_size (then it decides)."""
        try:
            return load_config(self.repository.model_dir(model)).batching.max_batch_size is not None
        except FerryError:
            return True  # unreadable: write nothing that might override what it meant

    async def _run_child(self, run: _Run, job_json: Path, job_dir: Path) -> _Outcome:
        try:
            return await self._run_child_once(run, job_json, job_dir)
        finally:
            self._prepare_warm()  # for the next job, while this server is idle again

    async def _run_child_once(self, run: _Run, job_json: Path, job_dir: Path) -> _Outcome:
        warm = await self._take_warm()
        if warm is not None:
            assert warm.proc.stdin is not None
            run.proc, pipes = warm.proc, warm.pipes
            warm.proc.stdin.write(f"{job_json}\n".encode())
            with contextlib.suppress(ConnectionError):
                await warm.proc.stdin.drain()
            warm.proc.stdin.close()
        else:
            run.proc, pipes = await self._spawn(
                ["--job", str(job_json)], job_dir, stdin=asyncio.subprocess.DEVNULL
            )
        proc = run.proc
        if run.cancelled:  # CancelJob arrived while the process was being created
            _kill(proc)
        readers = [
            asyncio.create_task(self._read_progress(run, pipes.progress)),
            asyncio.create_task(_log_lines(pipes.stdout, run, "stdout")),
            asyncio.create_task(_log_lines(pipes.stderr, run, "stderr")),
        ]
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), self.timeout if self.timeout > 0 else None)
        except TimeoutError:
            timed_out = True
        finally:
            _kill(proc)  # the whole group: nothing the child started outlives it
            await proc.wait()
            _, held = await asyncio.wait(readers, timeout=PIPES_DRAIN_S)
            if held:
                log.warning(
                    "conversion job %s: a process its conversion process started left the "
                    "process group and still holds its output open; no longer read",
                    run.job_id,
                )
                for reader in held:
                    reader.cancel()  # each closes its pipe
            await asyncio.gather(*readers, return_exceptions=True)
        return self._judge(run, proc.returncode, timed_out)

    def _judge(self, run: _Run, rc: int | None, timed_out: bool) -> _Outcome:
        tail = next((line for line in reversed(run.stderr) if line.strip()), "")
        if run.cancelled:
            return _Outcome(JobState.CANCELLED, ErrorKind.CANCELLED.value, "cancelled by request")
        if self._closing:
            return _Outcome(
                JobState.FAILED,
                ErrorKind.UNAVAILABLE.value,
                "the server stopped during the job; convert again",
            )
        if timed_out:
            return _Outcome(
                JobState.FAILED,
                ErrorKind.DEADLINE_EXCEEDED.value,
                f"timed out after {self.timeout:g} s (server setting --conversion-timeout); "
                "raise it for large models",
            )
        if rc == 0:
            return _Outcome(JobState.SUCCEEDED)
        if rc == 2:
            kind, message = run.last_error or ("", "")
            kind = kind if kind in _KINDS else ErrorKind.CONVERSION_FAILED.value
            return _Outcome(JobState.FAILED, kind, message or tail or "conversion failed")
        said = run.last_error[1] if run.last_error else ""  # a crashing child says where
        if any(text_says_out_of_memory(text) for text in (tail, said)):
            return _Outcome(
                JobState.FAILED,
                ErrorKind.LIMIT_EXCEEDED.value,
                out_of_memory.exceeded(self.memory_bytes).message,
            )
        if rc == -signal.SIGKILL:  # not ours: cancel, timeout and shutdown were judged above
            return _Outcome(
                JobState.FAILED,
                ErrorKind.LIMIT_EXCEEDED.value,
                "the conversion process was killed (SIGKILL), which is what the kernel's "
                "out-of-memory killer does when the machine or its container runs out of memory "
                "before the process reaches its own limit; "
                + out_of_memory.exceeded(self.memory_bytes).message,
            )
        how = f"exit code {rc}" if rc is None or rc >= 0 else f"signal {signal.Signals(-rc).name}"
        detail = f": {(said or tail)[:500]}" if said or tail else ""
        # Its output is logged at DEBUG as it comes (torch and onnxruntime talk a lot); the
        # message below sends the reader to the log, so the tail that explains a crash is
        # logged where the default level shows it.
        log.warning(
            "conversion job %s: the conversion process crashed (%s); its last output:\n%s",
            run.job_id,
            how,
            "\n".join(run.stderr) or "(none)",
        )
        return _Outcome(
            JobState.FAILED,
            ErrorKind.INTERNAL.value,
            f"the conversion process crashed ({how}){detail}; the server log "
            "(ferry.convert) has its output",
        )

    async def _read_progress(self, run: _Run, fd: int) -> None:
        reader, transport = await pipe_reader(fd, MAX_EVENT_LINE)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # an over-long line: skip what is buffered
                    continue
                if not line:
                    return
                event = _parse_event(line, run.job_id)
                if event is None:
                    continue
                if event.error_kind:
                    run.last_error = (event.error_kind, event.message)
                    continue
                if run.cancelled or self._closing:
                    continue
                if run.events >= MAX_EVENTS:
                    if run.events == MAX_EVENTS:
                        log.warning(
                            "job %s: its conversion process sent over %d progress events; the "
                            "rest are dropped",
                            run.job_id,
                            MAX_EVENTS,
                        )
                        run.events += 1
                    continue
                run.events += 1
                stage = event.stage if event.stage in spec.STAGES else "convert"
                fraction = min(max(float(event.fraction), 0.0), 0.97)
                self.store.append_event(run.job_id, stage, fraction, event.message[:2000])
                self._notify(run.job_id)
        finally:
            transport.close()

    def _end(
        self, job: JobRecord, outcome: _Outcome, *, version: int = 0, report: str = ""
    ) -> None:
        if outcome.state is JobState.SUCCEEDED:
            stage, fraction, message = "done", 1.0, outcome.message
        else:
            stage, fraction, message = job.stage, job.fraction, outcome.message
        self.store.finish(
            job.job_id,
            outcome.state,
            stage=stage,
            fraction=fraction,
            message=message,
            version=version,
            error_kind=outcome.kind,
            error_message=outcome.message if outcome.kind else "",
            report_json=report,
        )
        if job.job_dir:
            shutil.rmtree(job.job_dir, ignore_errors=True)
        level = logging.INFO if outcome.state is JobState.SUCCEEDED else logging.WARNING
        log.log(
            level,
            "conversion job %s (%s): %s %s",
            job.job_id,
            job.model,
            outcome.state.value,
            message,
        )
        self._notify(job.job_id)


def staging_key(job_id: str) -> str:
    """The job's staging folder inside its model folder (``ModelRepository.staging_path``)."""
    return f"job-{job_id}"


def batching_of_published(
    config: dict[str, Any], report: str, *, model_states_batch: bool = False, job_batch: int = 0
) -> dict[str, Any]:
    """The version's serving config, with the batch the conversion found:

    * ``max_batch_size 0`` when the child found that samples depend on each other (report
      ``rows_apart`` false), unless the job's serving config states a batch. Left to the
      load-time probe, a model whose rows mix in a way the probe's rows do not show (a segment
      mean over rows sharing an id) was served batched although the conversion had seen it;
      a model config's batch would have batched it too.
    * ``combine_requests false`` for a dynamically quantized variant (unless the job's serving
      config says otherwise), with the job's ``max_batch_size`` where no config states one:
      its activations share one quantization scale per run, set by the run's largest value,
      so batched with other requests one caller's answer moved with what others sent (an
      MLP's output -3.73 alone, 1.50 beside a row 100 times larger; fp32 gives -3.75). Each
      request runs alone, its interface (the batch dimension, the rows a request may carry)
      the same as the version it is compared or split with."""
    try:
        doc = json.loads(report) if report else {}
        apart, published = doc.get("rows_apart"), str(doc.get("published") or "")
    except (ValueError, AttributeError):
        apart, published = None, ""
    batching = config.get("batching")
    batching = dict(batching) if isinstance(batching, dict) else {}
    if apart is False:
        if "max_batch_size" in batching:  # the job's own word
            return config
        return {**config, "batching": {**batching, "max_batch_size": 0}}
    if apart is True and "dynamic" in published:
        batching.setdefault("combine_requests", False)
        if "max_batch_size" not in batching and not model_states_batch and job_batch > 1:
            batching["max_batch_size"] = job_batch
        return {**config, "batching": batching}
    return config


def keep_version_files(staged: Path) -> list[str]:
    """Remove everything but the child's regular model.onnx and report.json; return the names.

    Runs before the server reads anything from the folder: whatever a library (or code in a
    permitted code-bearing source) left there — telemetry, caches, profiles, a symlink dressed
    as report.json — never reaches the server or a published version."""
    removed = []
    for entry in sorted(staged.iterdir()):
        if entry.name in VERSION_FILES and entry.is_file() and not entry.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def _parse_event(line: bytes, job_id: str) -> spec.ProgressEvent | None:
    try:
        raw = json.loads(line)
        return spec.ProgressEvent(
            stage=str(raw.get("stage", "")),
            fraction=float(raw.get("fraction", 0.0)),
            message=str(raw.get("message", "")),
            error_kind=str(raw.get("error_kind", "") or ""),
        )
    except (ValueError, TypeError, AttributeError):
        log.warning("job %s: ignoring a malformed progress line: %r", job_id, line[:200])
        return None


async def pipe_reader(fd: int, limit: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A stream reading the pipe ``fd`` (which its transport now owns and closes)."""
    reader = asyncio.StreamReader(limit=limit)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


async def _log_lines(fd: int, run: _Run, name: str) -> None:
    stream, transport = await pipe_reader(fd, LOG_LINE)
    try:
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if name == "stderr":
                run.stderr.append(text)
            # torch and onnxruntime talk a lot while converting: their output is DEBUG; what a
            # user needs (progress, the failure and its reason) comes through the events.
            log.debug("job %s %s: %s", run.job_id, name, text)
    finally:
        transport.close()


@dataclass
class _Pipes:
    """The read ends of a conversion process's pipes, until its readers take them."""

    progress: int
    stdout: int
    stderr: int

    def close(self) -> None:
        for fd in (self.progress, self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class _Warm:
    proc: asyncio.subprocess.Process
    pipes: _Pipes
    ready: Path  # the process creates it once warmed up
    scratch: Path  # its warm-up's files; it removes the folder when the warm-up ends


def _kill(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# Sets the address-space limit and asks the kernel to SIGKILL the child if the server dies
# (PR_SET_PDEATHSIG: a SIGKILLed server must not leave a conversion running on), then becomes
# the child. Not a preexec_fn: that forces a plain fork() of this multi-threaded gRPC process,
# and gRPC's threads do not survive it (children aborted in gRPC's epoll poller before reaching
# exec). A launcher keeps spawning fork-free.
_LAUNCHER = (
    "import ctypes, os, resource, signal, sys\n"
    "n, ppid = int(sys.argv[1]), int(sys.argv[2])\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != ppid:\n"
    "    os._exit(1)\n"
    "if n > 0:\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (n, n))\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def limited(limit: int, command: list[str]) -> list[str]:
    return [sys.executable, "-c", _LAUNCHER, str(limit), str(os.getpid()), *command]
