"""The synchronous clients."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ferry.client import _health
from ferry.client._base import InferenceClientBase
from ferry.client._channel import TLSConfig, create_channel
from ferry.client._errors import ClientClosedError, FerryError, InvalidInputError, from_rpc_error
from ferry.client._management import ManagementClient
from ferry.client._requests import (
    ArrayLike,
    check_timeout,
    needs_dtypes,
    parse_list_models,
    parse_metadata,
    parse_statistics,
    request,
)
from ferry.client._retry import call_with_retry
from ferry.client._stream import DEFAULT_MAX_IN_FLIGHT, InferStream, InputItem, StreamResult
from ferry.client._stream_limit import stream_metadata
from ferry.client._types import (
    InferResult,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    RefreshResult,
    Rollout,
    RolloutChange,
)
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import repository_pb2 as rpb
from ferry.proto.v1 import repository_pb2_grpc as rpb_grpc

__all__ = ["InferenceClient", "RepositoryClient"]

R = TypeVar("R")


class InferenceClient(InferenceClientBase):
    """Synchronous client of Ferry's inference listener.

    >>> with InferenceClient("127.0.0.1:8001") as client:          # doctest: +SKIP
    ...     out = client.infer("mlp", {"input": np.zeros((1, 64), np.float32)})
    ...     out["logits"].shape
    (1, 10)

    ``timeout`` is the default per-call deadline in seconds (``DEFAULT_TIMEOUT``, 10 s; None: no
    deadline); it is the budget of the whole call, retries and their pauses included. ``retry`` retries UNAVAILABLE,
    RESOURCE_EXHAUSTED and a CANCELLED the server sent, with exponential backoff (None or
    ``RetryPolicy.disabled()``: never).
    ``target`` may list several ``IP:PORT`` endpoints, balanced round-robin. ``tls``, ``token``,
    keepalive and message-size options are described in :class:`ChannelConfig`.
    """

    def _open(self) -> None:
        self._bind(create_channel(self.channel_config))

    def _call(self, method: Callable[..., R], request: Any, timeout: float | None) -> R:
        """One idempotent RPC with retries, translated errors and the call metadata."""

        def attempt(remaining: float | None) -> R:
            # Checked before every attempt, and after a failure: a client closed during a
            # retry's pause raised grpc's ValueError ("Cannot invoke RPC on closed channel!"),
            # and one closed during the call a CancelledError ("Channel closed!").
            self._check_open()
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as exc:
                self._check_open()
                raise from_rpc_error(exc) from None
            except ValueError:
                self._check_open()
                raise

        return call_with_retry(attempt, self.retry, self._timeout(timeout))

    def _input_dtypes(
        self, model: str, version: int | None, timeout: float | None = None
    ) -> dict[str, Any]:
        """The model's input dtypes, for list and scalar inputs; fetched once per model."""
        dtypes = self._known_dtypes(model, version)
        if dtypes is None:
            meta = self.model_metadata(model, version=version, timeout=timeout)
            dtypes = self._learn_dtypes(model, version, meta)
        return dtypes

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
        """Run one inference. ``timeout`` bounds the whole call (queueing included).

        Inputs are numpy arrays, torch tensors, or Python lists and scalars; the latter take the
        dtype the model declares (fetched once per model), since numpy would guess float64.
        """
        budget, began = self._budget(timeout)
        dtypes = (
            self._input_dtypes(model, version, budget)
            if needs_dtypes(inputs, model, version)
            else None
        )
        prepare = functools.partial(
            self._prepare_infer,
            model,
            inputs,
            version=version,
            outputs=outputs,
            priority=priority,
            request_id=request_id,
        )
        try:
            # Inside: a list number out of a stale cached dtype's range is refused here.
            call = prepare(dtypes=dtypes)
            return call.finish(self._call(self._infer, call.request, self._left(budget, began)))
        except InvalidInputError as exc:
            fresh = self._fresh_dtypes(model, version, dtypes, exc, self._left(budget, began))
            if fresh is None:
                raise
        # The cached dtypes were stale (a new default version takes others): once more, with
        # the model's dtypes as the server describes it now.
        call = prepare(dtypes=fresh)
        return call.finish(self._call(self._infer, call.request, self._left(budget, began)))

    def _fresh_dtypes(
        self,
        model: str,
        version: int | None,
        used: Mapping[str, Any] | None,
        refusal: Exception,
        timeout: float | None,
    ) -> dict[str, Any] | None:
        """After the server refused a request whose list inputs took ``used`` (the cached
        dtypes): the model's dtypes as it describes them now, when they differ (None: they do
        not, the request took none, the refusal is not about a datatype, or the metadata call
        failed; the refusal stands). At most one metadata call per refusal, none per request."""
        curable, fresh = self._stale_dtypes(model, version, used, refusal)
        if not curable:
            return None
        if fresh is None:
            try:
                fresh = self._input_dtypes(model, version, timeout)
            except FerryError:
                return None
        return fresh if fresh != used else None

    def model_metadata(
        self, model: str, *, version: int | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        m = self._call(
            self._stub.GetModelMetadata,
            request(pb.GetModelMetadataRequest, model=model, version=version or 0),
            timeout,
        )
        return parse_metadata(m)

    def list_models(
        self, model: str = "", *, timeout: float | None = None
    ) -> list[ModelVersionStatus]:
        resp = self._call(
            self._stub.ListModels, request(pb.ListModelsRequest, model=model), timeout
        )
        return parse_list_models(resp)

    def statistics(
        self, model: str = "", *, version: int | None = None, timeout: float | None = None
    ) -> list[ModelStatistics]:
        resp = self._call(
            self._stub.GetModelStatistics,
            request(pb.GetModelStatisticsRequest, model=model, version=version or 0),
            timeout,
        )
        return parse_statistics(resp)

    def ready(self, model: str = "", *, timeout: float | None = 5.0) -> bool:
        """True when the server (or ``model``) reports SERVING on the standard health service;
        False when it answers otherwise or cannot be reached."""
        self._check_open()
        try:
            raw = self._health(
                _health.encode_check_request(model),
                timeout=check_timeout(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError:
            # Closed during the check: ClientClosedError, as for every other call and as the
            # async client says (it was False, as if the server did not serve).
            self._check_open()
            return False
        except ValueError:  # "Cannot invoke RPC on closed channel!": closed since the check
            self._check_open()
            raise
        return _health.is_serving(raw)

    def stream(
        self,
        model: str,
        *,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> InferStream:
        """Open an ``InferStream`` to ``model``: many requests in flight on one call.

        ``timeout`` is the deadline of the whole stream (None: none; the client's default
        per-call timeout does not apply, since a stream lives as long as its caller wants).
        Streams are not retried: a failed request comes back as its error, to resubmit or not
        (but for list inputs refused for the cached dtypes, sent once more as ``infer`` does).
        """
        self._check_open()
        return InferStream(
            self._infer_stream,
            model,
            version=version,
            outputs=outputs,
            priority=priority,
            timeout=timeout,
            metadata=stream_metadata(self._metadata, self.channel_config.receive_limit()),
            max_in_flight=max_in_flight,
            dtypes=lambda timeout: self._input_dtypes(model, version, timeout),
            fresh_dtypes=lambda used, refusal, timeout: self._fresh_dtypes(
                model, version, used, refusal, timeout
            ),
            max_message_bytes=self.channel_config.send_limit(),
            client_closed=lambda: ClientClosedError.of(self) if self._closed else None,
        )

    def infer_many(
        self,
        model: str,
        items: Iterable[InputItem],
        *,
        max_in_flight: int = 64,
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """Run every item on one stream, ``max_in_flight`` at a time, yielding
        ``(id, InferResult | FerryError)`` in completion order; ids are the items' positions
        (``"0"``, ``"1"``, ...) unless an item is an ``(id, inputs)`` pair."""
        with self.stream(
            model, version=version, outputs=outputs, timeout=timeout, max_in_flight=max_in_flight
        ) as stream:
            yield from stream.infer_many(items, max_in_flight=max_in_flight)

    def close(self) -> None:
        """Close the channel; later calls raise ``ClientClosedError``. Closing twice is harmless."""
        self._closed = True
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


class RepositoryClient(ManagementClient):
    """Client of the management listener's repository service (loopback by default)."""

    def __init__(
        self,
        target: str = "127.0.0.1:8003",
        *,
        timeout: float | None = 120.0,
        tls: TLSConfig | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target, timeout=timeout, tls=tls, token=token, credentials=credentials, options=options
        )
        self._stub = rpb_grpc.ModelRepositoryStub(self._channel)

    def refresh(self) -> RefreshResult:
        """Re-scan the repository folder: load new versions, unload removed ones, retry failed
        ones; returns what changed."""
        response = self._call(self._stub.Refresh, rpb.RefreshRequest())
        failed = dict(_failure(line) for line in response.failed)
        return RefreshResult(tuple(response.loaded), tuple(response.unloaded), failed)

    def load_model(self, model: str) -> None:
        """Load (or reload) one model's versions per its config and version policy."""
        self._call(self._stub.LoadModel, request(rpb.LoadModelRequest, model=model))

    def unload_model(self, model: str) -> None:
        """Stop serving a model; its files stay in the repository."""
        self._call(self._stub.UnloadModel, request(rpb.UnloadModelRequest, model=model))

    def set_rollout(
        self,
        model: str,
        split: Mapping[int, float] | None,
        *,
        shadow: tuple[int, float] | None = None,
        rules: Mapping[str, float] | None = None,
        reason: str = "",
    ) -> Rollout:
        """Split the model's live traffic between versions by weight, e.g. ``{1: 0.9, 2: 0.1}``
        (None or empty: end the split). A request's id decides its version, so retries with
        the same id land on the same one; a request naming a version bypasses the split.
        ``shadow=(version, fraction)`` also runs that fraction of requests on a candidate
        after the caller's answer and compares the outputs (``get_rollout().shadow``).
        ``rules`` (with a shadow): ``promote_after`` comparisons within ``min_cosine``,
        ``max_error_rate`` and ``max_latency_ratio`` promote the candidate to all the
        traffic; crossing a bound rolls it back."""
        try:
            request = rpb.SetRolloutRequest(model=model, split=dict(split or {}), reason=reason)
            if shadow is not None:
                request.shadow_version, request.shadow_fraction = shadow
            if rules:
                numbers = {
                    k: _count(v) if k == "promote_after" else float(v) for k, v in rules.items()
                }
                request.rules.CopyFrom(rpb.RolloutRules(**numbers))  # type: ignore[arg-type]
        except (ValueError, TypeError, OverflowError) as exc:
            # A version past int64 (split={2**64: 1}), a rule protobuf does not know or a
            # promote_after past its range raised protobuf's own error (a traceback in
            # `ferry models rollout`): the caller's to fix, before anything is sent.
            raise InvalidInputError(f"rollout: {exc}") from None
        return _rollout(self._call(self._stub.SetRollout, request))

    def get_rollout(self, model: str) -> Rollout:
        return _rollout(
            self._call(self._stub.GetRollout, request(rpb.GetRolloutRequest, model=model))
        )


def _count(value: float) -> int:
    """A whole number of comparisons: ``int()`` cut a promote_after of 2.7 to 2 without a
    word, and raised OverflowError (past the caller's except) for an infinite one."""
    number = int(value)
    if isinstance(value, float) and value != number:
        raise ValueError(f"promote_after must be a whole number, not {value!r}")
    return number


def _rollout(message: rpb.Rollout) -> Rollout:
    return Rollout(
        model=message.model,
        split=dict(message.split),
        error=message.error,
        history=tuple(
            RolloutChange(h.at, h.by, h.reason, dict(h.split), h.shadow_version, h.shadow_fraction)
            for h in message.history
        ),
        shadow_version=message.shadow_version,
        shadow_fraction=message.shadow_fraction,
        shadow=(
            {
                f.name: float(getattr(message.shadow, f.name))
                for f in message.shadow.DESCRIPTOR.fields
            }
            if message.HasField("shadow")
            else {}
        ),
        rules={
            f.name: float(getattr(message.rules, f.name))
            for f in message.rules.DESCRIPTOR.fields
            if getattr(message.rules, f.name)
        },
    )


def _failure(line: str) -> tuple[str, str]:
    """``"name/version: reason"`` as (version, reason)."""
    version, _, reason = line.partition(": ")
    return version, reason
