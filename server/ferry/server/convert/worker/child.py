"""The conversion child process: ``python -m ferry.server.convert.worker.child --job JOB.json
(--progress-fd N | --progress-file PATH)``.

One process per job, so that torch, its memory peak and any code a permitted ``.pt2`` or TorchScript
file runs stay out of the serving process, and the parent can bound it with rlimits and a timeout.

Protocol with the parent:
- progress: one ``spec.ProgressEvent`` JSON object per line on the progress channel, flushed each
  line; stages come in pipeline order, every stage announced (skipped ones say so). On success the
  last event has fraction ``FINAL_FRACTION`` (0.95; publishing is the parent's), on failure it names
  the failing stage and carries ``error_kind`` (an ``ErrorKind`` value) and a message saying what to
  do.
- files: ``model.onnx`` and ``report.json`` in ``job.work_dir`` on success; on failure only
  ``report.json`` (with an ``error`` section). Nothing is written outside work_dir: temporary files
  of every library go to ``work_dir/.scratch``, removed at the end, and so does anything written
  relative to the working directory (the child runs there). onnxruntime's telemetry (a device id
  and an SQLite database under the cache folder, a ``.ses`` file in the temp folder) is switched
  off. The source is read through a link in scratch, never in the uploads folder: onnxruntime's
  quantizer writes ``<model>-inferred.onnx`` next to its input, and two jobs of one upload would
  race on that file.
- exit status: 0 success, 2 a domain failure (the last event says which), 1 a crash (traceback on
  stderr). stdout is redirected to stderr at the file-descriptor level, so exporter chatter can
  never corrupt the progress channel, even when the parent passed fd 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from ferry.server.convert.out_of_memory import exceeded, is_out_of_memory, memory_limit
from ferry.server.convert.spec import Job, ProgressEvent, job_from_json, to_json
from ferry.server.errors import ErrorKind, FerryError

if TYPE_CHECKING:
    from ferry.server.convert.worker.report import Report

EXIT_OK, EXIT_CRASH, EXIT_FAILED = 0, 1, 2


class Progress:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def emit(self, event: ProgressEvent) -> None:
        self._stream.write(to_json(event) + "\n")
        self._stream.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ferry.server.convert.worker.child")
    job = parser.add_mutually_exclusive_group(required=True)
    job.add_argument("--job", help="the job as spec.Job JSON")
    job.add_argument(
        "--warm",
        action="store_true",
        help="import torch and prime the exporter first, then read the job's path from stdin",
    )
    parser.add_argument("--warm-ready", help="with --warm: a file to create once warmed up")
    parser.add_argument(
        "--warm-scratch", help="with --warm: the folder for the warm-up's files (the server's)"
    )
    channel = parser.add_mutually_exclusive_group(required=True)
    channel.add_argument("--progress-fd", type=int, help="an inherited, writable file descriptor")
    channel.add_argument("--progress-file", help="a file to append progress lines to (tests)")
    return parser.parse_args(argv)


def _open_progress(args: argparse.Namespace) -> Progress:
    """Open the channel before stdout is redirected: fd 1 may be the channel itself."""
    if args.progress_file:
        return Progress(open(args.progress_file, "a", encoding="utf-8"))
    fd = os.dup(args.progress_fd) if args.progress_fd == 1 else args.progress_fd
    return Progress(os.fdopen(fd, "w", encoding="utf-8"))


def _redirect_stdout() -> None:
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _confine_temp(work: Path) -> None:
    """Point every library's temporary and cache folders into work_dir (removed afterwards).

    Must run before onnxruntime or torch is imported: both read these variables at import.
    """
    # pipeline.SCRATCH, spelt out: importing pipeline would load onnxruntime too early.
    tmp = work / ".scratch" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # onnxruntime keeps a device id under XDG_CACHE_HOME; torch caches under TORCH_HOME.
    for variable in (
        "TMPDIR", "TEMP", "TMP", "XDG_CACHE_HOME", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
    ):  # fmt: skip
        os.environ[variable] = str(tmp)
    tempfile.tempdir = str(tmp)
    # onnxruntime >= 1.2x on Linux records telemetry at import: off, whatever the parent passed.
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    os.chdir(tmp)
    sys.dont_write_bytecode = True  # no .pyc files next to modules imported from here on


def _stage_source(job: Job, work: Path) -> None:
    """Point the job at a link to its source in a folder of its own inside scratch.

    Libraries write beside their input (the quantizer's ``-inferred.onnx``), and onnxruntime
    resolves a graph's relative paths against the model's folder: both must meet the job's own
    files, never the uploads folder. A hard link costs nothing on the repository's filesystem;
    elsewhere the file is copied. A missing source is left for the load stage to report."""
    source = Path(job.source_path)
    if not source.is_file():
        return
    folder = work / ".scratch" / "source"
    folder.mkdir(parents=True, exist_ok=True)
    job.source_path = str(folder / source.name)
    if job.source_format == "onnx_archive":
        # model.onnx comes with its data files (the folder's regular files, flat), copied: onnx
        # refuses to read external data through a hard link (it cannot tell one from a link
        # planted to reach another file). On filesystems that share blocks the copy is cheap.
        for entry in source.parent.iterdir():
            if entry.is_file() and not entry.is_symlink():
                shutil.copyfile(entry, folder / entry.name)
        return
    target = folder / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT in ``exc`` or what it was raised while handling (an exporter wraps
    the OSError), else None: a full disk crashed the child as a bug ("report it")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(exc: OSError) -> str:
    return (
        f"the disk holding the model repository is full ({exc.strerror}); nothing was "
        "published: free space and convert again"
    )


def _fail(work: Path, report: Report, stage: str, kind: str, message: str) -> None:
    """Leave no model behind, only the report so far with what went wrong: the server keeps it
    as the failed job's report (``jobs.JobRunner`` reads report.json whatever the outcome)."""
    from ferry.server.convert.worker.pipeline import SCRATCH
    from ferry.server.convert.worker.report import ErrorRecord
    from ferry.server.core.repository import MODEL_DATA_FILE, MODEL_FILE

    (work / MODEL_FILE).unlink(missing_ok=True)
    (work / MODEL_DATA_FILE).unlink(missing_ok=True)
    shutil.rmtree(work / SCRATCH, ignore_errors=True)
    report.error = ErrorRecord(stage, kind, message)
    report.published = None
    with contextlib.suppress(OSError):  # a full disk: the failure is still reported as an event
        report.write(work)


def run(job: Job, progress: Progress) -> int:
    from ferry.server.convert.worker.pipeline import STAGE_START, Pipeline

    work = Path(job.work_dir)
    pipeline = Pipeline(job, progress.emit)
    try:
        pipeline.run()
        return EXIT_OK
    except Exception as exc:
        failure = exc
    if is_out_of_memory(failure):
        # Whatever the stage made of it ("corrupt or truncated"...), it was the memory limit.
        error = exceeded(memory_limit())
        kind, message, code = error.kind.value, error.message, EXIT_FAILED
    elif (full := disk_full(failure)) is not None:
        kind, message, code = ErrorKind.LIMIT_EXCEEDED.value, disk_full_message(full), EXIT_FAILED
    elif isinstance(failure, FerryError):
        kind, message, code = failure.kind.value, failure.message, EXIT_FAILED
    else:
        traceback.print_exception(failure)
        kind = ErrorKind.INTERNAL.value
        message = (
            f"the conversion child crashed in stage {pipeline.stage}: "
            f"{type(failure).__name__}: {failure}"
        )
        code = EXIT_CRASH
    stage = pipeline.stage
    _fail(work, pipeline.report, stage, kind, message)
    progress.emit(ProgressEvent(stage, STAGE_START[stage], message, kind))
    return code


def _warm_up(folder: str | None) -> None:
    """Pay a job's fixed cost before the job exists: import torch and onnxruntime and export a
    tiny module once (the exporter's own first-use cost). Its temporary files go to a folder of
    its own, removed as soon as the warm-up ends: a warm process usually ends by a signal (it
    dies with the server), which no exit handler sees, and left one folder in the temporary
    directory per server start. The job's files are confined to the job's folder afterwards, as
    a cold child's are (``_confine_temp`` again). The server names the folder, and removes it
    too when it drops this process (a kill during the warm-up)."""
    scratch = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="ferry-warm-"))
    _confine_temp(scratch)
    try:
        _prime(scratch / "prime.onnx")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prime(path: Path) -> None:
    try:
        import torch

        import ferry.server.convert.worker.pipeline  # noqa: F401  (and onnxruntime, onnx)

        module = torch.nn.Linear(2, 2).eval()
        torch.onnx.export(module, (torch.zeros(1, 2),), str(path), dynamo=True)
    except Exception as exc:  # a job still runs; it pays what priming would have
        print(f"warming the conversion process failed: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    progress = _open_progress(args)
    _redirect_stdout()
    if args.warm:
        _warm_up(args.warm_scratch)
        if args.warm_ready:
            Path(args.warm_ready).touch()
        line = sys.stdin.readline().strip()
        if not line:  # the server went or dropped this process before giving it a job
            return EXIT_OK
        args.job = line
    try:
        job = job_from_json(Path(args.job).read_text(encoding="utf-8"))
        if not job.work_dir or not Path(job.work_dir).is_absolute():
            raise ValueError(f"work_dir must be an absolute path, got {job.work_dir!r}")
        work = Path(job.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        _confine_temp(work)
        _stage_source(job, work)
    except Exception as exc:  # the parent wrote a bad job: its bug, reported as a crash
        if (full := disk_full(exc)) is not None:  # not a bug: the source's copy did not fit
            progress.emit(
                ProgressEvent("load", 0.0, disk_full_message(full), ErrorKind.LIMIT_EXCEEDED.value)
            )
            return EXIT_FAILED
        traceback.print_exc()
        message = f"the conversion child could not read its job {args.job!r}: {exc}"
        progress.emit(ProgressEvent("load", 0.0, message, ErrorKind.INTERNAL.value))
        return EXIT_CRASH
    return run(job, progress)


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's shutdown: with torch, onnx and onnxruntime
    loaded (about 3,000 modules) it took 1.5-5 s after the job was done, and the server waits
    for the exit to end the job, so every conversion paid it. Nothing is lost: progress lines
    are flushed as they are written, report.json and the model are written and closed, the
    scratch folder is removed by ``run``, and the server keeps only a version's files of the
    work folder (``jobs.keep_version_files``) whatever else a library left there."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
