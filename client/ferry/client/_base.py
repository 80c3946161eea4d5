"""What the sync and async inference clients share, with no IO.

``InferenceClient`` blocks and ``AsyncInferenceClient`` awaits; everything else (the constructor
and its defaults, the call metadata, the per-model dtype cache, how an Infer request is encoded and
its answer decoded and timed) is written once here, so the two cannot drift apart. A subclass adds
only the transport: when its channel is made, and a blocking call or an await around each RPC.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ferry.client import _health
from ferry.client._channel import DEFAULT_MAX_MESSAGE_BYTES, ChannelConfig, TLSConfig
from ferry.client._errors import ClientClosedError, InvalidArgumentError
from ferry.client._requests import ArrayLike, check_timeout, input_dtypes, refuses_datatype
from ferry.client._retry import RetryPolicy, client_retry
from ferry.client._types import InferResult, ModelMetadata, Timings
from ferry.client._wire import decode_infer_response, encode_infer_request
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc

# Inference and the read-only RPCs are idempotent, so the inference clients retry by default.
DEFAULT_RETRY = RetryPolicy()
# Seconds a unary call may take, retries included, unless the client or the call says otherwise
# (None: no deadline). Without one, a server that stopped answering (paused, or a blackholed
# address) holds each call until gRPC's 20 s connect timeout, or forever once connected; 10 s is
# far above any inference this server is meant for, and below that connect timeout.
DEFAULT_TIMEOUT = 10.0
INFER_METHOD = "/ferry.v1.Inference/Infer"
STREAM_METHOD = "/ferry.v1.Inference/InferStream"


@dataclass(frozen=True, slots=True)
class PreparedInfer:
    """An encoded Infer request, waiting for its answer; ``finish`` decodes it and fills in the
    timings, so both clients report the same three intervals the same way."""

    request: bytes
    encode_seconds: float
    encoded_at: float  # time.perf_counter() when encoding ended: the RPC is timed from here

    def finish(self, response: bytes) -> InferResult:
        t0 = time.perf_counter()
        result = decode_infer_response(response)
        result.timings = Timings(
            encode=self.encode_seconds,
            rpc=t0 - self.encoded_at,
            decode=time.perf_counter() - t0,
        )
        return result


class InferenceClientBase:
    """The state and request building both inference clients share; see the module docstring."""

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:8001",
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        tls: TLSConfig | None = None,
        token: str | None = None,
        keepalive_time: float | None = None,
        keepalive_timeout: float | None = None,
        load_balancing: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        connections: int = 1,
    ) -> None:
        self.target = target
        self.timeout = check_timeout(timeout, InvalidArgumentError)
        self.retry = client_retry(retry)
        self.channel_config = ChannelConfig(
            target,
            tls=tls,
            token=token,
            credentials=credentials,
            max_message_bytes=max_message_bytes,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            load_balancing=load_balancing,
            options=options,
            connections=connections,
        )
        self._metadata = self.channel_config.call_metadata()
        self._dtypes: dict[tuple[str, int], dict[str, Any]] = {}
        # Set by _bind, on a sync channel at construction or an aio one on first use.
        self._channel: Any = None
        self._stub: Any = None
        self._infer: Any = None
        self._infer_stream: Any = None
        self._health: Any = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        """Called last by the constructor: a subclass makes its channel now or defers it."""
        raise NotImplementedError

    def _bind(self, channel: Any) -> None:
        """The stub and the raw callables on ``channel`` (grpc and grpc.aio spell them alike).

        Requests are serialized by encode_infer_request (one copy of each tensor) and answers
        decoded from the received bytes without a copy, so Infer, InferStream and the health
        check move bytes as they are, with no (de)serializer."""
        self._channel = channel
        self._stub = pb_grpc.InferenceStub(channel)
        self._infer = channel.unary_unary(
            INFER_METHOD, request_serializer=None, response_deserializer=None
        )
        self._infer_stream = channel.stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=None
        )
        self._health = channel.unary_unary(
            _health.CHECK_METHOD, request_serializer=None, response_deserializer=None
        )

    def _check_open(self) -> None:
        """A closed channel answers with grpc's bare ValueError; say what happened instead."""
        if self._closed:
            raise ClientClosedError.of(self)

    def _timeout(self, timeout: float | None) -> float | None:
        """A call's budget: its own, else the client's (None for both: no deadline)."""
        return self.timeout if timeout is None else check_timeout(timeout)

    def _budget(self, timeout: float | None) -> tuple[float | None, float]:
        """A call's budget and when it began, for a call made of two RPCs (the metadata a list
        input needs, then the inference): the metadata call took the client's default timeout
        whatever the call's own was, so ``infer(..., timeout=0.5)`` waited 10 s on a server
        that did not answer (forever with ``timeout=None`` on the client)."""
        return self._timeout(timeout), time.monotonic()

    @staticmethod
    def _left(budget: float | None, began: float) -> float | None:
        """What is left of ``budget``; at least a microsecond, so that a spent budget reaches
        gRPC as a deadline already past (DEADLINE_EXCEEDED), never as "no deadline"."""
        return None if budget is None else max(budget - (time.monotonic() - began), 1e-6)

    def _known_dtypes(self, model: str, version: int | None) -> dict[str, Any] | None:
        """The model's input dtypes if already fetched; None means: fetch its metadata."""
        return self._dtypes.get((model, version or 0))

    def _learn_dtypes(self, model: str, version: int | None, meta: ModelMetadata) -> dict[str, Any]:
        dtypes = self._dtypes[(model, version or 0)] = input_dtypes(meta)
        return dtypes

    def _stale_dtypes(
        self, model: str, version: int | None, used: Mapping[str, Any] | None, refusal: Exception
    ) -> tuple[bool, dict[str, Any] | None]:
        """After the server refused a request whose list inputs took ``used`` (the dtypes cached
        then): whether dtypes fetched again could cure it, and the cached ones when they have
        moved on already (another refused call fetched them: no second metadata call).

        Only a refusal of a datatype can be cured (a wrong shape stood as well, after one
        wasted metadata call). Where it can and nothing newer is cached, the cache is dropped
        and the caller fetches it: the cached dtypes were those of the version that answered
        when they were fetched, and a new default version (or a version deleted and made
        again) may take others; kept, list inputs were converted to the old dtypes, and
        refused, until the client was recreated."""
        if used is None or not refuses_datatype(refusal, used):
            return False, None
        key = (model, version or 0)
        known = self._dtypes.get(key)
        if known is not None and known != used:
            return True, known
        self._dtypes.pop(key, None)
        return True, None

    @staticmethod
    def _prepare_infer(
        model: str,
        inputs: Mapping[str, ArrayLike],
        *,
        version: int | None,
        outputs: Sequence[str] | None,
        priority: int,
        request_id: str,
        dtypes: Mapping[str, Any] | None,
    ) -> PreparedInfer:
        t0 = time.perf_counter()
        request = encode_infer_request(
            model,
            inputs,
            version=version,
            outputs=outputs,
            priority=priority,
            request_id=request_id,
            dtypes=dtypes,
        )
        t1 = time.perf_counter()
        return PreparedInfer(request, t1 - t0, t1)
