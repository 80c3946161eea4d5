"""Building requests and parsing responses, with no IO: shared by the sync and async clients."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ferry.client._types import (
    BatchingPolicy,
    DurationStat,
    InferResult,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    TensorInfo,
    Timings,
)
from ferry.codec import CodecError, datatype_name, decode_tensor, encode_tensor
from ferry.proto.v1 import inference_pb2 as pb

ArrayLike = Any  # numpy arrays, torch tensors, Python scalars and (nested) lists

_STATES = {
    pb.MODEL_STATE_LOADING: "LOADING",
    pb.MODEL_STATE_READY: "READY",
    pb.MODEL_STATE_FAILED: "FAILED",
    pb.MODEL_STATE_UNLOADING: "UNLOADING",
    pb.MODEL_STATE_UNLOADED: "UNLOADED",
}


def as_array(value: ArrayLike, name: str = "") -> np.ndarray:
    """numpy passes through; a torch tensor is converted without importing torch ourselves
    (it is only touched when the caller already has one); anything else goes via np.asarray."""
    if isinstance(value, np.ndarray):
        return value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()  # type: ignore[no-any-return]
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"input {name!r}: cannot convert {type(value).__name__} to an array: {exc}")
    if arr.dtype.kind == "U":
        arr = arr.astype(object)
    return arr


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_infer_request(
    model: str,
    inputs: Mapping[str, ArrayLike],
    *,
    version: int | None = None,
    outputs: Sequence[str] | None = None,
    timeout: float | None = None,
    priority: int = 0,
    request_id: str = "",
) -> pb.InferRequest:
    tensors = [encode_tensor(name, as_array(value, name)) for name, value in inputs.items()]
    return pb.InferRequest(
        model=model,
        version=version or 0,
        id=request_id,
        inputs=tensors,
        outputs=list(outputs or ()),
        timeout_us=int(timeout * 1e6) if timeout else 0,
        priority=priority,
    )


def parse_infer_response(resp: pb.InferResponse, timings: Timings | None = None) -> InferResult:
    outputs = {t.name: decode_tensor(t) for t in resp.outputs}
    return InferResult(outputs, model=resp.model, version=resp.version, id=resp.id, timings=timings)


def _tensor_info(t: Any) -> TensorInfo:
    return TensorInfo(t.name, datatype_name(t.dtype), tuple(t.shape))


def parse_metadata(m: pb.ModelMetadata) -> ModelMetadata:
    b = m.batching
    return ModelMetadata(
        name=m.name,
        version=m.version,
        versions=tuple(m.versions),
        default_version=m.default_version,
        platform=m.platform,
        inputs=tuple(_tensor_info(t) for t in m.inputs),
        outputs=tuple(_tensor_info(t) for t in m.outputs),
        batching=BatchingPolicy(
            max_batch_size=b.max_batch_size,
            max_queue_delay=b.max_queue_delay_us / 1e6,
            max_queue_size=b.max_queue_size,
            default_timeout=b.default_timeout_us / 1e6 if b.default_timeout_us else None,
            instance_count=b.instance_count,
        ),
    )


def parse_list_models(resp: pb.ListModelsResponse) -> list[ModelVersionStatus]:
    return [
        ModelVersionStatus(m.name, m.version, _STATES.get(m.state, "UNKNOWN"), m.reason, m.is_default)
        for m in resp.models
    ]


def _dur(d: pb.Duration) -> DurationStat:
    return DurationStat(d.count, d.ns)


def parse_statistics(resp: pb.GetModelStatisticsResponse) -> list[ModelStatistics]:
    return [
        ModelStatistics(
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
            batch_sizes={b.batch_size: b.compute_infer.count for b in s.batch_stats},
            rejected_count=s.rejected_count,
            expired_count=s.expired_count,
            queue_depth=s.queue_depth,
        )
        for s in resp.models
    ]


def channel_options(max_message_bytes: int, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *extra,
    ]
