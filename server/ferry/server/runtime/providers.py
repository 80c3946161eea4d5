"""The execution providers table: every provider Ferry knows, its device, its options.

One row per provider is the whole of what adding one takes: the model config names providers
with options (``providers = [{ name, options }]``); each name and option is checked here, with a
message that lists what is allowed, before onnxruntime sees it (onnxruntime ignores or crashes on
misspelled options, depending on the provider). Whether a batch may run inline on the event loop
is a property of the provider: only CPU execution costs what the inline estimate measures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ferry.server.core.config import OptionValue, ProviderConfig
from ferry.server.errors import InvalidArgument

CPU = "cpu"
GPU = "gpu"


@dataclass(frozen=True)
class Option:
    """An option's type: ``int``, ``float``, ``bool``, ``str``, or a tuple of allowed strings."""

    kind: str | tuple[str, ...]
    doc: str = ""

    def convert(self, provider: str, key: str, value: OptionValue) -> str:
        """onnxruntime takes provider options as strings; booleans as "1"/"0"."""
        where = f"provider {provider} option {key!r}"
        if isinstance(self.kind, tuple):
            if value not in self.kind:
                raise InvalidArgument(
                    f"{where} must be one of {', '.join(self.kind)}, got {value!r}"
                )
            return str(value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidArgument(f"{where} must be true or false, got {value!r}")
            return "1" if value else "0"
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{where} must be an integer >= 0, got {value!r}")
            return str(value)
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidArgument(f"{where} must be a number, got {value!r}")
            return str(value)
        if not isinstance(value, str):
            raise InvalidArgument(f"{where} must be a string, got {value!r}")
        return value


@dataclass(frozen=True)
class Provider:
    name: str
    device: str  # CPU or GPU: where its kernels run (Triton's KIND_CPU / KIND_GPU)
    inline: bool  # a fast batch may run on the event loop instead of a worker thread
    options: Mapping[str, Option] = field(default_factory=dict)
    install: str = ""  # what to install when this onnxruntime build lacks it
    # onnxruntime's device name for memory it computes in, where planned batches bind their
    # outputs (runtime/staging.py); "cpu" for providers whose outputs are host memory anyway.
    io_device: str = "cpu"


_ARENA = ("kNextPowerOfTwo", "kSameAsRequested")
_GPU_INSTALL = "install onnxruntime-gpu instead of onnxruntime (pip install 'ferry-serve[gpu]')"

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("CPUExecutionProvider", CPU, inline=True),
        Provider(
            "CUDAExecutionProvider",
            GPU,
            inline=False,
            io_device="cuda",
            options={
                "device_id": Option("int", "which GPU"),
                "gpu_mem_limit": Option("int", "bytes the arena may hold"),
                "arena_extend_strategy": Option(_ARENA),
                "cudnn_conv_algo_search": Option(("EXHAUSTIVE", "HEURISTIC", "DEFAULT")),
                "do_copy_in_default_stream": Option("bool"),
                "cudnn_conv_use_max_workspace": Option("bool"),
                "cudnn_conv1d_pad_to_nc1d": Option("bool"),
                "enable_cuda_graph": Option("bool"),
                "tunable_op_enable": Option("bool"),
                "tunable_op_tuning_enable": Option("bool"),
                "use_tf32": Option("bool"),
                "prefer_nhwc": Option("bool"),
            },
            install=_GPU_INSTALL,
        ),
        Provider(
            "TensorrtExecutionProvider",
            GPU,
            inline=False,
            io_device="cuda",
            options={
                "device_id": Option("int"),
                "trt_max_workspace_size": Option("int"),
                "trt_fp16_enable": Option("bool"),
                "trt_int8_enable": Option("bool"),
                "trt_engine_cache_enable": Option("bool"),
                "trt_engine_cache_path": Option("str"),
                "trt_timing_cache_enable": Option("bool"),
                "trt_max_partition_iterations": Option("int"),
                "trt_min_subgraph_size": Option("int"),
                "trt_builder_optimization_level": Option("int"),
                "trt_cuda_graph_enable": Option("bool"),
                "trt_profile_min_shapes": Option("str"),
                "trt_profile_max_shapes": Option("str"),
                "trt_profile_opt_shapes": Option("str"),
            },
            install=_GPU_INSTALL + " with TensorRT's libraries on the library path",
        ),
        Provider(
            "ROCMExecutionProvider",
            GPU,
            inline=False,
            options={
                "device_id": Option("int"),
                "gpu_mem_limit": Option("int"),
                "arena_extend_strategy": Option(_ARENA),
                "miopen_conv_exhaustive_search": Option("bool"),
                "do_copy_in_default_stream": Option("bool"),
                "tunable_op_enable": Option("bool"),
            },
            install="install onnxruntime-rocm instead of onnxruntime",
        ),
        Provider(
            "MIGraphXExecutionProvider",
            GPU,
            inline=False,
            options={"device_id": Option("int"), "migraphx_fp16_enable": Option("bool")},
            install="install onnxruntime-migraphx instead of onnxruntime",
        ),
        Provider(
            "OpenVINOExecutionProvider",
            CPU,
            inline=False,
            options={
                "device_type": Option("str", "CPU, GPU, NPU, ..."),
                "precision": Option(("FP32", "FP16", "ACCURACY")),
                "num_of_threads": Option("int"),
                "cache_dir": Option("str"),
            },
            install="install onnxruntime-openvino instead of onnxruntime",
        ),
    )
}


def lookup(name: str) -> Provider:
    """The table's row for ``name``; an unknown name is refused with the known ones."""
    provider = PROVIDERS.get(name)
    if provider is None:
        raise InvalidArgument(f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}")
    return provider


@dataclass(frozen=True)
class Resolved:
    """What onnxruntime is given: names and string options in preference order."""

    names: list[str]
    options: list[dict[str, str]]
    missing: list[str]  # asked for, known, but absent from this onnxruntime build


def resolve(configs: Sequence[ProviderConfig], available: Sequence[str]) -> Resolved:
    """Check every provider and option against the table and keep those this build has.
    Unknown names and options are refused; known providers this build lacks are skipped (with
    ``missing`` saying which, so the fallback is reported, never silent), unless none is left."""
    names: list[str] = []
    options: list[dict[str, str]] = []
    missing: list[str] = []
    for config in configs:
        provider = lookup(config.name)
        converted = {}
        for key, value in config.options:
            option = provider.options.get(key)
            if option is None:
                allowed = ", ".join(provider.options) or "none"
                raise InvalidArgument(
                    f"provider {provider.name} has no option {key!r}; its options: {allowed}"
                )
            converted[key] = option.convert(provider.name, key, value)
        if provider.name not in available:
            missing.append(provider.name)
            continue
        names.append(provider.name)
        options.append(converted)
    if not names:
        hints = "; ".join(
            f"{name}: {PROVIDERS[name].install}" for name in missing if PROVIDERS[name].install
        )
        raise InvalidArgument(
            f"none of the execution providers {[c.name for c in configs]} is available in this "
            f"onnxruntime build (available: {list(available)})" + (f"; {hints}" if hints else "")
        )
    return Resolved(names, options, missing)


def placement(name: str) -> tuple[str, bool]:
    """(device kind, inline allowed) of a session whose first provider is ``name``: a provider
    the table does not know is treated as a device of its own, never run inline."""
    provider = PROVIDERS.get(name)
    return (provider.device, provider.inline) if provider is not None else (CPU, False)


def io_device(name: str) -> str:
    """Where a session whose first provider is ``name`` binds its outputs (IOBinding)."""
    provider = PROVIDERS.get(name)
    return provider.io_device if provider is not None else "cpu"
