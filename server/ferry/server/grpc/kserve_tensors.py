"""Open Inference Protocol tensors and request parameters <-> the core's numpy request/result.

Only what is particular to this wire format is checked here: datatype names, where the data is
(raw bytes or typed ``contents``, never both), element and byte counts against the declared shape,
and parameters. Whether the tensors fit the model (names, dtypes, shapes, batch size) is decided
once, in ``DataPlane``, for every protocol alike.

Raw contents take the fast path: one ``np.frombuffer`` per input on the way in, and on the way out
the response bytes built once by the wire codec the SDK shares (``ferry.codec._wire``), one copy
per output; no Python lists. Typed contents are the
slow, convenient path and pay for a conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ferry.codec import (
    CodecError,
    DataType,
    datatype_from_name,
    from_bytes,
)
from ferry.codec._tensor import MAX_DIMS, too_many_dims, too_many_elements
from ferry.codec._wire import encode_oip_response, encode_oip_stream_result
from ferry.proto.kserve.v2 import grpc_service_pb2 as pb
from ferry.server.core.inputs import check_counts, check_wire_elements
from ferry.server.core.types import InferenceRequest, InferenceResult, Limits, parse_version
from ferry.server.errors import InvalidArgument, Unimplemented

# Typed contents: datatype -> (the InferTensorContents field that carries it, the numpy dtype of
# that field's values, the numpy dtype of the tensor). The narrow integer types travel widened to
# 32 bits, so their values are range-checked before narrowing.
TYPED: dict[int, tuple[str, np.dtype[Any], np.dtype[Any]]] = {
    DataType.DATA_TYPE_BOOL: ("bool_contents", np.dtype(np.bool_), np.dtype(np.bool_)),
    DataType.DATA_TYPE_INT8: ("int_contents", np.dtype(np.int32), np.dtype(np.int8)),
    DataType.DATA_TYPE_INT16: ("int_contents", np.dtype(np.int32), np.dtype(np.int16)),
    DataType.DATA_TYPE_INT32: ("int_contents", np.dtype(np.int32), np.dtype(np.int32)),
    DataType.DATA_TYPE_INT64: ("int64_contents", np.dtype(np.int64), np.dtype(np.int64)),
    DataType.DATA_TYPE_UINT8: ("uint_contents", np.dtype(np.uint32), np.dtype(np.uint8)),
    DataType.DATA_TYPE_UINT16: ("uint_contents", np.dtype(np.uint32), np.dtype(np.uint16)),
    DataType.DATA_TYPE_UINT32: ("uint_contents", np.dtype(np.uint32), np.dtype(np.uint32)),
    DataType.DATA_TYPE_UINT64: ("uint64_contents", np.dtype(np.uint64), np.dtype(np.uint64)),
    DataType.DATA_TYPE_FP32: ("fp32_contents", np.dtype(np.float32), np.dtype(np.float32)),
    DataType.DATA_TYPE_FP64: ("fp64_contents", np.dtype(np.float64), np.dtype(np.float64)),
    DataType.DATA_TYPE_BYTES: ("bytes_contents", np.dtype(object), np.dtype(object)),
}
RAW_ONLY = frozenset({DataType.DATA_TYPE_FP16, DataType.DATA_TYPE_BF16})
_BYTES_NAME = "BYTES"

# Parameters that ask for features Ferry does not have: refusing them beats silently returning
# something other than what was asked (a stateless answer to a sequence, a full tensor instead
# of top-k classes, data that is not where a shared-memory client will look for it).
SHARED_MEMORY = "shared_memory_region"
NO_SEQUENCES = (
    "sequence batching is not supported: Ferry's models are stateless, so a request must not "
    "carry a sequence_id"
)
UNSUPPORTED_OUTPUT_PARAMETERS = {
    "classification": "classification outputs (class_count) are not supported; request the "
    "raw output and take the top-k on the client",
    SHARED_MEMORY: "shared memory is not supported; outputs come back in raw_output_contents",
}


def decode_request(msg: pb.ModelInferRequest, limits: Limits | None = None) -> InferenceRequest:
    if limits is not None:
        check_counts(len(msg.inputs), len(msg.outputs), limits)
        check_wire_elements(
            (t.shape for t in msg.inputs),
            limits,
            (t.shape for t in msg.inputs if t.datatype == _BYTES_NAME),
        )
    raw = msg.raw_input_contents
    inputs: dict[str, np.ndarray] = {}
    if raw:
        if len(raw) != len(msg.inputs):
            for tensor in msg.inputs:
                # The likelier mistakes: an input in shared memory (tritonclient sends it no
                # raw entry) or some inputs typed, some raw.
                _refuse_shared_memory(tensor)
                _refuse_typed(tensor)
            raise InvalidArgument(
                f"the request has {len(msg.inputs)} inputs but {len(raw)} raw_input_contents "
                "entries: send one entry per input, in the same order"
            )
        for tensor, data in zip(msg.inputs, raw, strict=True):
            _refuse_typed(tensor)
            _add(inputs, tensor, _decode_raw(tensor, data))
    else:
        for tensor in msg.inputs:
            _add(inputs, tensor, decode_typed(tensor))
    outputs = _requested_outputs(msg.outputs) if msg.outputs else None
    timeout, priority = _request_parameters(msg.parameters) if msg.parameters else (None, 0)
    return InferenceRequest(
        model=msg.model_name,
        inputs=inputs,
        version=parse_version(msg.model_version),
        id=msg.id,
        outputs=outputs,
        timeout=timeout,
        priority=priority,
    )


def serialize_response(result: InferenceResult) -> bytes:
    """The serialized ``ModelInferResponse`` (every output as raw contents, which tritonclient
    and perf_analyzer read first), built once with the shared wire codec: each output is copied
    once, where building a protobuf message copied it three times."""
    return encode_oip_response(result.model, str(result.version), result.id, result.outputs)


def serialize_stream_response(result: InferenceResult) -> bytes:
    """The serialized ``ModelStreamInferResponse`` carrying ``result``."""
    return encode_oip_stream_result(result.model, str(result.version), result.id, result.outputs)


def _refuse_typed(tensor: pb.ModelInferRequest.InferInputTensor) -> None:
    if tensor.HasField("contents") and tensor.contents.ListFields():
        raise InvalidArgument(
            f"input {tensor.name!r} has typed contents but the request also carries "
            "raw_input_contents: use one or the other for every input of a request"
        )


def _add(
    inputs: dict[str, np.ndarray], tensor: pb.ModelInferRequest.InferInputTensor, array: np.ndarray
) -> None:
    if tensor.name in inputs:
        raise InvalidArgument(f"input {tensor.name!r} appears twice in the request")
    inputs[tensor.name] = array


def _refuse_shared_memory(tensor: pb.ModelInferRequest.InferInputTensor) -> None:
    if tensor.parameters and SHARED_MEMORY in tensor.parameters:
        raise Unimplemented(
            f"input {tensor.name!r}: shared memory is not supported; send the data in "
            "raw_input_contents"
        )


def _datatype(tensor: pb.ModelInferRequest.InferInputTensor) -> int:
    _refuse_shared_memory(tensor)
    try:
        return datatype_from_name(tensor.datatype)
    except CodecError as exc:
        raise InvalidArgument(f"input {tensor.name!r}: {exc}") from None


def _decode_raw(tensor: pb.ModelInferRequest.InferInputTensor, data: bytes) -> np.ndarray:
    try:
        return from_bytes(_datatype(tensor), tensor.shape, data, name=tensor.name)
    except CodecError as exc:
        raise InvalidArgument(str(exc)) from None


def decode_typed(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    """One input from its typed ``contents``; its element count must match its shape."""
    code = _datatype(tensor)
    name = tensor.name
    if code in RAW_ONLY:
        raise InvalidArgument(
            f"input {name!r}: {tensor.datatype} has no typed contents field (raw only); send it "
            "in raw_input_contents"
        )
    field, wire_dtype, dtype = TYPED[code]
    if len(tensor.shape) > MAX_DIMS:
        raise InvalidArgument(str(too_many_dims(len(tensor.shape), name)))
    shape = tuple(tensor.shape)
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count *= dim
    contents = tensor.contents
    present = [f.name for f, _ in contents.ListFields()]
    if any(f != field for f in present):
        raise InvalidArgument(
            f"input {name!r} is {tensor.datatype}, whose data goes in contents.{field}; got "
            f"{', '.join(present)}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        if not present and count:
            raise InvalidArgument(
                f"input {name!r} has no data: send it in raw_input_contents or contents.{field}"
            )
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)} holds {count} elements, got {len(values)} in "
            f"contents.{field}"
        )
    if code == DataType.DATA_TYPE_BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return reshape_input(array, shape, name)
    array = np.fromiter(values, wire_dtype, count=count)
    if dtype != wire_dtype:
        info = np.iinfo(dtype)
        if count and (array.min() < info.min or array.max() > info.max):
            raise InvalidArgument(
                f"input {name!r}: {tensor.datatype} values must lie in [{info.min}, {info.max}], "
                f"got values in [{array.min()}, {array.max()}] in contents.{field}"
            )
        array = array.astype(dtype)
    return reshape_input(array, shape, name)


def reshape_input(array: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        return array.reshape(shape)
    except ValueError as exc:  # e.g. more dims than numpy supports
        # A zero among absurd dims ([2**62, 2**62, 0]) holds no element, so the count check
        # passed, but numpy cannot make the shape: say so as the raw path does, not numpy's
        # "cannot reshape array of size 0".
        error = too_many_elements(shape, name)
        if error is not None:
            raise InvalidArgument(str(error)) from None
        raise InvalidArgument(f"input {name!r}: cannot reshape to {list(shape)}: {exc}") from None


def _requested_outputs(
    outputs: Any,  # RepeatedCompositeFieldContainer[InferRequestedOutputTensor]
) -> list[str]:
    names: dict[str, None] = {}  # in request order; a set's lookup, not a list's scan
    for out in outputs:
        if out.parameters:
            for key, why in UNSUPPORTED_OUTPUT_PARAMETERS.items():
                # class_count 0 is Triton's "no classification", as it is on HTTP.
                if key in out.parameters and _holds(out.parameters[key]):
                    raise Unimplemented(f"output {out.name!r}: {why}")
        if out.name in names:
            raise InvalidArgument(f"output {out.name!r} is requested twice")
        names[out.name] = None
    return list(names)


def _request_parameters(params: Mapping[str, pb.InferParameter]) -> tuple[float | None, int]:
    """``timeout`` (microseconds; 0 keeps the model's default) and ``priority`` (0 keeps the
    model's default, 1 is the highest); the others Ferry has no use for are ignored, except
    those whose meaning it cannot honour."""
    timeout: float | None = None
    priority = 0
    if "timeout" in params:
        us = _non_negative_int(params["timeout"], "timeout")
        timeout = us / 1e6 if us else None
    if "priority" in params:
        priority = _non_negative_int(params["priority"], "priority")
    # Whatever kind it came as (a uint64_param was answered statelessly): only 0 or "" means
    # no sequence, as on HTTP.
    if "sequence_id" in params and _holds(params["sequence_id"]):
        raise Unimplemented(NO_SEQUENCES)
    return timeout, priority


def _holds(param: pb.InferParameter) -> bool:
    """Whether a parameter asks for something: set, and not 0, false or "" (its kind's
    empty value, which HTTP's JSON reads as "not asked" too)."""
    kind = param.WhichOneof("parameter_choice")
    return kind is not None and bool(getattr(param, kind))


def _non_negative_int(param: pb.InferParameter, key: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        value = param.int64_param
    elif kind == "uint64_param":
        value = param.uint64_param
    else:
        raise InvalidArgument(
            f"request parameter {key!r} must be an int64_param or uint64_param, got {kind}"
        )
    if value < 0:
        raise InvalidArgument(f"request parameter {key!r} must be >= 0, got {value}")
    return value
