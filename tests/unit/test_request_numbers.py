"""What the wire cannot carry is refused in the SDK, never masked into another request.

The hand-written encoder wrote varints masked to 64 bits: ``version=2**64`` was sent as version 0
(the default) and answered by it, ``priority=2**40`` as the default priority.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import pytest

from ferry.client import (
    AsyncInferenceClient,
    InferenceClient,
    InvalidInputError,
    RetryPolicy,
)
from ferry.client._requests import build_infer_request
from ferry.client._stream import RESTAMP_AFTER, stamped
from ferry.client._wire import encode_infer_request, with_timeout
from ferry.proto.v1 import inference_pb2 as pb

X = {"input": np.ones((1, 4), np.float32)}


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"version": 2**64}, "version must be an int64"),
        ({"version": 2**63}, "version must be an int64"),
        ({"version": "1"}, "version must be an int64"),
        ({"version": True}, "version must be an int64"),
        ({"priority": 2**40}, "priority must be an integer within 0..2**32-1"),
        ({"priority": -1}, "priority must be an integer within 0..2**32-1"),
        ({"timeout": float("nan")}, "timeout must be a finite number"),
        ({"timeout": float("inf")}, "timeout must be a finite number"),
        ({"timeout": -1.0}, "timeout must be a finite number"),
        ({"timeout": 1e20}, "timeout must be a finite number"),
        # past gRPC's int64 deadline; the message says the bound (it said "finite > 0")
        ({"timeout": 1e10}, "timeout must be a finite number of seconds > 0 and below 1e+09"),
        ({"timeout": 0}, "or None for no deadline"),
        ({"timeout": True}, "timeout must be a finite number"),
    ],
)
def test_out_of_range_numbers_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        encode_infer_request("m", X, **kwargs)
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        build_infer_request("m", X, **kwargs)


def test_a_budget_under_a_microsecond_is_one_not_none() -> None:
    """int(9.99e-7 * 1e6) is 0, which the wire reads as "no deadline"."""
    for encode in (encode_infer_request, build_infer_request):
        request = encode("m", X, timeout=9.99e-7)
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        assert pb.InferRequest.FromString(raw).timeout_us == 1


def test_numbers_in_range_are_the_bytes_protobuf_writes() -> None:
    kwargs: dict[str, Any] = {"version": 2**53, "priority": 2**32 - 1, "timeout": 2.5}
    ours = pb.InferRequest.FromString(encode_infer_request("m", X, **kwargs))
    assert (ours.version, ours.priority, ours.timeout_us) == (2**53, 2**32 - 1, 2_500_000)
    assert encode_infer_request("m", X, **kwargs) == (
        build_infer_request("m", X, **kwargs).SerializeToString()
    )


@pytest.mark.parametrize(
    ("model", "inputs", "kwargs", "words"),
    [
        (5, X, {}, "model must be a name (str), got int"),
        ("m", None, {}, "inputs must be a mapping of input name -> array, got NoneType"),
        ("m", np.ones(3), {}, "inputs must be a mapping"),
        ("m", X, {"outputs": "logits"}, "outputs must be a list of output names"),
        ("m", X, {"outputs": 7}, "outputs must be a list of output names"),
        ("m", X, {"request_id": 5}, "request_id must be a str, got int"),
        ("m", {"input": [[1.0, None]]}, {}, "input 'input'"),
        ("m", {"input": np.ones((1, 2), complex)}, {}, "input 'input'"),
        ("m", {"input": [[1.0], [1.0, 2.0]]}, {}, "input 'input'"),
        ("m", {1: X["input"]}, {}, "input names must be str, got 1"),
        ("m", X, {"outputs": ["\ud800"]}, "not encodable as UTF-8"),
    ],
)
def test_arguments_of_the_wrong_kind_are_invalid_input(
    model: Any, inputs: Any, kwargs: dict[str, Any], words: str
) -> None:
    """They raised AttributeError or the codec's ValueError, outside FerryError, which every
    SDK exception derives from; outputs="logits" was six one-letter names."""
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        encode_infer_request(model, inputs, **kwargs)
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        build_infer_request(model, inputs, **kwargs)


@pytest.mark.parametrize("make", [InferenceClient, AsyncInferenceClient])
def test_a_client_takes_one_meaning_of_timeout_and_retry(make: Any) -> None:
    """timeout=0 meant "no deadline" on a stream's request and "already late" on a unary call;
    retry=None was accepted and raised AttributeError at the first retryable error."""
    with pytest.raises(ValueError, match=re.escape("timeout must be a finite number")):
        make("127.0.0.1:1", timeout=0)
    with pytest.raises(TypeError, match="retry must be a RetryPolicy or None, got str"):
        make("127.0.0.1:1", retry="never")
    client = make("127.0.0.1:1", retry=None, timeout=None)
    assert client.retry == RetryPolicy.disabled()
    assert client.timeout is None


def test_a_call_refuses_timeout_zero_before_sending() -> None:
    with InferenceClient("127.0.0.1:1", retry=None) as client:
        for call in (
            lambda: client.infer("m", X, timeout=0),
            lambda: client.model_metadata("m", timeout=-1),
            lambda: client.ready(timeout=0),
            lambda: client.stream("m", timeout=0),
        ):
            with pytest.raises(InvalidInputError, match="timeout must be a finite number"):
                call()


def test_wrong_arguments_are_refused_before_a_list_input_fetches_metadata() -> None:
    """A list input makes the SDK ask the model's declared dtypes first: that call failed on a
    bad model, version or inputs argument with AttributeError or TypeError before the arguments
    were checked. No server listens here, so only the arguments can answer."""
    lists = {"input": [[1.0, 2.0]]}
    with InferenceClient("127.0.0.1:1", retry=None, timeout=5) as client:
        for call, words in (
            (lambda: client.infer("m", [lists["input"]]), "inputs must be a mapping"),
            (lambda: client.infer(123, lists), "model must be a name (str)"),
            (lambda: client.infer("m", lists, version=1.0), "version must be an int64"),
            (lambda: client.infer("m", lists, version=True), "version must be an int64"),
            (lambda: client.infer("m\ud800", lists), "not encodable as UTF-8"),
        ):
            with pytest.raises(InvalidInputError, match=re.escape(words)):
                call()


def test_an_input_no_message_can_carry_is_refused_before_its_copy() -> None:
    """A 4 TB view of one float (np.broadcast_to) raised MemoryError from the copy."""
    huge = {"input": np.broadcast_to(np.float32(1), (2**20, 2**20))}
    for encode in (encode_infer_request, build_infer_request):
        with pytest.raises(InvalidInputError, match="one gRPC message carries at most"):
            encode("m", huge)


def test_a_stream_request_that_waited_goes_with_what_is_left_of_its_budget() -> None:
    """A stream's submit counts its timeout from the submit: a request that waited for a slot
    or behind earlier writes is sent with the rest (the field appended; protobuf reads the
    last), one that did not wait goes as built, and one past its deadline is not sent."""
    built = encode_infer_request("m", X, timeout=2.0, priority=3, request_id="r")
    again = pb.InferRequest.FromString(with_timeout(built, 0.25))
    assert again.timeout_us == 250_000
    assert (again.model, again.id, again.priority) == ("m", "r", 3)
    assert again.inputs == pb.InferRequest.FromString(built).inputs

    now = time.monotonic()
    assert stamped(built, now + 2.0, 2.0) is built  # no wait worth a copy
    assert stamped(built, now - 0.001, 2.0) is None  # its deadline passed: not sent
    waited = stamped(built, now + 1.0, 2.0)  # a second of its two spent waiting
    assert waited is not None
    left = pb.InferRequest.FromString(waited).timeout_us
    assert 0 < left <= 1_000_000 and RESTAMP_AFTER < 1.0


def test_uploads_and_job_watches_refuse_a_timeout_no_call_can_have() -> None:
    """ConversionClient.upload, watch and Job.wait passed their timeout to gRPC as given:
    0, -1, nan, inf and 1e20 all failed at once with DEADLINE_EXCEEDED (inf and 1e20 meant
    "take long"), where every other call refuses them as the caller's mistake."""
    from ferry.client import ConversionClient, Job

    with ConversionClient("127.0.0.1:1") as client:
        job = Job(id="0" * 32, model="m", state="RUNNING", _client=client)
        for bad in (0, -1, float("nan"), float("inf"), 1e20):
            for call in (
                lambda t=bad: client.upload("m", b"\x08\x01", format="onnx", timeout=t),
                lambda t=bad: next(iter(client.watch("0" * 32, timeout=t))),
                lambda t=bad: job.wait(timeout=t, progress=False),
            ):
                with pytest.raises(InvalidInputError, match="timeout must be a finite number"):
                    call()


def test_conversion_options_the_message_cannot_carry_are_invalid_input() -> None:
    """samples=10**12 or max_batch_size=10**14 raised protobuf's bare ValueError ("Value out of
    range"), a datatype "FP99" the codec's, a complex calibration array its CodecError: each a
    traceback in `ferry convert`. No server listens here: nothing is sent."""
    from ferry.client import ConversionClient, InputSpec, Quantization, Serving, Validation

    calibration = {"input": np.zeros((4, 64), np.complex64)}
    with ConversionClient("127.0.0.1:1") as client:
        for kwargs, words in (
            (
                {"validation": Validation(samples=10**12)},
                "validation.samples must be within 0..4294967295, not 1000000000000",
            ),
            (
                {"max_batch_size": 10**14},
                "max_batch_size must be within 1..4294967295, not 100000000000000",
            ),
            ({"serving": Serving(instance_count=10**11)}, "serving.instance_count must be within"),
            ({"inputs": [InputSpec("x", "FP99", (1,))]}, "unknown data type name 'FP99'"),
            (
                {"quantization": Quantization("static_int8", calibration_inputs=calibration)},
                "complex64",
            ),
        ):
            with pytest.raises(InvalidInputError, match=re.escape(words)):
                client.convert("0" * 32, **kwargs)  # type: ignore[arg-type]


def test_rollout_values_the_message_cannot_carry_are_invalid_input() -> None:
    """A version past int64 or an unknown rule raised protobuf's ValueError, a traceback in
    `ferry models rollout m 99999999999999999999=1`. Nothing listens here: nothing is sent."""
    from ferry.client import RepositoryClient

    with RepositoryClient("127.0.0.1:1") as client:
        for kwargs in (
            {"split": {2**64: 1.0}},
            {"split": {1: 1.0}, "shadow": (2**64, 0.1)},
            {"split": None, "shadow": (2, 0.1), "rules": {"promote_after": 2**64}},
            {"split": None, "shadow": (2, 0.1), "rules": {"no_such_rule": 1}},
            # OverflowError escaped as is; 2.7 was cut to 2 and sent.
            {"split": None, "shadow": (2, 0.1), "rules": {"promote_after": float("inf")}},
            {"split": None, "shadow": (2, 0.1), "rules": {"promote_after": 2.7}},
        ):
            with pytest.raises(InvalidInputError, match="rollout: "):
                client.set_rollout("m", **kwargs)  # type: ignore[arg-type]


def test_other_calls_refuse_arguments_their_message_cannot_hold() -> None:
    """Only infer checked its arguments: a version past int64 raised protobuf's ValueError
    ("Value out of range"), a model given as an int its TypeError ("bad argument type for
    built-in operation"), ready(1) an AttributeError. Nothing listens here: nothing is sent."""
    import asyncio

    from ferry.client import ConversionClient, RepositoryClient

    huge = 2**64
    with (
        InferenceClient("127.0.0.1:1", retry=None) as client,
        ConversionClient("127.0.0.1:1") as conv,
        RepositoryClient("127.0.0.1:1") as repo,
    ):
        for call in (
            lambda: client.model_metadata("m", version=huge),
            lambda: client.model_metadata(1),  # type: ignore[arg-type]
            lambda: client.statistics("m", version=huge),
            lambda: client.list_models(1),  # type: ignore[arg-type]
            lambda: client.ready(1),  # type: ignore[arg-type]
            lambda: repo.load_model(1),  # type: ignore[arg-type]
            lambda: repo.get_rollout(1),  # type: ignore[arg-type]
            lambda: conv.delete_version("m", huge),
            lambda: conv.set_default_version("m", huge),
            lambda: conv.job(1),  # type: ignore[arg-type]
            lambda: conv.get_model(1),  # type: ignore[arg-type]
            lambda: conv.list_uploads(1),  # type: ignore[arg-type]
            lambda: next(iter(conv.watch(1))),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidInputError):
                call()

    async def run() -> None:
        async with AsyncInferenceClient("127.0.0.1:1", retry=None) as client:
            for call in (
                lambda: client.model_metadata("m", version=huge),
                lambda: client.statistics("m", version=huge),
                lambda: client.list_models(1),  # type: ignore[arg-type]
                lambda: client.ready(1),  # type: ignore[arg-type]
            ):
                with pytest.raises(InvalidInputError):
                    await call()

    asyncio.run(run())


def test_an_upload_of_a_device_or_a_missing_path_is_refused() -> None:
    """ConversionClient.upload("/dev/zero", format="onnx") read the device to measure it: it
    never returned. A missing path raised FileNotFoundError, which is no FerryError. No server
    listens here: nothing is sent."""
    from ferry.client import ConversionClient

    with ConversionClient("127.0.0.1:1") as client:
        with pytest.raises(InvalidInputError, match="is not a regular file or folder"):
            client.upload("m", "/dev/zero", format="onnx")
        with pytest.raises(InvalidInputError, match="does not exist"):
            client.upload("m", "/no/such/model.onnx")
