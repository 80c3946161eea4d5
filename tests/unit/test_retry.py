"""The SDK's transport policy without sockets: retry/backoff arithmetic on a fake clock, and how
channel options, targets, TLS and tokens are put together (``_channel``)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest

from ferry.client import (
    AsyncInferenceClient,
    CancelledError,
    ChannelConfig,
    ConnectionError_,
    ConversionClient,
    FerryError,
    InferenceClient,
    InvalidInputError,
    LimitExceededError,
    ModelNotReadyError,
    ResourceExhaustedError,
    RetryPolicy,
    ServerCancelledError,
    ServerOverloadedError,
    TLSConfig,
)
from ferry.client._channel import resolve_target, split_endpoints
from ferry.client._errors import InvalidArgumentError, from_rpc_error
from ferry.client._retry import NO_RETRY, acall_with_retry, call_with_retry
from ferry.client.loadtest import LoadTestConfig

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(errors: list[FerryError], clock: FakeClock, cost: float = 0.0):
    """An attempt function raising ``errors`` in turn, then returning "ok"; records budgets."""
    budgets: list[float | None] = []

    def attempt(remaining: float | None) -> str:
        budgets.append(remaining)
        clock.now += cost
        if errors:
            raise errors.pop(0)
        return "ok"

    return attempt, budgets


def unavailable() -> FerryError:
    return ConnectionError_("down", code=UNAVAILABLE)


def test_backoff_grows_geometrically_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, multiplier=3, max_backoff=1.0, jitter=0)
    assert [policy.backoff(n) for n in range(1, 5)] == pytest.approx([0.1, 0.3, 0.9, 1.0])


def test_jitter_stays_within_its_band_and_varies() -> None:
    policy = RetryPolicy(initial_backoff=1.0, jitter=0.25)
    rng = random.Random(7)
    values = [policy.backoff(1, rng) for _ in range(200)]
    assert all(0.75 <= v <= 1.25 for v in values)
    assert len(set(values)) > 100


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ConnectionError_("x", code=UNAVAILABLE), True),
        (ModelNotReadyError("x", code=UNAVAILABLE), True),
        (ServerOverloadedError("x", code=EXHAUSTED), True),
        (LimitExceededError("x", code=EXHAUSTED), False),  # retrying cannot help
        (InvalidInputError("x", code=grpc.StatusCode.INVALID_ARGUMENT), False),
        # gRPC's own size check: the same message would be refused again.
        (ResourceExhaustedError("Sent message larger than max (9 vs. 4)", code=EXHAUSTED), False),
    ],
)
def test_what_is_retried(error: FerryError, retried: bool) -> None:
    assert RetryPolicy().should_retry(error, 1) is retried


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.parametrize(
    ("details", "retried"),
    [
        ("CANCELLED", True),  # the server reset it: shutting down, or over its pending bound
        ("Locally cancelled by application!", False),
        ("Channel closed!", False),
    ],
)
def test_only_a_cancel_the_server_sent_is_retried(details: str, retried: bool) -> None:
    """About one call per caller in flight ended CANCELLED, unretried, at a server's SIGTERM:
    grpc's core resets the calls it holds unstarted."""
    error = from_rpc_error(_RpcError(grpc.StatusCode.CANCELLED, details))
    assert isinstance(error, CancelledError)
    assert isinstance(error, ServerCancelledError) is retried
    assert RetryPolicy().should_retry(error, 1) is retried


def test_retryable_codes_are_configurable() -> None:
    policy = RetryPolicy(retryable_codes=frozenset({EXHAUSTED}))
    assert not policy.should_retry(unavailable(), 1)
    assert policy.should_retry(ServerOverloadedError("x", code=EXHAUSTED), 1)


def test_succeeds_after_retries_with_backoff_pauses() -> None:
    clock = FakeClock()
    attempt, budgets = failing([unavailable(), unavailable()], clock)
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2, jitter=0)
    assert call_with_retry(attempt, policy, None, sleep=clock.sleep, clock=clock) == "ok"
    assert clock.sleeps == pytest.approx([0.1, 0.2])
    assert budgets == [None, None, None]


def test_each_attempt_gets_what_is_left_of_one_budget() -> None:
    clock = FakeClock()
    attempt, budgets = failing([unavailable(), unavailable()], clock, cost=0.5)
    policy = RetryPolicy(initial_backoff=0.25, multiplier=1, jitter=0)
    call_with_retry(attempt, policy, 3.0, sleep=clock.sleep, clock=clock)
    assert budgets == pytest.approx([3.0, 2.25, 1.5])


def test_gives_up_with_the_last_error_when_the_budget_cannot_cover_a_pause() -> None:
    clock = FakeClock()
    errors = [unavailable() for _ in range(5)]
    last = errors[1]
    attempt, budgets = failing(errors, clock, cost=0.4)
    policy = RetryPolicy(initial_backoff=0.3, multiplier=1, jitter=0)
    with pytest.raises(ConnectionError_) as info:
        call_with_retry(attempt, policy, 1.0, sleep=clock.sleep, clock=clock)
    assert info.value is last
    assert len(budgets) == 2


def test_max_attempts_counts_the_first_try() -> None:
    clock = FakeClock()
    attempt, budgets = failing([unavailable() for _ in range(9)], clock)
    with pytest.raises(ConnectionError_):
        call_with_retry(attempt, RetryPolicy(max_attempts=3), None, sleep=clock.sleep, clock=clock)
    assert len(budgets) == 3


def test_disabled_policy_never_retries_and_errors_pass_through() -> None:
    clock = FakeClock()
    attempt, budgets = failing([unavailable()], clock)
    with pytest.raises(ConnectionError_):
        call_with_retry(attempt, NO_RETRY, None, sleep=clock.sleep, clock=clock)
    assert len(budgets) == 1 and not clock.sleeps
    attempt, budgets = failing([InvalidInputError("bad")], clock)
    with pytest.raises(InvalidInputError):
        call_with_retry(attempt, RetryPolicy(), None, sleep=clock.sleep, clock=clock)
    assert len(budgets) == 1


def test_async_retry_matches_the_sync_one() -> None:
    calls: list[float | None] = []

    async def attempt(remaining: float | None) -> str:
        calls.append(remaining)
        if len(calls) < 3:
            raise ServerOverloadedError("full", code=EXHAUSTED)
        return "ok"

    policy = RetryPolicy(initial_backoff=0.001, jitter=0)
    assert asyncio.run(acall_with_retry(attempt, policy, 30.0)) == "ok"
    assert len(calls) == 3
    assert calls[0] is not None and calls[0] >= calls[1] >= calls[2]  # type: ignore[operator]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_backoff": -1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        # each of these was accepted, and failed or misbehaved only when a call was retried
        {"max_attempts": 2.5},
        {"max_attempts": "3"},
        {"initial_backoff": float("nan")},
        {"max_backoff": float("inf")},
        {"multiplier": float("inf")},
        {"retryable_codes": frozenset({"UNAVAILABLE"})},
        {"retryable_codes": "UNAVAILABLE"},
        # accepted, and never retried: no error of these codes is one that can succeed later
        {"retryable_codes": frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})},
        {"retryable_codes": frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_a_long_retry_series_does_not_overflow_its_backoff() -> None:
    """initial_backoff * multiplier ** (attempt - 1) raised OverflowError from the call at the
    401st attempt with multiplier 10 (a policy of many attempts within a long budget)."""
    policy = RetryPolicy(max_attempts=10_000, multiplier=10.0, max_backoff=2.0, jitter=0)
    assert policy.backoff(401) == 2.0 and policy.backoff(9_999) == 2.0


# --- channel construction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:8001", ("127.0.0.1:8001", 1)),
        ("dns:///ferry.internal:8001", ("dns:///ferry.internal:8001", 1)),
        (["127.0.0.1:1", "127.0.0.1:2"], ("ipv4:127.0.0.1:1,127.0.0.1:2", 2)),
        ("127.0.0.1:1, 127.0.0.2:2", ("ipv4:127.0.0.1:1,127.0.0.2:2", 2)),
        (["[::1]:1", "[::1]:2"], ("ipv6:[::1]:1,[::1]:2", 2)),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", ("ipv4:10.0.0.1:1,10.0.0.2:1", 2)),
        (["localhost:9"], ("localhost:9", 1)),
        # gRPC refused the space ("the target uri is not valid"): the list is rebuilt.
        ("ipv4:10.0.0.1:1, 10.0.0.2:1 ", ("ipv4:10.0.0.1:1,10.0.0.2:1", 2)),
        ("ipv4:///10.0.0.1:1", ("ipv4:10.0.0.1:1", 1)),
        ("ipv6:[::1]:1,[::2]:2", ("ipv6:[::1]:1,[::2]:2", 2)),
    ],
)
def test_resolve_target(target: str | list[str], expected: tuple[str, int]) -> None:
    assert resolve_target(target) == expected


def test_the_endpoints_of_an_address_list_with_an_empty_authority() -> None:
    """``ipv4:///A,B`` (gRPC reads it) split into "///A" and "B": the load test then opened
    a client on "///A", which no resolver reads."""
    assert split_endpoints("ipv4:///127.0.0.1:1,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert split_endpoints(" ipv6:[::1]:1") == ["[::1]:1"]


@pytest.mark.parametrize(
    "target", [["a.example:1", "b.example:1"], ["127.0.0.1:1", "[::1]:1"], [], "", "  "]
)
def test_resolve_target_refuses_what_grpc_cannot_list(target: str | list[str]) -> None:
    """An empty target reached grpc, which logged "no server name supplied in dns URI"."""
    with pytest.raises(ValueError):
        resolve_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:port",
        "127.0.0.1:",
        ":8001",
        "a:1:2",
        "[::1]x",
        "127.0.0.1:1,127.0.0.1:x",
        ["127.0.0.1:1", "127.0.0.1:x"],
        "ipv4:127.0.0.1:1,127.0.0.1:port",
        "dns:///localhost:port",
        # gRPC's ipv4:/ipv6: schemes take literal addresses, each with its port: these were
        # accepted and every call failed UNKNOWN "the target uri is not valid" (ServerError).
        "ipv4:127.0.0.1",
        "ipv4:127.0.0.1,127.0.0.2:1",
        "ipv4:localhost:8001",
        "ipv4:[127.0.0.1]:8001",
        "ipv4:",
        "ipv6:[::1]",
        "ipv6:::1:8001",
        "ipv6:[127.0.0.1]:8001",
    ],
)
def test_clients_refuse_an_endpoint_grpc_cannot_reach_when_made(target: str | list[str]) -> None:
    """Each was accepted when the client was made and failed only at the first call (the
    async client's with a traceback out of gRPC's channel builder)."""
    with pytest.raises(InvalidArgumentError):
        InferenceClient(target)
    with pytest.raises(InvalidArgumentError):
        AsyncInferenceClient(target)


@pytest.mark.parametrize(
    "target", ["localhost", "localhost:8001", "[::1]:8001", "[::1]", "::1", "unix:/tmp/s"]
)
def test_targets_grpc_reads_are_still_accepted(target: str) -> None:
    InferenceClient(target).close()


def test_several_endpoints_get_round_robin_and_one_keeps_the_default() -> None:
    many = dict(ChannelConfig(["127.0.0.1:1", "127.0.0.1:2"]).channel_options())
    assert many["grpc.lb_policy_name"] == "round_robin"
    one = dict(ChannelConfig("127.0.0.1:1").channel_options())
    assert "grpc.lb_policy_name" not in one
    forced = dict(ChannelConfig("dns:///x:1", load_balancing="round_robin").channel_options())
    assert forced["grpc.lb_policy_name"] == "round_robin"


def test_keepalive_message_size_and_raw_options() -> None:
    opts = ChannelConfig(
        keepalive_time=30,
        keepalive_timeout=5,
        keepalive_permit_without_calls=True,
        max_message_bytes=1024,
        options=[("grpc.max_send_message_length", 2048)],
    ).channel_options()
    d = dict(opts)
    assert d["grpc.keepalive_time_ms"] == 30_000
    assert d["grpc.keepalive_timeout_ms"] == 5_000
    assert d["grpc.keepalive_permit_without_calls"] == 1
    assert d["grpc.max_receive_message_length"] == 1024
    assert d["grpc.max_send_message_length"] == 2048  # raw options are applied last and win


def test_token_rides_as_metadata_only_without_tls() -> None:
    plain = ChannelConfig(token="s3cret")
    assert plain.call_metadata() == (("authorization", "Bearer s3cret"),)
    assert plain.channel_credentials() is None
    secure = ChannelConfig(token="s3cret", tls=TLSConfig(ca_cert=b"pem"))
    assert secure.call_metadata() is None  # sent as call credentials instead
    assert secure.channel_credentials() is not None
    assert ChannelConfig().call_metadata() is None


def test_tls_options_and_validation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    opts = dict(ChannelConfig(tls=TLSConfig(server_name_override="ferry.test")).channel_options())
    assert opts["grpc.ssl_target_name_override"] == "ferry.test"
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(client_cert=b"cert")
    with pytest.raises(ValueError, match="cannot read the CA certificate"):
        TLSConfig(ca_cert=tmp_path / "missing.pem").credentials()
    with pytest.raises(ValueError, match="not both"):
        ChannelConfig(tls=TLSConfig(), credentials=grpc.ssl_channel_credentials())
    for bad in ({"max_message_bytes": 0}, {"keepalive_time": 0}, {"token": "a\nb"}):
        with pytest.raises(ValueError):
            ChannelConfig(**bad)  # type: ignore[arg-type]


def test_an_unreadable_pem_file_is_refused_when_either_client_is_made(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The sync client read its PEM files when made; the async one only at its first call
    (its channel is made on first use), so a missing CA file was a ValueError out of the first
    ``await client.infer(...)``, and a traceback from `ferry loadtest --tls-ca MISSING`."""
    from ferry.client import AsyncInferenceClient, InferenceClient

    missing = TLSConfig(ca_cert=tmp_path / "missing.pem")
    for cls in (InferenceClient, AsyncInferenceClient):
        with pytest.raises(ValueError, match="cannot read the CA certificate"):
            cls("127.0.0.1:1", tls=missing)


@pytest.mark.parametrize(
    "bad",
    [
        {"connections": 1.5},  # TypeError from range() when the channel was made
        {"connections": True},
        {"max_message_bytes": 2**40},  # OverflowError: gRPC takes a C int
        {"max_message_bytes": 1.5},
        {"keepalive_time": float("nan")},  # ValueError from int() when the channel was made
        {"keepalive_time": float("inf")},  # OverflowError
        {"keepalive_timeout": 1e30},
        {"token": 5},  # TypeError ("argument of type 'int' is not iterable")
        {"load_balancing": 5},
    ],
)
def test_channel_options_grpc_cannot_take_are_refused_with_value_error(
    bad: dict[str, Any],
) -> None:
    """Each was accepted by ChannelConfig and failed when a channel was made, with TypeError or
    OverflowError: at construction for the sync client, at the first call for the async one."""
    with pytest.raises(ValueError):
        ChannelConfig(**bad)
    with pytest.raises(ValueError):
        AsyncInferenceClient("127.0.0.1:1", **bad)


def test_a_certificate_path_is_read_within_a_bound() -> None:
    """TLSConfig(ca_cert="/dev/zero") read the device until memory ran out (`ferry infer
    --tls-ca /dev/zero`); a bounded read refuses it."""
    with pytest.raises(ValueError, match="is over 16,777,216 bytes"):
        TLSConfig(ca_cert="/dev/zero").credentials()


@pytest.mark.parametrize(
    "make",
    [
        lambda: InferenceClient("127.0.0.1:1").stream("mlp", max_in_flight=0),
        lambda: InferenceClient("127.0.0.1:1").stream("mlp", max_in_flight=None),
        lambda: next(iter(InferenceClient("127.0.0.1:1").infer_many("mlp", [], max_in_flight=0))),
        lambda: InferenceClient("127.0.0.1:1", timeout=0),
        lambda: InferenceClient("127.0.0.1:1", max_message_bytes=0),
        lambda: InferenceClient([]),
        lambda: InferenceClient("127.0.0.1:1", token="two\nlines"),
        lambda: InferenceClient("127.0.0.1:1", retry="often"),  # type: ignore[arg-type]
        lambda: AsyncInferenceClient("127.0.0.1:70000"),
        lambda: ConversionClient("127.0.0.1:1", timeout=-1),
        lambda: RetryPolicy(max_attempts=0),
        lambda: TLSConfig(client_cert=b"x"),
        lambda: LoadTestConfig("mlp", connections=0).validate(),
    ],
)
def test_every_refused_sdk_argument_is_a_ferry_error(make: Any) -> None:
    """Bad SDK arguments raised a bare ValueError or TypeError (max_in_flight=0, a client's
    options, a RetryPolicy), which ``except FerryError`` (every SDK error, as the docs say) let
    through. Each is an InvalidInputError now, and still the ValueError/TypeError it was."""
    with pytest.raises(InvalidInputError) as info:
        make()
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    assert info.value.code is None and str(info.value) == info.value.message
