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

import json
import re
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

# The kwargs of a built-in that the *server* reads (for its default input spec), each a size: they
# are checked at upload, since a value int() cannot take would otherwise fail every listing of
# the upload. The rest are the constructor's business, in the child.
_SIZE_KWARGS: dict[str, tuple[str, ...]] = {
    "mlp": ("in_features",),
    "linear_heavy": ("in_features",),
    "small_cnn": ("in_channels",),
    "resnet": ("in_channels",),
    "transformer_encoder": ("seq_len", "d_model"),
}
# May be null (no positional embedding; the default spec then uses _DEFAULT_SEQ_LEN).
_OPTIONAL_SIZES = frozenset({"seq_len"})
# A dim past this makes samples no conversion can build (validation.MAX_SAMPLE_ELEMENTS), and
# keeps a default spec's shape far inside the int64 of the wire.
MAX_SIZE = 1 << 26
# Plugin names are entry-point names: the model-name alphabet covers every sensible one, and a
# bound keeps a name that is stored and listed with every upload small.
MAX_NAME = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


def check_name(name: str) -> None:
    """Refuse a name no architecture can have, before it is stored with an upload (whether it is
    installed is asked at Convert: a plugin may be installed after the upload)."""
    if len(name) > MAX_NAME or not _NAME_RE.fullmatch(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise InvalidArgument(
            f"invalid architecture name {shown!r}: use 1-{MAX_NAME} characters from "
            "[A-Za-z0-9_.-], starting with a letter or digit (built-ins: "
            f"{', '.join(BUILTINS)})"
        )


def check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a built-in's size kwargs the server could not read, naming the key; other names
    (plugins, unknown ones) are not checked here: only their constructor knows its kwargs."""
    for key in _SIZE_KWARGS.get(name, ()):
        if key not in kwargs:
            continue
        value = kwargs[key]
        if value is None and key in _OPTIONAL_SIZES:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
            nullable = " (or null)" if key in _OPTIONAL_SIZES else ""
            raise InvalidArgument(
                f"architecture {name!r}: kwarg {key!r} is {_describe(value)}; it must be a "
                f"whole number from 1 to {MAX_SIZE}{nullable}, e.g. {json.dumps({key: 64})}"
            )


def _describe(value: Any) -> str:
    """A JSON value as the user wrote it, short; containers by kind (they may be deep)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    try:
        shown = json.dumps(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a number too large to print"
    return shown if len(shown) <= 40 else shown[:40] + "..."


def default_input_specs(name: str, kwargs: dict[str, Any]) -> list[InputSpec]:
    """The input a built-in expects, batch dim first (-1); [] for plugins and unknown names.

    Torch-free on purpose: the server uses it to accept a spec without inputs before starting a
    child. Plugins are not loaded here (that would run their code in the server), so their specs
    must list inputs. Kwargs ``check_kwargs`` refuses raise its INVALID_ARGUMENT here too.
    """
    check_kwargs(name, kwargs)
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
