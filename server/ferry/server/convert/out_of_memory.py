"""Telling "out of memory" from "corrupt file", for the processes that read a model under a limit.

A conversion process (and the process that checks an ONNX upload) runs under an address-space
limit (``--conversion-memory-bytes``). Reaching it rarely surfaces as ``MemoryError``: protobuf
reports ``DecodeError: ... Arena alloc failed``, onnx and onnxruntime raise ``RuntimeError``s
naming ``bad_alloc`` or a failed allocation, and the code that reads a file wraps whatever it
gets as "corrupt or truncated, upload again" — advice that cannot help. So every failure is
judged by its whole chain (``__context__`` survives ``raise ... from None``) before its own
message is believed, and one that ran out of memory becomes ``LimitExceeded`` naming the limit.
"""

from __future__ import annotations

import re
import resource

from ferry.server.errors import LimitExceeded

SETTING = "--conversion-memory-bytes"
_SIGNS = re.compile(
    r"alloc(ation)? failed|bad_alloc|bad allocation|failed to allocate|out of memory|"
    r"cannot allocate memory|memoryerror",
    re.IGNORECASE,
)


def memory_limit() -> int:
    """This process's address-space limit (its parent sets it), 0 when there is none."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return 0 if soft == resource.RLIM_INFINITY else soft


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` or any exception it was raised while handling ran out of memory."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or _SIGNS.search(f"{type(exc).__name__}: {exc}"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def text_says_out_of_memory(text: str) -> bool:
    """The same judgement on a line of a process's output (a crash's last stderr line)."""
    return bool(_SIGNS.search(text))


def describe_limit(limit: int) -> str:
    if limit <= 0:
        return "with no limit set (the machine itself ran out)"
    return f"under its limit of {limit} bytes ({limit / 2**30:.1f} GiB, server setting {SETTING})"


def exceeded(limit: int, what: str = "the conversion") -> LimitExceeded:
    """The error a client sees: which limit, its value, and what to do about it."""
    return LimitExceeded(
        f"{what} ran out of memory {describe_limit(limit)}: the model needs more memory than "
        f"that; raise {SETTING} (or 0 for no limit) on a machine with the memory to spare, or "
        "convert and quantize the model on a bigger machine and upload the result"
    )
