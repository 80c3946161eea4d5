"""``ferry.v1.ModelConversion``: proto <-> the conversion core, on the management listener only.

Each method translates its request into the core's types (``ferry.server.convert``), calls the
core, and translates back; errors become statuses through the one table (grpc/status.py), a
failed job's error kind included, so a job's ``error.code`` is what a call failing the same way
would have returned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from grpc import aio

from ferry.codec import CodecError, datatype_from_name, datatype_name, decode_tensor
from ferry.proto.v1 import inference_pb2 as ipb
from ferry.proto.v1 import model_conversion_pb2 as pb
from ferry.proto.v1 import model_conversion_pb2_grpc as pb_grpc
from ferry.server.convert import spec, validation
from ferry.server.convert.service import ConversionService
from ferry.server.convert.store import EventRecord, JobRecord, UploadRecord
from ferry.server.convert.uploads import UploadHeader, kwargs_from_json
from ferry.server.core.versions import ModelView
from ferry.server.errors import DeadlineExceeded, ErrorKind, InvalidArgument
from ferry.server.grpc._base import translate_errors
from ferry.server.grpc.status import ERROR_TABLE, status_of, trailing
from ferry.server.min_rate import MinRate

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelConversion"].full_name
_FORMAT_PREFIX = "SOURCE_FORMAT_"
# Seconds an upload may wait for its next message. A client that stopped sending (or vanished
# without closing its connection) held the upload's partial file, on disk and open, for as long
# as gRPC kept the stream: hours for a dead peer. The HTTP listener bounds a body's pauses the
# same way.
UPLOAD_IDLE = 120.0
# Bytes a second an upload must average once UPLOAD_IDLE has passed: it may take UPLOAD_IDLE
# plus one second per UPLOAD_MIN_RATE bytes. UPLOAD_IDLE alone judged pauses between messages,
# so a client sending an empty (or one-byte) chunk every minute held its stream, its open
# partial file and its handler for ever. As the HTTP listener's BODY_MIN_RATE: a 4 kbit/s link.
UPLOAD_MIN_RATE = 500.0


async def _next_part(
    messages: AsyncIterator[pb.UploadModelRequest], received: int, bound: MinRate
) -> pb.UploadModelRequest:
    """The upload's next message, or DEADLINE_EXCEEDED when none comes within UPLOAD_IDLE or
    within what the bytes so far allow (the upload's partial file is then removed, as for any
    failed upload). ``bound``: made when the upload's call started."""
    deadline = bound.deadline(received)
    try:
        if deadline <= asyncio.get_running_loop().time():
            raise TimeoutError
        async with asyncio.timeout_at(deadline):
            return await anext(messages)
    except TimeoutError:
        if bound.by_rate:
            raise DeadlineExceeded(
                f"the upload arrived too slowly: {bound.too_slow(received, 'an upload')}; "
                "nothing was kept: send the file in one go over a faster link"
            ) from None
        raise DeadlineExceeded(
            f"the upload stopped arriving: no message for {UPLOAD_IDLE:g} seconds after "
            f"{received} bytes; nothing was kept: send the whole file without pausing"
        ) from None


def add_to_server(server: aio.Server, service: ConversionService) -> list[str]:
    """Register the ModelConversion service (the caller has opened ``service``)."""
    pb_grpc.add_ModelConversionServicer_to_server(ConversionServicer(service), server)
    return [SERVICE_NAME]


class ConversionServicer(pb_grpc.ModelConversionServicer):
    def __init__(self, service: ConversionService) -> None:
        self.service = service

    @translate_errors
    async def UploadModel(
        self, request_iterator: AsyncIterator[pb.UploadModelRequest], context: aio.ServicerContext
    ) -> pb.Upload:
        messages = aiter(request_iterator)
        bound = MinRate(UPLOAD_IDLE, UPLOAD_MIN_RATE)
        try:
            first = await _next_part(messages, 0, bound)
        except StopAsyncIteration:
            raise InvalidArgument("empty upload: send an UploadHeader, then the chunks") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of an upload must be its header")

        async def chunks() -> AsyncIterator[bytes]:
            received = 0
            while True:
                try:
                    message = await _next_part(messages, received, bound)
                except StopAsyncIteration:
                    return
                part = message.WhichOneof("part")
                if part == "header":
                    raise InvalidArgument("only the first message of an upload may be a header")
                if part is None:
                    # Said as what it is: it was answered as a second header, which it is not.
                    raise InvalidArgument(
                        f"a message after {received} bytes of the upload carries neither a "
                        "header nor a chunk: every message after the header must set chunk"
                    )
                received += len(message.chunk)
                yield message.chunk

        record = await self.service.upload(_header(first.header), chunks())
        return _upload(record, self.service.known_inputs(record))

    @translate_errors
    async def ListUploads(
        self, request: pb.ListUploadsRequest, context: aio.ServicerContext
    ) -> pb.ListUploadsResponse:
        records, token = self.service.list_uploads(request.model, request.limit, request.page_token)
        return pb.ListUploadsResponse(
            uploads=[_upload(r, self.service.known_inputs(r)) for r in records],
            next_page_token=token,
        )

    @translate_errors
    async def DeleteUpload(
        self, request: pb.DeleteUploadRequest, context: aio.ServicerContext
    ) -> pb.DeleteUploadResponse:
        await self.service.delete_upload(request.upload_id)
        return pb.DeleteUploadResponse()

    @translate_errors
    async def Convert(self, request: pb.ConvertRequest, context: aio.ServicerContext) -> pb.Job:
        conversion, tensors = _spec(request.spec)
        job = await self.service.convert(request.upload_id, request.model, conversion, tensors)
        return _job(job)

    @translate_errors
    async def GetJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> pb.Job:
        return _job(self.service.get_job(request.job_id))

    @translate_errors
    async def ListJobs(
        self, request: pb.ListJobsRequest, context: aio.ServicerContext
    ) -> pb.ListJobsResponse:
        jobs, token = self.service.list_jobs(request.model, request.limit, request.page_token)
        return pb.ListJobsResponse(jobs=[_job(j) for j in jobs], next_page_token=token)

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.ProgressEvent]:
        try:
            async for event in self.service.watch(request.job_id):
                yield _event(event)
        except aio.AbortError:
            raise
        except Exception as exc:
            code, message, kind = status_of(exc)
            context.set_trailing_metadata(trailing(kind))
            await context.abort(code, message)

    @translate_errors
    async def CancelJob(self, request: pb.CancelJobRequest, context: aio.ServicerContext) -> pb.Job:
        return _job(await self.service.cancel_job(request.job_id))

    @translate_errors
    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext
    ) -> pb.ModelInfo:
        return _model(*await self.service.get_model(request.model))

    @translate_errors
    async def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: aio.ServicerContext
    ) -> pb.DeleteModelVersionResponse:
        await self.service.delete_version(request.model, request.version)
        return pb.DeleteModelVersionResponse()

    @translate_errors
    async def SetDefaultVersion(
        self, request: pb.SetDefaultVersionRequest, context: aio.ServicerContext
    ) -> pb.SetDefaultVersionResponse:
        await self.service.set_default_version(request.model, request.version)
        return pb.SetDefaultVersionResponse(
            model=_model(*await self.service.get_model(request.model))
        )


# ---- requests -> core ----
def _format(value: int) -> str:
    name = pb.SourceFormat.Name(value) if value in pb.SourceFormat.values() else ""
    fmt = name.removeprefix(_FORMAT_PREFIX).lower()
    if fmt not in spec.SOURCE_FORMATS:
        raise InvalidArgument(
            f"set the source format: one of {', '.join(f.upper() for f in spec.SOURCE_FORMATS)}"
        )
    return fmt


def _header(h: pb.UploadHeader) -> UploadHeader:
    if h.architecture_kwargs_json and h.HasField("architecture_kwargs"):
        raise InvalidArgument("give architecture kwargs as JSON text or as a Struct, not both")
    if h.HasField("architecture_kwargs"):
        kwargs = _integral(_struct_dict(h.architecture_kwargs))
    else:
        kwargs = kwargs_from_json(h.architecture_kwargs_json)
    return UploadHeader(
        model=h.model,
        format=_format(h.format),
        architecture=h.architecture,
        architecture_kwargs=kwargs,
        description=h.description,
        expected_sha256=h.expected_sha256.lower(),
        size_bytes=h.size_bytes,
    )


def _struct_dict(value: Any) -> dict[str, Any]:
    """A Struct as a dict. protobuf refuses a NaN or infinite number_value (JSON has no such
    number, and its Struct mapping is JSON's), which escaped as a ValueError: INTERNAL for the
    client's own header. The JSON text field takes NaN and Infinity, as Python's json does."""
    try:
        kwargs: dict[str, Any] = json_format.MessageToDict(value)
    except ValueError as exc:
        raise InvalidArgument(
            f"architecture_kwargs cannot be read: {exc}; a Struct carries no NaN or Infinity, "
            "so give such kwargs as architecture_kwargs_json text instead"
        ) from None
    return kwargs


def _integral(value: Any) -> Any:
    """Struct numbers are doubles; a constructor wants ``256``, not ``256.0``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _tensors(what: str, tensors: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tensors:
        if t.name in out:
            raise InvalidArgument(f"{what}: tensor {t.name!r} is given twice")
        try:
            out[t.name] = decode_tensor(t)
        except CodecError as exc:
            raise InvalidArgument(f"{what}: {exc}") from None
    return out


def _spec(m: pb.ConversionSpec) -> tuple[spec.ConversionSpec, validation.SpecTensors]:
    inputs = []
    for i in m.inputs:
        try:
            datatype = datatype_name(i.dtype)
        except CodecError:
            raise InvalidArgument(f"input {i.name!r}: set its dtype (e.g. FP32)") from None
        axes = [spec.DynamicAxis(a.axis, a.name, a.min or 1, a.max) for a in i.dynamic_axes]
        inputs.append(
            spec.InputSpec(name=i.name, datatype=datatype, shape=list(i.shape), dynamic_axes=axes)
        )
    if m.rollout_fraction and not m.rollout:
        # Unset (0) and the default cannot be told apart in the core, so the adapter refuses:
        # published directly, the version took every request while a share was asked for.
        raise InvalidArgument(
            f"rollout_fraction {m.rollout_fraction:g} is set but rollout is not 'shadow', so "
            "the new version would take every request: set rollout 'shadow' (--rollout "
            "shadow) for a share, or leave rollout_fraction unset"
        )
    q, v, s = m.quantization, m.validation, m.serving
    # Unset fields keep the defaults of convert/spec.py, stated there only: empty strings and
    # zeros are proto3's "unset" for plain fields, HasField tells for the optional ones.
    conversion = _given(
        spec.ConversionSpec(inputs=inputs),
        opset=m.opset or None,
        max_batch_size=m.max_batch_size or None,
        benchmark=m.benchmark or None,
        rollout=m.rollout or None,
        rollout_fraction=m.rollout_fraction or None,
        pruning=_given(
            spec.PruningSpec(), method=m.pruning.method or None, amount=m.pruning.amount
        ),
        quantization=_given(
            spec.QuantizationSpec(),
            mode=q.mode or None,
            calibration=q.calibration or None,
            per_channel=_optional(q, "per_channel"),
            keep_slower=q.keep_slower,
        ),
        validation=_given(
            spec.ValidationSpec(),
            **{
                name: _optional(v, name)
                for name in ("rtol", "atol", "samples", "min_cosine", "min_top1_agreement")
            },
            keep_failed=v.keep_failed,
        ),
        serving_config=validation.serving_config(
            **{
                name: _optional(s, name)
                for name in (
                    "max_batch_size",
                    "max_queue_delay_ms",
                    "max_queue_size",
                    "default_timeout_ms",
                    "instance_count",
                    "combine_requests",
                )
            }
        ),
    )
    tensors = validation.SpecTensors(
        calibration=_tensors("quantization.calibration_inputs", q.calibration_inputs),
        samples=_tensors("validation.sample_inputs", v.sample_inputs),
        references=_tensors("validation.reference_outputs", v.reference_outputs),
    )
    return conversion, tensors


_T = TypeVar("_T")


def _given(defaults: _T, **fields: Any) -> _T:
    """``defaults`` with the fields the request set (those not None)."""
    return dataclasses.replace(  # type: ignore[type-var]
        defaults, **{k: val for k, val in fields.items() if val is not None}
    )


def _optional(message: Any, name: str) -> Any:
    """An ``optional`` proto field's value, or None when the request left it unset."""
    return getattr(message, name) if message.HasField(name) else None


# ---- core -> responses ----
def _format_enum(fmt: str) -> str:
    return _FORMAT_PREFIX + fmt.upper()


def _upload(r: UploadRecord, inputs: list[spec.InputSpec]) -> pb.Upload:
    out = pb.Upload(
        upload_id=r.upload_id,
        model=r.model,
        format=_format_enum(r.format),
        sha256=r.sha256,
        size_bytes=r.size_bytes,
        architecture=r.architecture,
        architecture_kwargs_json=r.architecture_kwargs,
        description=r.description,
        created_ms=r.created_ms,
    )
    for i in inputs:
        added = out.inputs.add(
            name=i.name, dtype=datatype_from_name(i.datatype), shape=list(i.shape)
        )
        for a in i.dynamic_axes:
            added.dynamic_axes.add(axis=a.axis, name=a.name, min=a.min, max=a.max)
    return out


def _error(kind: str, message: str) -> ipb.Error:
    try:
        error_kind = ErrorKind(kind)
    except ValueError:
        error_kind = ErrorKind.CONVERSION_FAILED
    code: grpc.StatusCode = ERROR_TABLE[error_kind][0]
    return ipb.Error(code=code.value[0], message=message, kind=kind)


def _job(j: JobRecord) -> pb.Job:
    msg = pb.Job(
        job_id=j.job_id,
        model=j.model,
        upload_id=j.upload_id,
        format=_format_enum(j.format),
        source_sha256=j.sha256,
        state="JOB_STATE_" + j.state.value,
        stage=j.stage,
        fraction=j.fraction,
        message=j.message,
        version=j.version,
        report_json=j.report_json,
        created_ms=j.created_ms,
        started_ms=j.started_ms,
        finished_ms=j.finished_ms,
        spec_json=j.spec_json,
    )
    if j.error_kind:
        msg.error.CopyFrom(_error(j.error_kind, j.error_message))
    if j.report_json:
        msg.report.CopyFrom(report_message(j.report_json))
    return msg


def _event(e: EventRecord) -> pb.ProgressEvent:
    return pb.ProgressEvent(
        job_id=e.job_id,
        seq=e.seq,
        stage=e.stage,
        fraction=e.fraction,
        message=e.message,
        state="JOB_STATE_" + e.state.value,
        error_kind=e.error_kind,
        time_ms=e.time_ms,
    )


def _model(view: ModelView, jobs: dict[int, str]) -> pb.ModelInfo:
    out = pb.ModelInfo(name=view.name, default_version=view.default_version, reason=view.reason)
    for v in view.versions:
        info = out.versions.add(
            version=v.version,
            state="MODEL_STATE_" + v.state,
            reason=v.reason,
            is_default=v.is_default,
            job_id=jobs.get(v.version, ""),
            size_bytes=v.size_bytes,
            report_json=v.report_json,
        )
        if v.report_json:
            info.report.CopyFrom(report_message(v.report_json))
    return out


def report_message(text: str) -> pb.ConversionReport:
    """The typed view of report.json, key by key: a key of an unexpected type is left out of
    the typed view (report_json still has it) instead of losing the whole report."""
    try:
        raw = json.loads(text)
    except ValueError:
        return pb.ConversionReport()
    if not isinstance(raw, dict):
        return pb.ConversionReport()
    out = pb.ConversionReport()
    try:
        json_format.ParseDict(raw, out, ignore_unknown_fields=True)
        return out
    except (json_format.ParseError, TypeError, ValueError):
        out.Clear()
    for key, value in raw.items():
        part = pb.ConversionReport()
        try:
            json_format.ParseDict({key: value}, part, ignore_unknown_fields=True)
        except (json_format.ParseError, TypeError, ValueError):
            continue
        out.MergeFrom(part)
    return out


__all__ = ["ConversionServicer", "add_to_server"]
