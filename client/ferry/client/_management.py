"""What the management-listener clients share: one channel, the call metadata (token), a
default per-call timeout, and the one translation of grpc errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from ferry.client._channel import ChannelConfig, TLSConfig, create_channel
from ferry.client._errors import ClientClosedError, FerryError, InvalidArgumentError, from_rpc_error
from ferry.client._requests import check_timeout


class ManagementClient:
    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        tls: TLSConfig | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.timeout = check_timeout(timeout, InvalidArgumentError)
        self.channel_config = ChannelConfig(
            target, tls=tls, token=token, credentials=credentials, options=options
        )
        self._metadata = self.channel_config.call_metadata()
        self._channel = create_channel(self.channel_config)
        self._closed = False

    def _check_open(self) -> None:
        """A closed channel answers with grpc's bare ValueError; say what happened instead."""
        if self._closed:
            raise ClientClosedError.of(self)

    def _failed(self, exc: grpc.RpcError) -> FerryError:
        """A failed call as the SDK's error: ClientClosedError when the client was closed under
        it (it was grpc's CancelledError "Channel closed!", as if someone had cancelled it),
        as the inference clients say."""
        self._check_open()
        return from_rpc_error(exc)

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        """One unary call with the client's timeout and token; errors become FerryErrors."""
        self._check_open()
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else check_timeout(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._failed(exc) from None
        except ValueError:  # "Cannot invoke RPC on closed channel!": closed since the check
            self._check_open()
            raise

    def close(self) -> None:
        """Close the channel; later calls raise ``ClientClosedError``."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
