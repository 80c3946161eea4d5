"""The core's vocabulary: what goes in and out of the one door (``DataPlane``).

Protocol adapters translate their wire messages to and from these types and nothing else; the
runtime (onnxruntime) implements ``Session`` and ``Opener`` without the core importing it, so the
dependency runs one way: adapters -> core <- runtime, wired together by the server assembly.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ferry.server.errors import InvalidArgument

# The highest version number: representable exactly in JSON and float64 clients. Here, at the
# core's door, since adapters check the versions they read against it too.
MAX_VERSION = 2**53

if TYPE_CHECKING:
    from ferry.server.core.config import ModelConfig

MAX_VERSION = 2**53  # representable exactly in JSON and float64 clients
_VERSION_TEXT = re.compile(r"[0-9]{1,16}")


# The ONNX model metadata key under which a published version carries its dynamic axes' bounds
# (written by the conversion child, read when a session opens): {input: {axis: [name, min, max]}}.
DYNAMIC_AXES_METADATA = "ferry.dynamic_axes"


@dataclass(frozen=True, slots=True)
class AxisBound:
    """A dynamic dim besides the batch, with the sizes the version was verified at."""

    axis: int
    name: str  # inputs' axes that share a name must agree in a request
    min: int
    max: int  # 0: no upper bound


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: int  # ferry.v1 DataType
    shape: tuple[int, ...]  # -1 for a dynamic (symbolic or unknown) dimension
    bounds: tuple[AxisBound, ...] = ()


@dataclass(slots=True)
class InferenceRequest:
    model: str
    inputs: Mapping[str, np.ndarray]
    version: int | None = None
    id: str = ""
    outputs: Sequence[str] | None = None  # None or empty: all outputs
    timeout: float | None = None  # seconds; only shortens the call's deadline
    priority: int = 0  # 0: the model's default; 1 is the highest


@dataclass(slots=True)
class InferenceResult:
    model: str
    version: int
    id: str
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class Limits:
    """Per-request bounds enforced before queueing; the server fills them from its settings
    (``max_request_*``), and each refusal names the setting and its value."""

    max_inputs: int = 256
    max_outputs: int = 256
    max_elements: int = 1 << 31
    max_batch: int = 0  # 0: only each model's own max_batch_size applies
    # The JSON of an HTTP request: parsing it runs on the event loop and holds every other
    # request (80 MiB of JSON numbers took 3-17 s), where binary tensor data costs a copy.
    max_json_bytes: int = 8 << 20
    # BYTES elements, all inputs together: each one becomes Python objects (bytes, then str for
    # onnxruntime, then the output's, then its encoding), built one by one on the event loop.
    # 20 MB of one-byte strings held every other request for 9 s and 80 MB peaked at 4.4 GB,
    # where a fixed-size tensor of that size is one copy.
    max_bytes_elements: int = 1 << 20


class WireRequest(Protocol):
    """A request still in its wire form. The core decodes it (``decode``) inside its own
    bookkeeping, so a request that fails to decode is counted and observed like any other
    failure, by the core, once, whatever the protocol."""

    @property
    def model(self) -> str: ...

    @property
    def version_label(self) -> int: ...

    @property
    def version_named(self) -> bool:
        """Whether the request names a version, valid or not (``version_label`` is 0 for an
        invalid one as for none)."""
        ...

    @property
    def request_id(self) -> str:
        """The request's id as far as it was read ('' when it was not): under a split it
        picks the version a request that fails to decode fails on."""
        ...

    def decode(self, limits: Limits) -> InferenceRequest: ...


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"
    UNLOADED = "UNLOADED"


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    state: State
    reason: str
    is_default: bool


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a version the server knows, or a model of the
    repository without one (``version`` None: never loaded, unloaded on request, or no valid
    version folder), so a client can see what it may load."""

    name: str
    version: int | None
    state: State
    reason: str = ""


@dataclass
class RepositoryOutcome:
    """What a load, unload or refresh changed: the one outcome type of every repository
    operation, whichever protocol asked."""

    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    default_timeout_ms: float
    default_priority: int
    # The config's batching.planned_batch_sizes: a partial batch that reaches one goes at once,
    # as at Triton's preferred batch sizes (a derived plan is not a preference).
    preferred_batch_sizes: tuple[int, ...] = ()
    # batching.combine_requests: False, each request runs alone (no dynamic batcher, for Triton)
    combine_requests: bool = True
    # Why requests run alone when the server found it while serving (a batch showed the rows
    # mixing); "" when the config says so, or they combine.
    run_alone_reason: str = ""


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a protocol says about one served version: its signature, its batching and
    placement, the versions beside it. Metadata and config RPCs are both views of this."""

    name: str
    version: int
    ready_versions: tuple[int, ...]
    default_version: int | None
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingPolicy
    instance_count: int  # on each of device_ids (Triton's instance group count)
    device_kind: str  # "cpu" or "gpu": where the version's first provider runs it
    providers: tuple[str, ...]
    version_policy: VersionPolicyView
    device_ids: tuple[int, ...] = ()  # GPUs the instances are placed on; (): not placed


@dataclass(frozen=True)
class VersionPolicyView:
    latest: int | None
    all: bool
    specific: tuple[int, ...]


@dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchStatistics:
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class VersionStatistics:
    """A consistent snapshot of one version's counters (Triton's semantics), with the
    batcher's own: the only statistics type adapters and metrics read."""

    name: str
    version: int
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: tuple[BatchStatistics, ...]
    rejected: int
    expired: int
    queue_depth: int
    # Planned batch sizes (runtime.plans): executions per planned size, and executions whose
    # shape differed from that size's previous one (0 in steady state). Empty without a plan.
    planned_executions: tuple[tuple[int, int], ...] = ()
    plan_changes: int = 0
    # Instances placed on GPUs (instances.device_ids): executions per device id, so a device
    # that is never used shows. Empty when the version is not placed.
    device_executions: tuple[tuple[int, int], ...] = ()
    # Which load counted these (unique per load and process): /metrics tells a new load by
    # it (metrics_carry), not by its counts going down. "" where several loads were added up.
    load: str = ""


class Session(Protocol):
    """What the core needs of a loaded model runtime (onnxruntime's lives in ``runtime``)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str]
    device_kind: str
    inline_allowed: bool  # small batches may run on the event loop thread

    def run(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> list[np.ndarray]: ...

    # A batch in two steps, so the session decides where the requests' rows are gathered (one
    # copy, into a buffer it can bind: runtime/staging.py) and the core still times each step.
    def gather(self, parts: Sequence[dict[str, np.ndarray]], order: Sequence[str]) -> Any: ...

    def run_gathered(
        self, gathered: Any, output_names: list[str] | None = None
    ) -> list[np.ndarray]: ...

    def batchable(self) -> bool: ...

    # One row alone, then twice: (whether it ran, what is wrong with the outputs' first
    # dimension); asked only of a session whose ``batch_checked`` is False (runtime.session).
    def check_rows(self, row: dict[str, np.ndarray], max_batch: int) -> tuple[bool, str]: ...

    def warm_up(self, batch_size: int) -> None: ...

    def release(self) -> None: ...


# Builds a session for a model file with a model's config; raises FerryError when it cannot.
Opener = Callable[[Path, "ModelConfig"], Session]

# Called once per inference request, by the core: model, version (0 when unknown), outcome
# (None for success, else the exception), seconds.
Observer = Callable[[str, int, "BaseException | None", float], None]


def parse_version(text: str) -> int | None:
    """A version given as text (the Open Inference Protocol's strings, a URL segment): '' is
    None (the default version). ASCII digits only and bounded, so ``"²"`` (which
    ``str.isdigit`` accepts and ``int`` refuses) or a 5,000-digit number is the client's
    INVALID_ARGUMENT, never a crash. ``"0"`` is the default version too, as in ferry.v1."""
    if not text:
        return None
    if not _VERSION_TEXT.fullmatch(text) or int(text) > MAX_VERSION:
        shown = text if len(text) <= 32 else text[:32] + "..."
        raise InvalidArgument(
            f"invalid model version {shown!r}: a version is a positive integer in ASCII digits "
            f"(at most {MAX_VERSION}), or empty (or 0) for the model's default version"
        )
    return int(text) or None


def version_of(number: int) -> int | None:
    """A version given as a number (ferry.v1's int64 fields): 0 is None (the default version),
    and outside parse_version's range it is the same INVALID_ARGUMENT, not a version that is
    merely not found, so every protocol answers a negative version alike."""
    if not 0 <= number <= MAX_VERSION:
        raise InvalidArgument(
            f"invalid model version {number}: a version is a positive integer (at most "
            f"{MAX_VERSION}), or 0 for the model's default version"
        )
    return number or None


def version_label(text: str) -> int:
    """A version string as a metrics label: its number, or 0 when it is not a valid one."""
    try:
        return parse_version(text) or 0
    except InvalidArgument:
        return 0


def names_version(text: str) -> bool:
    """Whether a version string names a version: anything but what ``parse_version`` reads as
    none (empty, or 0), an invalid one included."""
    try:
        return parse_version(text) is not None
    except InvalidArgument:
        return True


def short(name: str) -> str:
    """A client-supplied name as it appears in a message: long ones are cut."""
    return name if len(name) <= 64 else name[:64] + "..."


@dataclass(frozen=True)
class RolloutView:
    """A model's live split and its recorded history (core.rollout)."""

    model: str
    split: tuple[tuple[int, float], ...]  # empty: every request goes to the default version
    error: str  # why rollout.json could not be used ('' when it can)
    history: tuple[dict[str, Any], ...]
    shadow: tuple[int, float] | None = None  # (candidate version, fraction of requests)
    shadow_statistics: Any = None  # core.shadow.ShadowStatistics, summed over worker processes
    rules: Mapping[str, float] = field(default_factory=dict)  # core.rollout.Rules, set ones
