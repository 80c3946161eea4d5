"""The conversion client: upload a model, convert it into a served ONNX version, follow the job.

>>> with ConversionClient("127.0.0.1:8003") as conv:                       # doctest: +SKIP
...     up = conv.upload("mlp", "mlp.pt", architecture="mlp", architecture_kwargs={"in_features": 64, "hidden": [256], "out_features": 10})
...     job = conv.convert(up, inputs=[InputSpec("input", "FP32", [-1, 64])],
...                        quantization=Quantization("dynamic_int8")).wait()
...     job.version
1

Uploads and conversions are never retried: running one twice is not harmless. torch is touched
only when an ``nn.Module`` is passed, and then only through ``sys.modules`` (the caller already
imported it), so this module stays importable without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from ferry.client._archive import ARCHIVE_FORMAT, external_locations, pack_folder, pack_model
from ferry.client._channel import TLSConfig
from ferry.client._conversion_types import (
    DynamicAxis,
    InputSpec,
    ModelInfo,
    ProgressEvent,
    Pruning,
    Quantization,
    Report,
    Serving,
    Upload,
    Validation,
    build_spec,
    format_name,
    format_value,
    parse_event,
    parse_model,
    parse_report,
    parse_upload,
)
from ferry.client._errors import (
    ConnectionError_,
    ConversionError,
    DeadlineExceededError,
    InvalidInputError,
    UnavailableError,
)
from ferry.client._management import ManagementClient
from ferry.client._module_upload import from_module
from ferry.client._requests import check_timeout, request, status_code
from ferry.proto.v1 import model_conversion_pb2 as pb
from ferry.proto.v1 import model_conversion_pb2_grpc as pb_grpc

MiB = 1 << 20
# One upload message's bytes at most: a chunk goes as one gRPC message, under the channel's
# and the server's message limits (80 MiB by default), and is held in memory while it goes.
MAX_CHUNK = 64 * MiB
PAGE_MAX = 10_000  # records the server answers at most per listing page
SUFFIX_FORMATS = {
    ".pt": "state_dict",
    ".pth": "state_dict",
    ".safetensors": "safetensors",
    ".onnx": "onnx",
    ".pt2": "exported_program",
    ".tar": "onnx_archive",
}
FORMATS = ("state_dict", "safetensors", "onnx", "exported_program", "torchscript", "onnx_archive")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
Source = str | os.PathLike[str] | bytes | Any  # a path, the file's bytes, or an nn.Module
Progress = bool | Callable[[ProgressEvent], None] | None
Payload = bytes | memoryview | Path  # what upload() sends: a buffer (never copied whole) or a file
# Seconds between watches of a job whose watch ends at once without its end: first, most.
_RESUME_PAUSE = (0.1, 5.0)


class JobFailedError(ConversionError):
    """A conversion job ended FAILED or CANCELLED. ``code`` and ``kind`` are the job's error (an
    unknown architecture is INVALID_ARGUMENT, a missed accuracy budget FAILED_PRECONDITION);
    ``job`` is the final job and ``report`` its report, when the job got that far."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"conversion job {job.id} of {job.model!r} {job.state}: {job.error_message}",
            code=job.error_code,
            kind=job.error_kind,
        )
        self.job = job
        self.report = job.report

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its job (which pickles without its client): the default rebuilt it
        from its message, as if that were the job, and failed."""
        return (type(self), (self.job,))


@dataclass(eq=False)
class Job:
    """A conversion job, as last seen; ``refresh``, ``wait`` and ``cancel`` update it in place."""

    id: str
    model: str
    state: str  # QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    version: int | None = None  # the published version, once SUCCEEDED
    upload_id: str = ""
    format: str = ""
    source_sha256: str = ""
    error_code: grpc.StatusCode | None = None
    error_kind: str = ""
    error_message: str = ""
    report: Report | None = None
    report_json: str = field(default="", repr=False)
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    _client: ConversionClient | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its client, whose channel cannot travel to another process: a copy
        there reads as the job did and says it is not bound when asked to refresh."""
        return {**self.__dict__, "_client": None}

    def __copy__(self) -> Job:
        """A copy in this process keeps its client (a pickled one cannot)."""
        return dataclasses.replace(self)

    def _conn(self) -> ConversionClient:
        if self._client is None:
            raise InvalidInputError("this Job is not bound to a client")
        return self._client

    def _update(self, other: Job) -> Job:
        for name in self.__dataclass_fields__:
            if name != "_client":
                setattr(self, name, getattr(other, name))
        return self

    def refresh(self) -> Job:
        return self._update(self._conn().job(self.id))

    def events(self, *, timeout: float | None = None) -> Iterator[ProgressEvent]:
        """Every event so far, then live ones; ends when the job has ended.

        A watch that ends cleanly before its job did (a proxy or load balancer closing a long
        stream, a server restart) is watched again, within ``timeout``, giving only the events
        not given yet: ending there made ``wait()`` read a RUNNING job and raise that it failed.
        """
        return self._events(self._conn(), check_timeout(timeout))

    def _events(self, client: ConversionClient, timeout: float | None) -> Iterator[ProgressEvent]:
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = -1
        pause = _RESUME_PAUSE[0]
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceededError(
                    f"conversion job {self.id} had not ended within the {timeout:g} s timeout",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            fresh = False
            for event in client.watch(self.id, timeout=left):
                if event.seq > seen:
                    seen, fresh = event.seq, True
                    yield event
                if event.state in TERMINAL:
                    # The job's end, which the server sends last: asking again after it
                    # failed as a stopping server's listener closed (the end it sent was
                    # that the server stopped), and the caller heard UNAVAILABLE instead.
                    return
            # The server ends a watch at the job's end; anything else ended it early. Ask.
            left = None if deadline is None else deadline - time.monotonic()
            asked = request(pb.GetJobRequest, job_id=self.id)
            now = client._call(client._stub.GetJob, asked, _short(client.timeout, left))
            if client._job(now).done:
                return
            if fresh:  # it ran a while: resume at once, and pause anew if it ends at once
                pause = _RESUME_PAUSE[0]
                continue
            if left is not None:
                pause = min(pause, max(left, 0.0))
            time.sleep(pause)  # it ends at once: not a busy loop against the server
            pause = min(pause * 2, _RESUME_PAUSE[1])

    def cancel(self) -> Job:
        """Kill the job; returns once nothing of it remains (a finished job is unchanged)."""
        return self._update(self._conn().cancel(self.id))

    def wait(self, timeout: float | None = None, progress: Progress = None) -> Job:
        """Block until the job ends; return it when it SUCCEEDED, raise ``JobFailedError`` (a
        ``ConversionError``) otherwise. ``progress``: None draws a bar when stderr is a
        terminal, True always, False never; a callable receives every event instead."""
        timeout = check_timeout(timeout)
        if progress is None:
            progress = sys.stderr.isatty()
        bar = _Bar(sys.stderr) if progress is True else None
        last: ProgressEvent | None = None
        try:
            if not self.done:
                for event in self.events(timeout=timeout):
                    last = event
                    if bar is not None:
                        bar.show(event)
                    elif callable(progress):
                        progress(event)
        finally:
            if bar is not None:
                bar.close()
        try:
            self.refresh()
        except (ConnectionError_, UnavailableError):
            if last is None or last.state not in TERMINAL or last.state == "SUCCEEDED":
                raise  # a success needs its version and report, which only the job has
            # A server stops by failing its running jobs, sends each watch that end, and closes:
            # the end it sent is the answer ("the server stopped during the job"), not the
            # UNAVAILABLE of the refresh that came after it.
            self._ended_as(last)
        if not self.succeeded:
            raise JobFailedError(self)
        return self

    def _ended_as(self, event: ProgressEvent) -> None:
        """The job as its terminal event says it ended (FAILED or CANCELLED)."""
        self.state, self.stage, self.fraction = event.state, event.stage, event.fraction
        self.message = self.error_message = event.message
        self.error_kind = event.error_kind
        self.finished = event.time or None


class _Bar:
    """One line, redrawn: ``[#######.............]  35% export: message``."""

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.drawn = False

    def show(self, event: ProgressEvent) -> None:
        filled = round(min(max(event.fraction, 0.0), 1.0) * self.width)
        text = f"{event.stage}: {event.message}"[:60]
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {event.fraction:4.0%} {text:<60}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


class ConversionClient(ManagementClient):
    """Client of the management listener's ``ModelConversion`` service (loopback by default).

    ``timeout`` bounds each short call; uploads and waits take their own (no deadline unless
    given), since a large model or a long conversion has no sensible default bound.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:8003",
        *,
        timeout: float | None = 60.0,
        tls: TLSConfig | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target, timeout=timeout, tls=tls, token=token, credentials=credentials, options=options
        )
        self._stub = pb_grpc.ModelConversionStub(self._channel)

    # ---- upload ----
    def upload(
        self,
        name: str,
        source: Source,
        *,
        format: str | None = None,
        architecture: str | None = None,
        architecture_kwargs: Mapping[str, Any] | None = None,
        description: str = "",
        example_inputs: Any = None,
        dynamic_axes: Mapping[str, Mapping[int, DynamicAxis | str]] | None = None,
        chunk_size: int = MiB,
        opset: int = 20,
        timeout: float | None = None,
    ) -> Upload:
        """Upload a file (path or bytes) or an ``nn.Module`` for model ``name``.

        A module needs ``example_inputs``: a tensor, a tuple of positional tensors, a dict
        parameter name -> tensor (any order; parameters left out keep their defaults), or
        torch.export's ``(args, kwargs)``. They bind to ``forward()`` by name, exactly as
        ``module(*args, **kwargs)`` would, and the served inputs are named after forward's
        parameters. With an ``architecture`` its state_dict is sent; without one it is exported
        to ONNX here, and the graph's input names are checked against the bound names. Either
        way the module's own outputs on the examples (from that same call, not from the export)
        travel with the upload, and ``convert`` has the server validate against them.

        ``dynamic_axes`` declares dims besides the batch that vary between requests, per input:
        ``{"input_ids": {1: DynamicAxis("sequence", max=512)}, "attention_mask": {1:
        DynamicAxis("sequence", max=512)}}`` (axes sharing a name are one size). The export
        keeps them symbolic (or says which one the model fixes), the server runs the model at
        their bounds, and the served version refuses requests outside them.

        A path is read and sent ``chunk_size`` bytes (at most 64 MiB) at a time, never whole;
        ``bytes``, a
        ``bytearray`` or a ``memoryview`` is sent through a view, never copied whole (leave a
        buffer unchanged until the call returns: the server checks the SHA-256 taken first).
        """
        self._check_open()
        # As for every other call: 0, a negative, nan, inf or a span past gRPC's deadline
        # arithmetic (1e20) failed at once with DEADLINE_EXCEEDED, after any module export.
        timeout = check_timeout(timeout)
        _check_upload_args(name, format, architecture, description, chunk_size)
        extras: dict[str, Any] = {}
        data: Payload
        packed: Path | None = None  # a temporary archive this call made, removed at the end
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(source, torch.nn.Module):
            if example_inputs is None:
                raise InvalidInputError("uploading an nn.Module needs example_inputs=")
            data, fmt, extras = from_module(
                torch, source, example_inputs, architecture, opset, dynamic_axes=dynamic_axes
            )
            packed = data
            fmt = format or fmt
        elif isinstance(source, bytes | bytearray | memoryview):
            data, fmt = _payload(source), format or ""
        elif isinstance(source, str | os.PathLike):
            data, fmt, packed = _path_source(Path(source), format)
        else:
            raise InvalidInputError(
                f"cannot upload a {type(source).__name__}: pass a path, bytes or an nn.Module"
            )
        try:
            up = self._send(
                name,
                data,
                fmt,
                architecture=architecture,
                architecture_kwargs=architecture_kwargs,
                description=description,
                chunk_size=chunk_size,
                timeout=timeout,
            )
        finally:
            if packed is not None:
                packed.unlink(missing_ok=True)
        return dataclasses.replace(up, **extras) if extras else up

    def _send(
        self,
        name: str,
        data: Payload,
        fmt: str,
        *,
        architecture: str | None,
        architecture_kwargs: Mapping[str, Any] | None,
        description: str,
        chunk_size: int,
        timeout: float | None,
    ) -> Upload:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise InvalidInputError(
                f"say which format this is: format= one of {', '.join(FORMATS)}"
            )
        try:
            kwargs_json = _json(architecture_kwargs)
        except (TypeError, ValueError) as exc:  # an object json cannot write, a cycle
            raise InvalidInputError(f"architecture_kwargs: {exc}") from None
        size, sha = _measure(data)
        header = pb.UploadHeader(
            model=name,
            format=format_value(fmt),
            architecture=architecture or "",
            architecture_kwargs_json=kwargs_json,
            description=description,
            expected_sha256=sha,
            size_bytes=size,
        )
        failed: list[Exception] = []
        try:
            reply = self._stub.UploadModel(
                _watched(_chunks(header, data, chunk_size), failed),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            if failed:
                # Raised in gRPC's thread that feeds the call (a read that failed part way):
                # it came back as the server's UNKNOWN, "Exception iterating requests!".
                raise failed[0] from None
            raise self._failed(exc) from None
        return parse_upload(reply)

    def list_uploads(self, model: str | None = None, *, limit: int | None = 100) -> list[Upload]:
        """The uploads the server keeps, newest first; they stay until deleted or removed by the
        server's retention rule (oldest unused first, past its byte or age bound). At most
        ``limit`` (None: all of them), over as many pages as the server's answers need."""
        pages = self._pages(self._stub.ListUploads, pb.ListUploadsRequest, "uploads", model, limit)
        return [parse_upload(u) for page in pages for u in page]

    def _pages(
        self,
        method: Callable[..., Any],
        request: Callable[..., Any],
        field: str,
        model: str | None,
        limit: int | None,
    ) -> Iterator[list[Any]]:
        """The records of a listing, page after page (``next_page_token``), until ``limit``
        records came or the last page: one answer holds at most what fits half the server's
        message size, fewer than asked for when records are large."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise InvalidInputError(f"limit must be a whole number or None, not {limit!r}")
        if limit is not None and limit < 1:
            raise InvalidInputError(f"limit must be at least 1 (None: all), not {limit}")
        if model is not None and not isinstance(model, str):
            raise InvalidInputError(f"model must be a name (str) or None, not {model!r}"[:200])
        got, token = 0, ""
        asked = {token}
        while True:
            ask = PAGE_MAX if limit is None else min(limit - got, PAGE_MAX)
            reply = self._call(method, request(model=model or "", limit=ask, page_token=token))
            records = list(getattr(reply, field))[:ask]  # never more than asked for
            yield records
            got += len(records)
            # A page that brought nothing, or a token asked with already (the same again, or
            # tokens that come round: a, b, a, ...), would never end the loop.
            if not records or reply.next_page_token in asked:
                return
            token = reply.next_page_token
            asked.add(token)
            if limit is not None and got >= limit:
                return

    def delete_upload(self, upload: Upload | str) -> None:
        """Remove an upload's file from the server. Refused (``ConversionError``,
        FAILED_PRECONDITION) while a queued or running job reads it."""
        upload_id = upload.upload_id if isinstance(upload, Upload) else upload
        self._call(self._stub.DeleteUpload, request(pb.DeleteUploadRequest, upload_id=upload_id))

    # ---- jobs ----
    def convert(
        self,
        upload: Upload | str,
        *,
        model: str = "",
        inputs: Sequence[InputSpec | tuple[str, str, Sequence[int]]] | None = None,
        opset: int = 20,
        pruning: Pruning | None = None,
        quantization: Quantization | str | None = None,
        validation: Validation | None = None,
        serving: Serving | None = None,
        max_batch_size: int | None = None,
        benchmark: str | None = None,
        rollout: str | None = None,
        rollout_fraction: float | None = None,
    ) -> Job:
        """Start converting an upload (or an upload id) into the next version of ``model``
        (default: the upload's model). Returns at once; ``wait()`` on the job, whose
        ``message`` is then the one-line result (what was published, how fast, how close).

        ``benchmark``: "full" (the server's default), "quick" (fewer, shorter timing rounds) or
        "off" (no speed figures; the server refuses it with quantization "auto", which chooses
        by speed). A variant the benchmark finds clearly slower than fp32 is never published
        unless ``Quantization(keep_slower=True)``: the job fails and the served version stays.

        ``max_batch_size``: the new version's largest dynamic batch, which the export is
        checked at and the version is served with (its ``Serving.max_batch_size`` where that
        states none), as ``ferry convert --max-batch-size`` does.

        ``rollout="shadow"``: the version serving now keeps all the traffic, and
        ``rollout_fraction`` (default 0.1) of the requests also run on the new version as a
        shadow candidate; ``RepositoryClient.get_rollout(model)`` compares them, and
        ``set_rollout`` promotes or ends it (docs/rollout.md).
        """
        up = upload if isinstance(upload, Upload) else None
        upload_id = upload.upload_id if isinstance(upload, Upload) else upload
        specs = [i if isinstance(i, InputSpec) else InputSpec(*i) for i in inputs or ()]
        if not specs and up is not None:
            specs = list(up.inputs)
        if isinstance(quantization, str):
            quantization = Quantization(mode=quantization)
        if max_batch_size is not None and (serving is None or serving.max_batch_size is None):
            # The serving batch too, as the CLI's flag: it went to the export check alone, and
            # the version was served at the load's default (32), a dynamic int8 one unbatched.
            serving = dataclasses.replace(serving or Serving(), max_batch_size=max_batch_size)
        if up is not None and up.sample_inputs is not None:
            # A module upload's samples and outputs always travel, so the report compares with
            # PyTorch even when the caller sets other validation options.
            validation = validation or Validation()
            if validation.sample_inputs is None:
                validation = dataclasses.replace(
                    validation,
                    sample_inputs=up.sample_inputs,
                    reference_outputs=up.reference_outputs,
                )
        try:
            spec = build_spec(
                specs,
                opset=opset,
                pruning=pruning,
                quantization=quantization,
                validation=validation,
                serving=serving,
                max_batch_size=max_batch_size,
                benchmark=benchmark,
                rollout=rollout,
                rollout_fraction=rollout_fraction,
            )
            request = pb.ConvertRequest(upload_id=upload_id, model=model, spec=spec)
        except (ValueError, TypeError) as exc:
            # What the message cannot carry (samples=10**12, a datatype "FP99", a complex
            # calibration array) raised protobuf's or the codec's own error, a traceback in
            # `ferry convert`: the caller's to fix, before anything is sent.
            raise InvalidInputError(f"conversion options: {exc}") from None
        return self._job(self._call(self._stub.Convert, request))

    def job(self, job_id: str) -> Job:
        return self._job(self._call(self._stub.GetJob, request(pb.GetJobRequest, job_id=job_id)))

    def list_jobs(self, model: str | None = None, *, limit: int | None = 100) -> list[Job]:
        """Newest first, at most ``limit`` (None: all of them), as ``list_uploads``."""
        pages = self._pages(self._stub.ListJobs, pb.ListJobsRequest, "jobs", model, limit)
        return [self._job(j) for page in pages for j in page]

    def cancel(self, job_id: str) -> Job:
        return self._job(
            self._call(self._stub.CancelJob, request(pb.CancelJobRequest, job_id=job_id))
        )

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[ProgressEvent]:
        self._check_open()
        timeout = check_timeout(timeout)
        stream = self._stub.WatchJob(
            request(pb.WatchJobRequest, job_id=job_id), timeout=timeout, metadata=self._metadata
        )
        try:
            for event in stream:
                yield parse_event(event)
        except grpc.RpcError as exc:
            raise self._failed(exc) from None
        finally:
            stream.cancel()

    # ---- versions ----
    def get_model(self, name: str) -> ModelInfo:
        """Every version of the model on disk, with its state and conversion report."""
        return parse_model(self._call(self._stub.GetModel, request(pb.GetModelRequest, model=name)))

    def delete_version(self, name: str, version: int) -> None:
        message = request(pb.DeleteModelVersionRequest, model=name, version=version)
        self._call(self._stub.DeleteModelVersion, message)

    def set_default_version(self, name: str, version: int | None) -> ModelInfo:
        """Pin requests without a version to ``version`` (None: the highest served one)."""
        message = request(pb.SetDefaultVersionRequest, model=name, version=version or 0)
        return parse_model(self._call(self._stub.SetDefaultVersion, message).model)

    def _job(self, m: pb.Job) -> Job:
        error = m.error if m.HasField("error") else None
        return Job(
            id=m.job_id,
            model=m.model,
            state=pb.JobState.Name(m.state).removeprefix("JOB_STATE_"),
            stage=m.stage,
            fraction=m.fraction,
            message=m.message,
            version=m.version or None,
            upload_id=m.upload_id,
            format=format_name(m.format) if m.format else "",
            source_sha256=m.source_sha256,
            error_code=status_code(error.code) if error is not None else None,
            error_kind=error.kind if error is not None else "",
            error_message=error.message if error is not None else "",
            report=parse_report(m.report, m.report_json),
            report_json=m.report_json,
            created=m.created_ms / 1000,
            started=m.started_ms / 1000 if m.started_ms else None,
            finished=m.finished_ms / 1000 if m.finished_ms else None,
            _client=self,
        )


# ---- helpers ----
def _short(timeout: float | None, left: float | None) -> float | None:
    """A short call's deadline inside a wait's: the sooner of the client's and what is left."""
    if left is None:
        return timeout
    return max(left, 0.001) if timeout is None else max(min(timeout, left), 0.001)


def _json(kwargs: Mapping[str, Any] | None) -> str:
    import json

    return json.dumps(dict(kwargs), sort_keys=True) if kwargs else ""


def _check_upload_args(
    name: object, format: object, architecture: object, description: object, chunk_size: object
) -> None:
    """What protobuf or this module would refuse with Python's own TypeError or
    AttributeError, naming no argument (or, for chunk_size, in gRPC's thread that feeds the
    call, coming back as the server's UNKNOWN): refused here, naming it."""
    for what, value, optional in (
        ("model name", name, False),
        ("format", format, True),
        ("architecture", architecture, True),
        ("description", description, False),
    ):
        if not isinstance(value, str) and not (optional and value is None):
            raise InvalidInputError(f"{what} must be a str, not {type(value).__name__}")
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or not 0 < chunk_size <= MAX_CHUNK
    ):
        raise InvalidInputError(
            f"chunk_size must be a whole number of bytes within 1..{MAX_CHUNK:,} (each chunk "
            f"goes as one message), not {chunk_size!r}"
        )


def _watched(
    messages: Iterator[pb.UploadModelRequest], failed: list[Exception]
) -> Iterator[pb.UploadModelRequest]:
    """``messages``, keeping an exception they raise, which gRPC only logs."""
    try:
        yield from messages
    except Exception as exc:
        failed.append(exc)
        raise


def _path_source(path: Path, format: str | None) -> tuple[Path, str, Path | None]:
    """What a path uploads as: (the file to send, its format, the temporary archive made for
    it or None). A folder, or a ``.onnx`` file whose tensors read data files beside it (a
    model over 2 GiB), goes as one onnx_archive carrying model.onnx and its data."""
    if path.is_dir():
        archive = pack_folder(path)
        return archive, format or ARCHIVE_FORMAT, archive
    if not path.is_file():
        # A device or pipe (/dev/zero) was read to its end to be measured: forever. A missing
        # path raised FileNotFoundError, which is no FerryError.
        what = "is not a regular file or folder" if path.exists() else "does not exist"
        raise InvalidInputError(f"cannot upload {str(path)!r}: it {what}")
    fmt = format or SUFFIX_FORMATS.get(path.suffix.lower(), "")
    if fmt == "onnx" and path.is_file():
        locations = external_locations(path)
        if locations:
            archive = pack_model(path, locations)
            return archive, ARCHIVE_FORMAT, archive
    return path, fmt, None


def _payload(source: bytes | bytearray | memoryview) -> bytes | memoryview:
    """The caller's buffer as flat bytes, without copying it: a model of hundreds of MB must not
    be held twice. Only a non-contiguous view is copied (there is no flat view of it)."""
    if isinstance(source, bytes):
        return source
    view = memoryview(source)
    return view.cast("B") if view.c_contiguous else view.tobytes()


def _measure(data: Payload) -> tuple[int, str]:
    if not isinstance(data, Path):
        return len(data), hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    size = 0
    with open(data, "rb") as fh:
        while block := fh.read(4 * MiB):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _chunks(header: pb.UploadHeader, data: Payload, size: int) -> Iterator[pb.UploadModelRequest]:
    """One message per chunk, made as gRPC asks for it: a file is read a chunk at a time (never
    whole), and a buffer is sliced through a view, so only the chunk in flight is copied (the
    message needs ``bytes`` of its own)."""
    yield pb.UploadModelRequest(header=header)
    if not isinstance(data, Path):
        view = memoryview(data)
        for start in range(0, len(view), size):
            yield pb.UploadModelRequest(chunk=view[start : start + size].tobytes())
        return
    with open(data, "rb") as fh:
        while block := fh.read(size):
            yield pb.UploadModelRequest(chunk=block)
