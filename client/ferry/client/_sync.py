"""The synchronous clients."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from ferry.client import _health
from ferry.client._errors import from_rpc_error
from ferry.client._requests import (
    ArrayLike,
    build_infer_request,
    channel_options,
    parse_infer_response,
    parse_list_models,
    parse_metadata,
    parse_statistics,
)
from ferry.client._types import (
    InferResult,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    Timings,
)
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import repository_pb2 as rpb
from ferry.proto.v1 import repository_pb2_grpc as rpb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 80 * 1024 * 1024


def _channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    max_message_bytes: int,
    options: Sequence[tuple[str, Any]],
) -> grpc.Channel:
    opts = channel_options(max_message_bytes, options)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=opts)
    return grpc.insecure_channel(target, options=opts)


class InferenceClient:
    """Synchronous client of Ferry's inference listener.

    >>> with InferenceClient("127.0.0.1:8001") as client:          # doctest: +SKIP
    ...     out = client.infer("mlp", {"input": np.zeros((1, 64), np.float32)})
    ...     out["logits"].shape
    (1, 10)

    ``timeout`` is the default per-call deadline in seconds (None: no deadline).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:8001",
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = _channel(target, credentials, max_message_bytes, options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = self._channel.unary_unary(
            _health.CHECK_METHOD, request_serializer=None, response_deserializer=None
        )

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def infer(
        self,
        model: str,
        inputs: Mapping[str, ArrayLike],
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        priority: int = 0,
        request_id: str = "",
    ) -> InferResult:
        """Run one inference. ``timeout`` bounds the whole call (queueing included)."""
        t0 = time.perf_counter()
        request = build_infer_request(
            model, inputs, version=version, outputs=outputs, priority=priority,
            request_id=request_id,
        )
        t1 = time.perf_counter()
        try:
            response = self._stub.Infer(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        t2 = time.perf_counter()
        result = parse_infer_response(response)
        t3 = time.perf_counter()
        result.timings = Timings(encode=t1 - t0, rpc=t2 - t1, decode=t3 - t2)
        return result

    def model_metadata(
        self, model: str, *, version: int | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        try:
            m = self._stub.GetModelMetadata(
                pb.GetModelMetadataRequest(model=model, version=version or 0),
                timeout=self._timeout(timeout),
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return parse_metadata(m)

    def list_models(self, model: str = "", *, timeout: float | None = None) -> list[ModelVersionStatus]:
        try:
            resp = self._stub.ListModels(
                pb.ListModelsRequest(model=model), timeout=self._timeout(timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return parse_list_models(resp)

    def statistics(
        self, model: str = "", *, version: int | None = None, timeout: float | None = None
    ) -> list[ModelStatistics]:
        try:
            resp = self._stub.GetModelStatistics(
                pb.GetModelStatisticsRequest(model=model, version=version or 0),
                timeout=self._timeout(timeout),
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return parse_statistics(resp)

    def ready(self, model: str = "", *, timeout: float | None = 5.0) -> bool:
        """True when the server (or ``model``) reports SERVING on the standard health service;
        False when it answers otherwise or cannot be reached."""
        try:
            raw = self._health(_health.encode_check_request(model), timeout=timeout)
        except grpc.RpcError:
            return False
        return _health.decode_check_response(raw) == _health.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RepositoryClient:
    """Client of the management listener's repository service (loopback by default)."""

    def __init__(
        self,
        target: str = "127.0.0.1:8003",
        *,
        timeout: float | None = 120.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.timeout = timeout
        self._channel = _channel(target, credentials, DEFAULT_MAX_MESSAGE_BYTES, options)
        self._stub = rpb_grpc.ModelRepositoryStub(self._channel)

    def refresh(self) -> rpb.RefreshResponse:
        """Re-scan the repository folder; returns what was loaded, unloaded and failed."""
        try:
            response: rpb.RefreshResponse = self._stub.Refresh(
                rpb.RefreshRequest(), timeout=self.timeout
            )
            return response
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def load_model(self, model: str) -> None:
        try:
            self._stub.LoadModel(rpb.LoadModelRequest(model=model), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def unload_model(self, model: str) -> None:
        try:
            self._stub.UnloadModel(rpb.UnloadModelRequest(model=model), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RepositoryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
