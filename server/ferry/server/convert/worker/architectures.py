"""Building an architecture's torch module from its registered name (conversion child only).

The names, their descriptions and default input specs are ``convert.architectures``' (torch-free,
read by the serving process); this half imports torch and loads plugin entry points, which runs
the plugin's installed code, so it lives on the child's side of the process boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ferry.server.convert.architectures import BUILTINS, ROUTES, available, entry_points, unknown
from ferry.server.errors import InvalidArgument

if TYPE_CHECKING:
    from torch import nn


def _builder(name: str) -> Callable[..., nn.Module]:
    if name in BUILTINS:
        from ferry.server.convert.worker import nets

        builder: Callable[..., nn.Module] = getattr(nets, BUILTINS[name][0])
        return builder
    entry = entry_points().get(name)
    if entry is None:
        raise unknown(name)
    loaded = entry.load()
    if not callable(loaded):
        raise InvalidArgument(
            f"architecture {name!r} ({entry.value}) is not callable: its entry point must name a "
            "callable(**kwargs) returning a torch.nn.Module"
        )
    return loaded


def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate ``name`` in eval mode; bad kwargs become INVALID_ARGUMENT, not a crash."""
    from torch import nn

    if not name:
        raise InvalidArgument(
            "state_dict and safetensors sources need an architecture name: one of "
            f"{', '.join(available())}; for a class of your own, {ROUTES}"
        )
    builder = _builder(name)
    try:
        module = builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"architecture {name!r} rejected its arguments {kwargs!r}: {exc}; "
            f"accepted: {BUILTINS[name][1] if name in BUILTINS else 'see the plugin documentation'}"
        ) from None
    if not isinstance(module, nn.Module):
        raise InvalidArgument(
            f"architecture {name!r} returned {type(module).__name__}, not a torch.nn.Module"
        )
    return module.eval()
