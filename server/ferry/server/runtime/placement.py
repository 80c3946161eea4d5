"""Where a version's instances run: ``[instances]`` x ``[onnxruntime].providers`` -> devices.

Triton's instance groups, for onnxruntime: ``count`` instances on each GPU of
``instances.device_ids``. Every GPU provider of the list (the providers table says which run on a
GPU) is given the instance's ``device_id``; the CPU fallback after it is left as written, so a
version still opens where a device's provider is missing. Instances on one device share one
session (onnxruntime's ``run`` is thread-safe, and a second copy of the weights on the same GPU
buys nothing but memory), so the unit that is opened is the device (``Device``), and the count is
how many batches it may run at once.

Pure logic over the config, with no onnxruntime import: the refusals below are what a user reads
when the config asks for something that cannot mean anything, and they are tested on a host
without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ferry.server.core.config import InstancesConfig, ModelConfig, ProviderConfig
from ferry.server.errors import InvalidArgument
from ferry.server.runtime.providers import GPU, PROVIDERS, lookup

DEVICE_OPTION = "device_id"


@dataclass(frozen=True)
class Device:
    """The unit a session is opened for: a device, the providers placed on it, and how many
    instances share its session (batches it may run at once)."""

    device_id: int | None  # None: not placed (no device_ids); the providers' options decide
    providers: tuple[ProviderConfig, ...]
    count: int


def place(providers: tuple[ProviderConfig, ...], instances: InstancesConfig) -> list[Device]:
    """The devices a version's sessions are opened on, in the order ``device_ids`` lists them,
    each with ``count`` instances. Without ``device_ids``: one entry with the providers as
    written and ``count`` instances (what Ferry always did)."""
    if not instances.device_ids:
        return [Device(None, providers, instances.count)]
    gpu = [p for p in providers if _runs_on_gpu(p)]
    if not gpu:
        names = [p.name for p in providers]
        known = ", ".join(n for n, p in PROVIDERS.items() if p.device == GPU)
        raise InvalidArgument(
            f"instances.device_ids {list(instances.device_ids)} places instances on GPUs, but "
            f"none of onnxruntime.providers {names} runs on a GPU (GPU providers: {known}); "
            'add one, e.g. { name = "CUDAExecutionProvider" }, or remove device_ids'
        )
    for p in gpu:
        if DEVICE_OPTION in p.options_dict():
            raise InvalidArgument(
                f"provider {p.name} sets options.device_id = {p.options_dict()[DEVICE_OPTION]} "
                f"and instances.device_ids {list(instances.device_ids)} places it too: remove "
                "one (device_ids puts instances.count instances on each listed GPU)"
            )
    return [
        Device(device_id, tuple(_on_device(p, device_id) for p in providers), instances.count)
        for device_id in instances.device_ids
    ]


def device_config(config: ModelConfig, device: Device) -> ModelConfig:
    """The config one device's session is opened with: its placed providers, and instances
    of that device alone (what opens the session need not know about the others)."""
    return replace(
        config,
        onnxruntime=replace(config.onnxruntime, providers=device.providers),
        instances=InstancesConfig(count=device.count),
    )


def _runs_on_gpu(provider: ProviderConfig) -> bool:
    known = lookup(provider.name)  # an unknown name is refused here as when it is opened
    return known.device == GPU and DEVICE_OPTION in known.options


def _on_device(provider: ProviderConfig, device_id: int) -> ProviderConfig:
    if not _runs_on_gpu(provider):
        return provider
    options = {**provider.options_dict(), DEVICE_OPTION: device_id}
    return replace(provider, options=tuple(sorted(options.items())))
