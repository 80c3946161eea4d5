"""``ferry.v1.Inference``: a thin translator between protobuf and the DataPlane."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from grpc import aio

from ferry.codec import decode_tensor, encode_tensor
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import tensor_pb2
from ferry.server.core.dataplane import (
    DataPlane,
    InferenceRequest,
    InferenceResult,
    Limits,
    check_wire_elements,
)
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.registry import State
from ferry.server.core.stats import Duration, VersionStats
from ferry.server.errors import InvalidArgument
from ferry.server.grpc._base import call_deadline, run_stream, translate_errors
from ferry.server.grpc.status import code_of, status_of
from ferry.server.runtime.session import TensorSpec

STATE = {
    State.LOADING: pb.MODEL_STATE_LOADING,
    State.READY: pb.MODEL_STATE_READY,
    State.FAILED: pb.MODEL_STATE_FAILED,
    State.UNLOADING: pb.MODEL_STATE_UNLOADING,
    State.UNLOADED: pb.MODEL_STATE_UNLOADED,
}

Observer = Callable[[str, int, str, float], None]  # model, version, status code name, seconds


def _noop(model: str, version: int, code: str, seconds: float) -> None:
    return None


def to_request(msg: pb.InferRequest, limits: Limits | None = None) -> InferenceRequest:
    if limits is not None:
        check_wire_elements((t.shape for t in msg.inputs), limits)
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
        version=msg.version or None,
        id=msg.id,
        outputs=list(msg.outputs) or None,
        timeout=msg.timeout_us / 1e6 if msg.timeout_us else None,
        priority=msg.priority,
    )


def to_response(result: InferenceResult) -> pb.InferResponse:
    return pb.InferResponse(
        model=result.model,
        version=result.version,
        id=result.id,
        outputs=[encode_tensor(name, arr) for name, arr in result.outputs.items()],
    )


def _tensor_metadata(spec: TensorSpec) -> tensor_pb2.TensorMetadata:
    return tensor_pb2.TensorMetadata(
        name=spec.name,
        dtype=spec.dtype,  # type: ignore[arg-type]  # a DataType value held as int
        shape=spec.shape,
    )


def metadata_of(lv: LoadedVersion, versions: list[int], default: int | None) -> pb.ModelMetadata:
    b = lv.config.batching
    return pb.ModelMetadata(
        name=lv.name,
        version=lv.version,
        versions=versions,
        default_version=default or 0,
        platform="onnxruntime_onnx",
        inputs=[_tensor_metadata(s) for s in lv.inputs],
        outputs=[_tensor_metadata(s) for s in lv.outputs],
        batching=pb.BatchingPolicy(
            max_batch_size=lv.max_batch_size,
            max_queue_delay_us=int(b.max_queue_delay_ms * 1000),
            max_queue_size=b.max_queue_size,
            default_timeout_us=int(b.default_timeout_ms * 1000),
            instance_count=lv.config.instances.count,
        ),
    )


def _dur(d: Duration) -> pb.Duration:
    return pb.Duration(count=d.count, ns=d.ns)


def statistics_of(lv: LoadedVersion) -> pb.ModelStatistics:
    s: VersionStats = lv.stats
    return pb.ModelStatistics(
        name=lv.name,
        version=lv.version,
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
            for _, b in sorted(s.batches.items())
        ],
        rejected_count=lv.batcher.rejected,
        expired_count=lv.batcher.expired,
        queue_depth=lv.batcher.queue_depth,
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        *,
        observe: Observer | None = None,
        max_stream_in_flight: int = 1024,
    ) -> None:
        self.dataplane = dataplane
        self.registry = dataplane.registry
        self.observe = observe or _noop
        self.max_stream_in_flight = max_stream_in_flight

    @translate_errors
    async def Infer(
        self, request: pb.InferRequest, context: aio.ServicerContext
    ) -> pb.InferResponse:
        start = time.perf_counter()
        try:
            result = await self.dataplane.infer(
                to_request(request, self.dataplane.limits), deadline=call_deadline(context)
            )
        except Exception as exc:
            self.observe(
                request.model, request.version, code_of(exc).name, time.perf_counter() - start
            )
            raise
        self.observe(result.model, result.version, "OK", time.perf_counter() - start)
        return to_response(result)

    async def InferStream(
        self, request_iterator: AsyncIterator[pb.InferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.InferStreamResponse]:
        """Requests run concurrently; responses are yielded as they complete, each with its
        request's id; a failed request gets an error response and the stream stays open
        (``run_stream`` bounds what is in flight)."""
        deadline = call_deadline(context)

        async def one(msg: pb.InferRequest) -> pb.InferStreamResponse:
            start = time.perf_counter()
            try:
                result = await self.dataplane.infer(
                    to_request(msg, self.dataplane.limits), deadline=deadline
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message, kind = status_of(exc)
                self.observe(msg.model, msg.version, code.name, time.perf_counter() - start)
                return pb.InferStreamResponse(
                    id=msg.id, error=pb.Error(code=code.value[0], message=message, kind=kind)
                )
            self.observe(result.model, result.version, "OK", time.perf_counter() - start)
            return pb.InferStreamResponse(id=msg.id, response=to_response(result))

        async for response in run_stream(request_iterator, one, self.max_stream_in_flight):
            yield response

    @translate_errors
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadata:
        lv = self.registry.get(request.model, request.version or None)
        entry = self.registry.models[lv.name]
        return metadata_of(lv, entry.ready_versions(), entry.default_version())

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
                for s in self.registry.statuses(request.model)
            ]
        )

    @translate_errors
    async def GetModelStatistics(
        self, request: pb.GetModelStatisticsRequest, context: aio.ServicerContext
    ) -> pb.GetModelStatisticsResponse:
        if request.model:
            if request.version:
                versions = [self.registry.get(request.model, request.version)]
            else:
                self.registry.statuses(request.model)  # NOT_FOUND for an unknown model
                versions = [
                    lv for lv in self.registry.loaded_versions() if lv.name == request.model
                ]
        else:
            if request.version:
                raise InvalidArgument("a version needs a model name")
            versions = self.registry.loaded_versions()
        return pb.GetModelStatisticsResponse(models=[statistics_of(lv) for lv in versions])
