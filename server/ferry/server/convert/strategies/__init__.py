"""The registries of conversion strategies: how a model may be quantized and pruned.

One entry per strategy holds everything the rest of Ferry needs to know about it (its name, what it
builds, whether it needs calibration data, when ``auto`` skips it and why, and how it is built), so
that validation, the child's plan, the report and the docs tables all derive from it and a new
strategy is added here alone. Importable by the serving process: nothing here imports torch, and
the builders import ``onnxruntime.quantization`` or torch inside themselves, when the conversion
child calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from ferry.server.errors import InvalidArgument


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_Entry = TypeVar("_Entry", bound=_Named)


def by_name(entries: Sequence[_Entry], name: str, what: str) -> _Entry:
    """The entry of a registry called ``name``; an unknown name is refused with every known one,
    so a client's typo comes back with the list to choose from."""
    for entry in entries:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in entries)
    raise InvalidArgument(f"unknown {what} {name!r}: use one of {known}")
