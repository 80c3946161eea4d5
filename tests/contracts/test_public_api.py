"""The SDK's public surface is deliberate: adding or removing a name must change this test."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import ferry.client
import ferry.codec

# Sorted; a new public name is added here on purpose, with its docs.
CLIENT_API = [
    "AlreadyExistsError",
    "AsyncInferStream",
    "AsyncInferenceClient",
    "AuthenticationError",
    "BatchingPolicy",
    "CancelledError",
    "ChannelConfig",
    "ClientClosedError",
    "ConnectionError_",
    "ConversionClient",
    "ConversionError",
    "DeadlineExceededError",
    "DurationStat",
    "DynamicAxis",
    "FailedPreconditionError",
    "FerryError",
    "InferResult",
    "InferStream",
    "InferenceClient",
    "InputSpec",
    "InvalidInputError",
    "Job",
    "JobFailedError",
    "JobNotFoundError",
    "LimitExceededError",
    "ModelInfo",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelStatistics",
    "ModelVersionStatus",
    "NotFoundError",
    "Parity",
    "PermissionDeniedError",
    "ProgressEvent",
    "Pruning",
    "PruningReport",
    "Quantization",
    "RefreshResult",
    "Report",
    "RepositoryClient",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Rollout",
    "RolloutChange",
    "ServerCancelledError",
    "ServerError",
    "ServerOverloadedError",
    "Serving",
    "TLSConfig",
    "TensorInfo",
    "Timings",
    "UnavailableError",
    "UnimplementedError",
    "Upload",
    "Validation",
    "VariantReport",
    "VersionInfo",
]


def test_client_all_is_pinned() -> None:
    assert sorted(ferry.client.__all__) == ferry.client.__all__, "keep __all__ sorted"
    assert ferry.client.__all__ == CLIENT_API


def test_every_public_name_exists() -> None:
    for name in ferry.client.__all__:
        assert hasattr(ferry.client, name), name
    for name in ferry.codec.__all__:
        assert hasattr(ferry.codec, name), name


def test_every_exception_is_a_ferry_error() -> None:
    for name in ferry.client.__all__:
        obj = getattr(ferry.client, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, ferry.client.FerryError), name


def _shape(fn: Callable[..., object]) -> list[tuple[str, object, object]]:
    """Parameter names, kinds and defaults: what a caller relies on (annotations differ on
    purpose, e.g. ``infer_many`` also takes an async iterable)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_async_client_mirrors_the_sync_one() -> None:
    """Same constructor, same methods with the same parameters and defaults: the async client is
    the sync one, awaited (both derive from one base, and this keeps their public faces equal)."""
    sync, aio = ferry.client.InferenceClient, ferry.client.AsyncInferenceClient
    methods = {n for n in dir(sync) if not n.startswith("_")}
    assert methods == {n for n in dir(aio) if not n.startswith("_")}
    assert _shape(sync) == _shape(aio)
    for name in methods:
        assert _shape(getattr(sync, name)) == _shape(getattr(aio, name)), name


def test_py_typed_markers() -> None:
    for package in (ferry.client, ferry.codec):
        (folder,) = package.__path__
        assert (Path(folder) / "py.typed").is_file(), package.__name__


def test_ferry_is_a_namespace_package() -> None:
    """``ferry`` spans client/ and server/: an __init__.py in either would hide the other."""
    import ferry

    assert getattr(ferry, "__file__", None) is None
    roots = {Path(p).parent.name for p in ferry.__path__}
    assert {"client", "server"} <= roots
