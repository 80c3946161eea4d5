"""The architecture registry: names a state_dict or safetensors upload can be loaded into.

A weights-only upload carries no code, so the server must already know the class the weights belong
to. Built-ins ship here; users add their own by installing a package that declares an entry point in
the ``ferry.architectures`` group (installed code, never code that came over the network). The
object an entry point names is a callable ``(**kwargs) -> torch.nn.Module``.

This module is the torch-free half, used by the serving process: listing names and default input
specs. Building a module (torch, and loading a plugin's code) is ``worker.architectures``', in the
conversion child only, so merely listing plugins never runs them.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from ferry.server.convert.spec import InputSpec
from ferry.server.errors import InvalidArgument

ENTRY_POINT_GROUP = "ferry.architectures"
# What a user holding weights of a class of their own can do: said by every message about it.
ROUTES = (
    "upload the nn.Module itself (ConversionClient.upload(name, module, example_inputs=...): the "
    "SDK sends its weights, inputs and outputs), or install the class on the server as a plugin "
    "(the ferry.architectures entry-point group; docs/conversion.md, 'Your own architecture')"
)

# name -> (module attribute in ferry.server.convert.worker.nets, one-line description). The
# builders live in ``worker.nets`` so that importing this module never imports torch.
BUILTINS: dict[str, tuple[str, str]] = {
    "seed": ("seed", "Sequential(Linear(3, 4), ReLU, Linear(4, 1)); input [B, 3]"),
    "mlp": ("mlp", "in_features, hidden: list[int], out_features, activation relu|gelu"),
    "small_cnn": ("small_cnn", "in_channels=3, num_classes=10, width=16, depth=4"),
    "resnet": ("ResNet", "in_channels=3, num_classes=1000, widths=[64..512], blocks=[2,2,2,2]"),
    "transformer_encoder": (
        "TransformerEncoderNet",
        "d_model=64, nhead=4, num_layers=2, dim_feedforward=128, seq_len, num_classes",
    ),
    "linear_heavy": ("linear_heavy", "a 14.6M-parameter MLP 1024->4096->2048->1000"),
}

# Input shapes a spec may omit for built-ins. Image models default to a size their global pooling
# accepts; clients wanting another size pass spec.inputs explicitly.
_DEFAULT_IMAGE_SIZE = {"small_cnn": 32, "resnet": 224}
_DEFAULT_SEQ_LEN = 16


def entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Built-ins first, then installed plugins; a plugin cannot shadow a built-in name."""
    plugins = sorted(name for name in entry_points() if name not in BUILTINS)
    return [*BUILTINS, *plugins]


def unknown(name: str) -> InvalidArgument:
    return InvalidArgument(
        f"unknown architecture {name!r}: available are {', '.join(available())}; for a class "
        f"of your own, {ROUTES}"
    )


def default_input_specs(name: str, kwargs: dict[str, Any]) -> list[InputSpec]:
    """The input a built-in expects, batch dim first (-1); [] for plugins and unknown names.

    Torch-free on purpose: the server uses it to accept a spec without inputs before starting a
    child. Plugins are not loaded here (that would run their code in the server), so their specs
    must list inputs.
    """
    if name == "seed":
        return [InputSpec("input", "FP32", [-1, 3])]
    if name == "mlp":
        return [InputSpec("input", "FP32", [-1, int(kwargs.get("in_features", 64))])]
    if name == "linear_heavy":
        return [InputSpec("input", "FP32", [-1, int(kwargs.get("in_features", 1024))])]
    if name in _DEFAULT_IMAGE_SIZE:
        size = _DEFAULT_IMAGE_SIZE[name]
        return [InputSpec("input", "FP32", [-1, int(kwargs.get("in_channels", 3)), size, size])]
    if name == "transformer_encoder":
        seq_len = kwargs.get("seq_len") or _DEFAULT_SEQ_LEN
        return [InputSpec("input", "FP32", [-1, int(seq_len), int(kwargs.get("d_model", 64))])]
    return []
