"""Per-model configuration: one TOML or JSON file beside the model's version folders.

Every field has a default, so a model with no config file serves; fields the graph can decide
(whether it has a batch dimension) are derived from the graph when the file is silent. Unknown keys
are errors, not silently ignored: a typo in ``max_batch_sise`` must not look like a working config.

Example ``config.toml``::

    default_version = 2
    version_policy = { latest = 2 }      # or { all = true } or { specific = [1, 3] }

    [batching]
    max_batch_size = 32                  # 0: the model has no batch dimension
    max_queue_delay_ms = 0.0             # time a partial batch may wait for more requests
    max_queue_size = 1024                # queued requests beyond this are rejected at once
    default_timeout_ms = 0               # 0: the server's --default-request-timeout
    default_priority = 1
    combine_requests = true              # false: each request runs alone (its own rows only)

    [instances]
    count = 1                            # concurrent executions of each version (per device)
    # device_ids = [0, 1]                # GPUs: `count` instances on each (Triton's `gpus`)

    [onnxruntime]
    intra_op_threads = 0                 # threads one execution uses; 0: decided at load
    inter_op_threads = 1
    memory_arena = true
    allow_spinning = true
    # Execution providers in order of preference, each with its options (names and options are
    # checked against the providers table, ferry.server.runtime.providers, when a version opens):
    providers = [
        { name = "CUDAExecutionProvider", options = { device_id = 0 } },
        { name = "CPUExecutionProvider" },
    ]
    # execution_providers = ["CPUExecutionProvider"]   # the same, names only (older shape)
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ferry.codec._json_keys import unique_object
from ferry.server.core.repository import read_head
from ferry.server.core.types import MAX_VERSION
from ferry.server.errors import InvalidArgument

CONFIG_NAMES = ("config.toml", "config.json")
# Triton's model config (protobuf text), which Ferry does not read: see load_config.
TRITON_CONFIG = "config.pbtxt"
MAX_BATCH_SIZE_LIMIT = 65536
# Instances bound the batcher's concurrency and each holds execution threads: count x devices
# stays within this. Device ids and their number are bounded so a typo (``device_ids = [10000]``)
# is refused here, not found by a CUDA error at load.
MAX_INSTANCES = 64
MAX_DEVICES = 16
# version_policy.specific: more versions than a model folder sensibly holds; a list past it (a
# generated [1, 1, ...]) was kept whole and scanned per version on every repository sync.
MAX_SPECIFIC_VERSIONS = 1024
MAX_DEVICE_ID = 255
# Every number a config holds is finite and bounded: the server converts them to the wire's
# integer fields (microseconds in ModelConfig and ModelMetadata) and waits on them. A queue delay
# of inf or 1e300 loaded READY and then never ran a request; NaN answered INTERNAL on metadata.
MAX_QUEUE_SIZE = 1 << 20
MAX_CONFIG_INT = 2**31 - 1
MAX_THREADS = 1024  # per onnxruntime pool: past a host's cores many times over
FLOAT_LIMITS = {"max_queue_delay_ms": 60_000.0, "default_timeout_ms": 86_400_000.0}
DEFAULT_MAX_BATCH_SIZE = 32
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few lines; past this it is not one


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int | None = None  # None: derived from the graph (32 if batchable, else 0)
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024
    default_timeout_ms: float = 0.0
    default_priority: int = 1
    # False: requests keep the batch dimension (up to max_batch_size rows each) but each runs
    # alone, never beside another request's rows (Triton: a config without dynamic_batching).
    # For a model whose answer for one row depends on the others in its run (dynamic int8's
    # one activation scale per run) without changing its interface.
    combine_requests: bool = True
    # Sizes batches run at, padded (runtime.plans); None: powers of two on GPU providers, none
    # on CPU; (): never.
    planned_batch_sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class InstancesConfig:
    """Triton's instance group: ``count`` concurrent executions, on each of ``device_ids``
    (Triton's ``gpus``) when set. Which providers a device id is given to is the runtime's
    business (runtime.placement): the core does not know which providers run on a GPU."""

    count: int = 1
    device_ids: tuple[int, ...] = ()  # (): not placed; the providers' own options decide

    @property
    def total(self) -> int:
        """Concurrent executions of the version: the batcher's concurrency."""
        return self.count * max(1, len(self.device_ids))


OptionValue = str | int | float | bool


@dataclass(frozen=True)
class ProviderConfig:
    """One execution provider a version asks for, with its options as written in the config.
    Names and options are checked against the providers table when the version is opened (the
    core does not know onnxruntime's providers)."""

    name: str
    options: tuple[tuple[str, OptionValue], ...] = ()

    def options_dict(self) -> dict[str, OptionValue]:
        return dict(self.options)


DEFAULT_PROVIDERS = (ProviderConfig("CPUExecutionProvider"),)


@dataclass(frozen=True)
class OnnxRuntimeConfig:
    # 0 (auto): measured at load (runtime.session.open_session): one thread for a model whose
    # batch of one is quick, the worker's cores for a heavy one. docs/configuration.md has why.
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    providers: tuple[ProviderConfig, ...] = DEFAULT_PROVIDERS
    memory_arena: bool = True
    allow_spinning: bool = True
    graph_optimization: str = "all"  # disable | basic | extended | all
    # True: a model with over 16 MiB of embedded weights is opened from one aligned copy in the
    # server's state folder, memory-mapped and shared by every worker, prepacking off
    # (runtime.shared_weights has the measurements).
    share_weights: bool = False

    @property
    def execution_providers(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk are served. Exactly one of the three is in force."""

    latest: int | None = 1
    all: bool = False
    specific: tuple[int, ...] = ()

    def select(self, versions: list[int]) -> list[int]:
        ordered = sorted(versions)
        if self.all:
            return ordered
        if self.specific:
            chosen = set(self.specific)
            return [v for v in ordered if v in chosen]
        n = self.latest or 1
        return ordered[-n:]


@dataclass(frozen=True)
class ModelConfig:
    default_version: int | None = None  # None: the highest served version
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    instances: InstancesConfig = field(default_factory=InstancesConfig)
    onnxruntime: OnnxRuntimeConfig = field(default_factory=OnnxRuntimeConfig)

    def with_max_batch_size(self, value: int) -> ModelConfig:
        return replace(self, batching=replace(self.batching, max_batch_size=value))


def find_config_file(model_dir: Path, label: str = "") -> Path | None:
    """The folder's config file (None: none). ``label``: the folder as messages name it (a
    version's is ``<model>/<version>``: named by its number alone, the message did not say
    which model's version to fix)."""
    label = label or model_dir.name
    found = []
    for name in CONFIG_NAMES:
        path = model_dir / name
        if path.is_file():
            found.append(path)
        elif path.is_symlink() or path.exists():
            # A folder or a dangling link there served the model with every default, silently.
            raise InvalidArgument(
                f"{label}/{name} is not a readable file (a folder, or a link to "
                "nothing): make it the config file, or remove it"
            )
    if len(found) > 1:
        raise InvalidArgument(f"folder {label!r} has both config.toml and config.json: keep one")
    return found[0] if found else None


def load_config(model_dir: Path) -> ModelConfig:
    path = find_config_file(model_dir)
    if path is None:
        if (model_dir / TRITON_CONFIG).exists():
            # A Triton repository served as it is: its version_policy, max_batch_size and the
            # rest were ignored without a word, and requests naming no version were answered
            # OK by the newest version where Triton's policy served another.
            raise InvalidArgument(
                f"{model_dir.name}/{TRITON_CONFIG} is Triton's model config, which Ferry does "
                "not read: write the settings it needs (version_policy, batching) in "
                f"{model_dir.name}/config.toml (docs/configuration.md), or remove "
                f"{TRITON_CONFIG} to serve the model with Ferry's defaults"
            )
        return ModelConfig()
    try:
        raw = _read(path)
    except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise InvalidArgument(f"{model_dir.name}/{path.name} cannot be parsed: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{model_dir.name}/{path.name} must hold a table/object")
    return parse_config(raw, where=f"{model_dir.name}/{path.name}")


def _read(path: Path) -> Any:
    """A config file's table. A key given twice in JSON is refused, as TOML refuses it: json
    kept the last one, so {"max_batch_size": 8, "max_batch_size": 0} served unbatched. A byte
    order mark, which some editors on Windows write, is dropped: tomllib would refuse the
    file's first line with a message that points at nothing visible. Read only so far, and a
    nesting past the parser's guard is the file's error: a config nested thousands deep
    raised RecursionError out of every refresh (Refresh and LoadModel INTERNAL, no model
    loaded at start), and a config linked to a model file was read whole into memory."""
    data = read_head(path, MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"it is over {MAX_CONFIG_BYTES} bytes (a config is a few lines)")
    text = data.decode("utf-8-sig")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text, object_pairs_hook=unique_object)
    except RecursionError:
        raise ValueError("it is nested deeper than the parser allows") from None


def apply_version_config(base: ModelConfig, version_dir: Path) -> ModelConfig:
    """A version may carry its own ``config.json``/``config.toml`` (a conversion job writes the
    serving config it was asked for there): its batching, instances and onnxruntime sections
    override the model's, key by key. Version policy and default version stay model-level."""
    label = f"{version_dir.parent.name}/{version_dir.name}"
    path = find_config_file(version_dir, label)
    if path is None:
        return base
    where = f"{label}/{path.name}"
    try:
        raw = _read(path)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{where} cannot be parsed: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} must hold a table/object")
    allowed = {"batching", "instances", "onnxruntime"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InvalidArgument(
            f"{where}: a version config may only set {sorted(allowed)}, not {unknown}"
        )
    merged = config_to_dict(base)
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise InvalidArgument(f"{where}: [{section}] must be a table")
        inherited = dict(merged.get(section, {}))
        if section == "onnxruntime" and {"providers", "execution_providers"} & set(values):
            # Either spelling in the version's file replaces the model's providers: merged
            # key by key, the documented execution_providers form met the model's providers
            # and was refused as setting both.
            inherited.pop("providers", None)
            inherited.pop("execution_providers", None)
        merged[section] = {**inherited, **values}
    return parse_config(merged, where=where)


def parse_config(raw: dict[str, Any], *, where: str = "config") -> ModelConfig:
    raw = dict(raw)
    policy = _parse_policy(raw.pop("version_policy", None), where)
    cfg = ModelConfig(
        default_version=_opt_positive_int(
            raw.pop("default_version", None), where, "default_version"
        ),
        version_policy=policy,
        batching=_section(BatchingConfig, raw.pop("batching", {}), where, "batching"),
        instances=_section(InstancesConfig, raw.pop("instances", {}), where, "instances"),
        onnxruntime=_onnxruntime(raw.pop("onnxruntime", {}), where),
    )
    if raw:
        raise InvalidArgument(
            f"{where}: unknown keys {sorted(raw)}; known: default_version, version_policy, "
            "batching, instances, onnxruntime"
        )
    _validate(cfg, where)
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of parse_config, for writing a config next to a published version."""
    policy: dict[str, Any]
    if cfg.version_policy.all:
        policy = {"all": True}
    elif cfg.version_policy.specific:
        policy = {"specific": list(cfg.version_policy.specific)}
    else:
        policy = {"latest": cfg.version_policy.latest or 1}
    out: dict[str, Any] = {"version_policy": policy}
    if cfg.default_version is not None:
        out["default_version"] = cfg.default_version
    batching = {f.name: getattr(cfg.batching, f.name) for f in fields(BatchingConfig)}
    if batching["max_batch_size"] is None:
        del batching["max_batch_size"]
    if batching["planned_batch_sizes"] is None:
        del batching["planned_batch_sizes"]
    else:
        batching["planned_batch_sizes"] = list(batching["planned_batch_sizes"])
    out["batching"] = batching
    instances: dict[str, Any] = {"count": cfg.instances.count}
    if cfg.instances.device_ids:
        instances["device_ids"] = list(cfg.instances.device_ids)
    out["instances"] = instances
    ort = {f.name: getattr(cfg.onnxruntime, f.name) for f in fields(OnnxRuntimeConfig)}
    ort["providers"] = [
        {"name": p.name, **({"options": p.options_dict()} if p.options else {})}
        for p in cfg.onnxruntime.providers
    ]
    out["onnxruntime"] = ort
    return out


def _onnxruntime(raw: Any, where: str) -> OnnxRuntimeConfig:
    """The [onnxruntime] section; providers come as ``providers = [{ name, options }]`` or, the
    older shape, ``execution_providers = ["Name", ...]`` (not both)."""
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: [onnxruntime] must be a table, got {raw!r}")
    raw = dict(raw)
    if "providers" in raw and "execution_providers" in raw:
        raise InvalidArgument(
            f"{where}: set onnxruntime.providers or onnxruntime.execution_providers, not both"
        )
    providers: tuple[ProviderConfig, ...] | None = None
    if "execution_providers" in raw:
        names = raw.pop("execution_providers")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(
                f"{where}: onnxruntime.execution_providers must be a list of strings"
            )
        providers = tuple(ProviderConfig(n) for n in names)
    elif "providers" in raw:
        providers = _providers(raw.pop("providers"), where)
    section: OnnxRuntimeConfig = _section(OnnxRuntimeConfig, raw, where, "onnxruntime")
    if providers is not None:
        section = replace(section, providers=providers)
    return section


def _providers(raw: Any, where: str) -> tuple[ProviderConfig, ...]:
    key = f"{where}: onnxruntime.providers"
    if not isinstance(raw, list):
        raise InvalidArgument(f"{key} must be a list of {{ name, options }} tables")
    out = []
    for i, entry in enumerate(raw):
        item = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise InvalidArgument(f"{key}[{i}] must be a table with a name, got {item!r}")
        unknown = sorted(set(item) - {"name", "options"})
        if unknown:
            raise InvalidArgument(f"{key}[{i}]: unknown keys {unknown}; known: name, options")
        options = item.get("options", {})
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float | bool)
            for k, v in options.items()
        ):
            raise InvalidArgument(
                f"{key}[{i}] ({item['name']}): options must be a table of strings, numbers "
                "and booleans"
            )
        out.append(ProviderConfig(item["name"], tuple(sorted(options.items()))))
    return tuple(out)


def _parse_policy(raw: Any, where: str) -> VersionPolicy:
    if raw is None:
        return VersionPolicy()
    if not isinstance(raw, dict) or len(raw) != 1:
        raise InvalidArgument(
            f"{where}: version_policy must be exactly one of {{latest = N}}, {{all = true}}, "
            f"{{specific = [1, 2]}}; got {raw!r}"
        )
    ((key, value),) = raw.items()
    if key == "latest":
        return VersionPolicy(latest=_positive_int(value, where, "version_policy.latest"))
    if key == "all" and value is True:
        return VersionPolicy(latest=None, all=True)
    if key == "specific" and isinstance(value, list) and value:
        if len(value) > MAX_SPECIFIC_VERSIONS:
            raise InvalidArgument(
                f"{where}: version_policy.specific lists {len(value)} entries, at most "
                f"{MAX_SPECIFIC_VERSIONS} are allowed: list each version to serve once, or use "
                "{all = true} or {latest = N}"
            )
        # Each version once, in order: a repeated one was kept, shown and scanned as written.
        versions = tuple(
            sorted({_positive_int(v, where, "version_policy.specific[]") for v in value})
        )
        return VersionPolicy(latest=None, specific=versions)
    raise InvalidArgument(f"{where}: bad version_policy {raw!r}")


def _sizes(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_BATCH_SIZE_LIMIT
        for v in value
    ):
        raise InvalidArgument(
            f"{where} must be a list of batch sizes within 1..{MAX_BATCH_SIZE_LIMIT}, e.g. "
            f"[1, 2, 4, 8], or [] for none; got {value!r}"
        )
    return tuple(sorted(set(value)))


def _device_ids(value: Any, where: str) -> tuple[int, ...]:
    """GPU ordinals in the order written (instances are placed in that order); a duplicate is
    refused rather than merged: ``[0, 0]`` may mean ``count = 2`` and should say so."""
    if (
        not isinstance(value, list)
        or len(value) > MAX_DEVICES
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DEVICE_ID
            for v in value
        )
    ):
        raise InvalidArgument(
            f"{where} must be a list of at most {MAX_DEVICES} GPU ids within 0..{MAX_DEVICE_ID}, "
            f"e.g. [0, 1], or [] for none; got {value!r}"
        )
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise InvalidArgument(
            f"{where} lists device {twice[0]} more than once ({value!r}); to run several "
            "instances on one device, raise instances.count instead"
        )
    return tuple(value)


def _section(cls: Any, raw: Any, where: str, section: str) -> Any:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: [{section}] must be a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown keys in [{section}]: {unknown}; known: {sorted(known)}"
        )
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        default = getattr(defaults, key)
        values[key] = value
        if key == "planned_batch_sizes":
            values[key] = _sizes(value, f"{where}: {section}.{key}")
        elif key == "device_ids":
            values[key] = _device_ids(value, f"{where}: {section}.{key}")
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"{where}: {section}.{key} must be a list of strings")
            values[key] = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise InvalidArgument(f"{where}: {section}.{key} must be true or false")
        elif isinstance(default, float):
            limit = FLOAT_LIMITS[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value <= limit  # also refuses NaN
            ):
                raise InvalidArgument(
                    f"{where}: {section}.{key} must be a number within 0..{limit:g}, got {value!r}"
                )
            if 0 < value < 0.001:
                # Below a microsecond it is 0 on every wire (Triton's microseconds, ferry.v1's
                # timeout_us), which reads as "none", while every request was refused.
                raise InvalidArgument(
                    f"{where}: {section}.{key} {value!r} is under a microsecond (0.001 ms): "
                    "use 0 for none, or at least 0.001"
                )
            values[key] = float(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise InvalidArgument(f"{where}: {section}.{key} must be a string")
        elif (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 <= value <= MAX_CONFIG_INT
        ):
            raise InvalidArgument(
                f"{where}: {section}.{key} must be an integer within 0..{MAX_CONFIG_INT}, "
                f"got {value!r}"
            )
    return cls(**values)


def _validate(cfg: ModelConfig, where: str) -> None:
    b = cfg.batching
    if b.max_batch_size is not None and b.max_batch_size > MAX_BATCH_SIZE_LIMIT:
        raise InvalidArgument(
            f"{where}: batching.max_batch_size {b.max_batch_size} is over {MAX_BATCH_SIZE_LIMIT}"
        )
    if not 1 <= b.max_queue_size <= MAX_QUEUE_SIZE:
        raise InvalidArgument(
            f"{where}: batching.max_queue_size must be within 1..{MAX_QUEUE_SIZE}, "
            f"got {b.max_queue_size}"
        )
    if b.default_priority < 1:
        raise InvalidArgument(f"{where}: batching.default_priority must be >= 1")
    planned = b.planned_batch_sizes or ()
    if planned and b.max_batch_size is not None:
        over = [n for n in planned if n > b.max_batch_size]
        if b.max_batch_size == 0 or over:
            # They were dropped (or, unbatched, the plan ignored) with no word.
            raise InvalidArgument(
                f"{where}: batching.planned_batch_sizes {list(planned)} "
                + (
                    "plan batches for a model that is not batched (max_batch_size = 0)"
                    if b.max_batch_size == 0
                    else f"include {over}, over max_batch_size {b.max_batch_size}"
                )
                + ": plan sizes within max_batch_size, or raise it"
            )
    for key in ("intra_op_threads", "inter_op_threads"):
        threads = getattr(cfg.onnxruntime, key, 0)
        if threads > MAX_THREADS:
            # A thread pool that size failed the load with std::bad_alloc, naming nothing.
            raise InvalidArgument(
                f"{where}: onnxruntime.{key} {threads} is over {MAX_THREADS}: use 0 (decided at "
                "load) or a count near the host's cores"
            )
    i = cfg.instances
    if i.count < 1 or i.count > MAX_INSTANCES:
        raise InvalidArgument(f"{where}: instances.count must be within 1..{MAX_INSTANCES}")
    if i.total > MAX_INSTANCES:
        raise InvalidArgument(
            f"{where}: instances.count {i.count} on each of {len(i.device_ids)} device_ids is "
            f"{i.total} instances, over {MAX_INSTANCES}: lower count or list fewer devices"
        )
    if cfg.onnxruntime.graph_optimization not in ("disable", "basic", "extended", "all"):
        raise InvalidArgument(
            f"{where}: onnxruntime.graph_optimization must be disable, basic, extended or all"
        )
    names = cfg.onnxruntime.execution_providers
    if not names:
        raise InvalidArgument(f"{where}: onnxruntime.providers must not be empty")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{where}: onnxruntime.providers lists a provider twice: {names}")


def _positive_int(value: Any, where: str, key: str) -> int:
    """A version number or count: bounded like version folders (a default_version of 2**100
    answered INTERNAL where metadata carries it as an int64)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise InvalidArgument(
            f"{where}: {key} must be a positive integer of at most {MAX_VERSION}, got {value!r}"
        )
    return value


def _opt_positive_int(value: Any, where: str, key: str) -> int | None:
    return None if value is None else _positive_int(value, where, key)
