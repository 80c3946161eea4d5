"""``ferry.v1.Inference``: a thin translator between protobuf and the DataPlane.

Each method turns its request into the core's types, calls the one door (``DataPlane``) and
turns the answer back; no method reaches past the door.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from ferry.codec import decode_tensor
from ferry.codec._wire import encode_infer_response, encode_stream_result
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import tensor_pb2
from ferry.server.core.dataplane import DataPlane
from ferry.server.core.inputs import check_counts, check_wire_elements
from ferry.server.core.types import (
    Duration,
    InferenceRequest,
    InferenceResult,
    Limits,
    ModelMetadata,
    State,
    TensorSpec,
    VersionStatistics,
    version_of,
)
from ferry.server.errors import InvalidArgument, Unavailable
from ferry.server.grpc._base import (
    call_deadline,
    echo_too_long,
    end_stream,
    fits,
    sendable,
    translate_errors,
)
from ferry.server.grpc.status import status_of

# The stream's header stating the server's limit per message (the SDK's _stream_limit).
LIMIT_HEADER = "ferry-max-message-bytes"
# The header a client states its own receive limit in (the SDK's _stream_limit).
RECEIVE_HEADER = "ferry-max-receive-bytes"
CLIENT_SETTING = "the client's max_message_bytes"


def answer_limit(own: int | None, metadata: Any) -> tuple[int | None, str]:
    """The limit a stream's answers must fit, and the setting that makes it: the server's own,
    or the client's receive limit (``RECEIVE_HEADER``) where that is smaller. An answer over the
    client's limit ended the whole stream in the client's grpc core, every other request on it
    failing with it; refused here, it is that request's own error."""
    stated = next((value for key, value in metadata or () if key == RECEIVE_HEADER), None)
    try:
        theirs = int(stated) if stated is not None else None
    except ValueError:  # not the SDK's: no limit of its own stated
        theirs = None
    if theirs is not None and theirs > 0 and (own is None or theirs < own):
        return theirs, CLIENT_SETTING
    return own, "max_message_bytes"


STATE = {
    State.LOADING: pb.MODEL_STATE_LOADING,
    State.READY: pb.MODEL_STATE_READY,
    State.FAILED: pb.MODEL_STATE_FAILED,
    State.UNLOADING: pb.MODEL_STATE_UNLOADING,
    State.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


class WireInfer:
    """A ``ferry.v1`` InferRequest as the core decodes it (``core.types.WireRequest``)."""

    __slots__ = ("msg",)

    def __init__(self, msg: pb.InferRequest) -> None:
        self.msg = msg

    @property
    def model(self) -> str:
        return self.msg.model

    @property
    def version_label(self) -> int:
        return self.msg.version

    @property
    def version_named(self) -> bool:
        return self.msg.version != 0

    @property
    def request_id(self) -> str:
        return self.msg.id

    def decode(self, limits: Limits) -> InferenceRequest:
        return to_request(self.msg, limits)


def to_request(msg: pb.InferRequest, limits: Limits | None = None) -> InferenceRequest:
    if limits is not None:
        # Counts first, as the Open Inference Protocol's decoder does: each input decoded is a
        # Python object built on the event loop, so a request of 150,000 tiny inputs held the
        # loop for most of a second before validation refused it on its count.
        check_counts(len(msg.inputs), len(msg.outputs), limits)
        check_wire_elements(
            (t.shape for t in msg.inputs),
            limits,
            (t.shape for t in msg.inputs if t.dtype == tensor_pb2.DATA_TYPE_BYTES),
        )
    names = set()
    inputs = {}
    for t in msg.inputs:
        if t.name in names:
            raise InvalidArgument(f"input {t.name!r} appears twice in the request")
        names.add(t.name)
        try:
            inputs[t.name] = decode_tensor(t)
        except ValueError as exc:  # CodecError
            raise InvalidArgument(str(exc)) from None
    return InferenceRequest(
        model=msg.model,
        inputs=inputs,
        version=version_of(msg.version),
        id=msg.id,
        outputs=list(msg.outputs) or None,
        timeout=msg.timeout_us / 1e6 if msg.timeout_us else None,
        priority=msg.priority,
    )


def encode_response(result: InferenceResult) -> bytes:
    """The serialized ``InferResponse``, built once with the SDK's own wire codec: each output
    is copied once, from the array into the message, where protobuf objects copied it three
    times (``tobytes``, into the message, serializing)."""
    return encode_infer_response(result.model, result.version, result.id, result.outputs)


def _tensor_metadata(spec: TensorSpec) -> tensor_pb2.TensorMetadata:
    return tensor_pb2.TensorMetadata(
        name=spec.name,
        dtype=spec.dtype,  # type: ignore[arg-type]  # a DataType value held as int
        shape=spec.shape,
    )


def metadata_of(m: ModelMetadata) -> pb.ModelMetadata:
    b = m.batching
    return pb.ModelMetadata(
        name=m.name,
        version=m.version,
        versions=m.ready_versions,
        default_version=m.default_version or 0,
        platform=m.platform,
        inputs=[_tensor_metadata(s) for s in m.inputs],
        outputs=[_tensor_metadata(s) for s in m.outputs],
        batching=pb.BatchingPolicy(
            max_batch_size=b.max_batch_size,
            max_queue_delay_us=int(b.max_queue_delay_ms * 1000),
            max_queue_size=b.max_queue_size,
            default_timeout_us=int(b.default_timeout_ms * 1000),
            instance_count=m.instance_count,
            device_ids=m.device_ids,
            requests_run_alone=not b.combine_requests,
            run_alone_reason=b.run_alone_reason,
            default_priority=b.default_priority,
        ),
    )


def _dur(d: Duration) -> pb.Duration:
    return pb.Duration(count=d.count, ns=d.ns)


def statistics_of(s: VersionStatistics) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=s.name,
        version=s.version,
        last_inference_ms=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        success=_dur(s.success),
        fail=_dur(s.fail),
        queue=_dur(s.queue),
        compute_input=_dur(s.compute_input),
        compute_infer=_dur(s.compute_infer),
        compute_output=_dur(s.compute_output),
        batch_stats=[
            pb.BatchStatistics(
                batch_size=b.batch_size,
                compute_input=_dur(b.compute_input),
                compute_infer=_dur(b.compute_infer),
                compute_output=_dur(b.compute_output),
            )
            for b in s.batches
        ],
        rejected_count=s.rejected,
        expired_count=s.expired,
        queue_depth=s.queue_depth,
        planned=[
            pb.PlannedSizeStatistics(batch_size=size, execution_count=n)
            for size, n in s.planned_executions
        ],
        plan_changes=s.plan_changes,
        devices=[
            pb.DeviceStatistics(device_id=device, execution_count=n)
            for device, n in s.device_executions
        ],
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    """``max_message_bytes``: the listener's send limit, which every answer is checked against
    (``sendable``); None where none is set."""

    def __init__(self, dataplane: DataPlane, *, max_message_bytes: int | None = None) -> None:
        self.dataplane = dataplane
        self.max_message_bytes = max_message_bytes

    @translate_errors
    async def Infer(self, request: pb.InferRequest, context: aio.ServicerContext) -> bytes:
        """Answers the serialized response (``add_to_server`` registers a pass-through)."""
        result = await self.dataplane.infer(WireInfer(request), deadline=call_deadline(context))
        return sendable(encode_response(result), self.max_message_bytes, request.id)

    async def InferStream(
        self, request_iterator: AsyncIterator[pb.InferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.InferStreamResponse | bytes]:
        """Requests run concurrently; responses are yielded as they complete, each with its
        request's id; a failed request gets an error response and the stream stays open."""
        deadline = call_deadline(context)
        limit, setting = answer_limit(self.max_message_bytes, context.invocation_metadata())

        async def respond(msg: pb.InferRequest) -> pb.InferStreamResponse | bytes:
            try:
                result = await self.dataplane.infer(WireInfer(msg), deadline=deadline)
                encoded = encode_stream_result(msg.id, result.model, result.version, result.outputs)
                # The id is sent back twice: in the stream response and in the result.
                return sendable(encoded, limit, msg.id, copies=2, setting=setting)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message, kind = status_of(exc)
                failed = pb.InferStreamResponse(
                    id=msg.id, error=pb.Error(code=code.value[0], message=message, kind=kind)
                )
                if limit is None or fits(failed, limit):
                    return failed
                # Without the id, which no answer can carry: one that cannot be sent would end
                # the stream, every other request on it with it.
                too_long = echo_too_long(len(msg.id.encode()), limit, setting=setting)
                code, message, kind = status_of(too_long)
                return pb.InferStreamResponse(
                    error=pb.Error(code=code.value[0], message=message, kind=kind)
                )

        if self.max_message_bytes is not None:
            # grpc's core ends the whole stream on one request over its receive limit, every
            # other request on it lost, before any handler sees it: the SDK refuses such a
            # request before sending it when the stream states the limit as it opens.
            await context.send_initial_metadata(((LIMIT_HEADER, str(self.max_message_bytes)),))
        try:
            async for response in self.dataplane.stream(request_iterator, respond):
                yield response
        except Unavailable as exc:  # the server's stop ended it (core.streams)
            await end_stream(context, exc)

    @translate_errors
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadata:
        return metadata_of(self.dataplane.metadata(request.model, version_of(request.version)))

    @translate_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelVersionStatus(
                    name=s.name,
                    version=s.version,
                    state=STATE[s.state],
                    reason=s.reason,
                    is_default=s.is_default,
                )
                for s in self.dataplane.list_models(request.model)
            ]
            # A model with no version is a row of its own, as in the repository index: it was
            # left out, and nothing said why it served nothing.
            + [
                pb.ModelVersionStatus(name=name, state=pb.MODEL_STATE_UNLOADED, reason=why)
                for name, why in self.dataplane.versionless(request.model)
            ]
        )

    @translate_errors
    async def GetModelStatistics(
        self, request: pb.GetModelStatisticsRequest, context: aio.ServicerContext
    ) -> pb.GetModelStatisticsResponse:
        stats = await self.dataplane.total_statistics(request.model, version_of(request.version))
        return pb.GetModelStatisticsResponse(models=[statistics_of(s) for s in stats])


def _serialized(response: Any) -> bytes:
    """Responses the hot path already serialized pass through; messages serialize as usual."""
    if isinstance(response, bytes):
        return response
    data: bytes = response.SerializeToString()
    return data


SERVICE = "ferry.v1.Inference"


def add_to_server(server: aio.Server, servicer: InferenceServicer) -> list[str]:
    """Register ``ferry.v1.Inference`` as the generated code would, except that Infer and
    InferStream send the bytes their handlers built (``_serialized``)."""
    s = servicer

    def unary(fn: Callable[..., Any], request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request.FromString, response_serializer=response
        )

    table: dict[str, grpc.RpcMethodHandler] = {
        "Infer": unary(s.Infer, pb.InferRequest, _serialized),
        "InferStream": grpc.stream_stream_rpc_method_handler(
            s.InferStream,
            request_deserializer=pb.InferRequest.FromString,
            response_serializer=_serialized,
        ),
        "GetModelMetadata": unary(
            s.GetModelMetadata, pb.GetModelMetadataRequest, pb.ModelMetadata.SerializeToString
        ),
        "ListModels": unary(
            s.ListModels, pb.ListModelsRequest, pb.ListModelsResponse.SerializeToString
        ),
        "GetModelStatistics": unary(
            s.GetModelStatistics,
            pb.GetModelStatisticsRequest,
            pb.GetModelStatisticsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, table),))
    return [SERVICE]
