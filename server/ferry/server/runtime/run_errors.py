"""What an onnxruntime run raises, in Ferry's terms."""

from __future__ import annotations

import onnxruntime as ort

from ferry.server.errors import FerryError, InvalidInput, LimitExceeded

# What onnxruntime raises when a run refuses its input's values (an index past a Gather's
# table) or a kernel fails on them (FAIL: a Reshape to a size the data does not have, a
# sequence length a graph exported at one length cannot take): the request's shapes or values,
# since the version loaded, passed its probe and serves others. It was INTERNAL.
_STATE = ort.capi.onnxruntime_pybind11_state
REFUSED_INPUT: tuple[type[Exception], ...] = (_STATE.InvalidArgument, _STATE.Fail)


# onnxruntime's words when a buffer the run needs cannot be had (its CPU and CUDA allocators)
_NO_MEMORY = ("Failed to allocate memory", "bad_alloc", "out of memory")


def refused_input(exc: Exception) -> FerryError:
    """onnxruntime's refusal of a request's values as the client's INVALID_ARGUMENT (it was
    INTERNAL, "see the server log"), with onnxruntime's words: they name the node and the
    bound."""
    text = " ".join(str(exc).split())
    for prefix in (
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ",
        "[ONNXRuntimeError] : 1 : FAIL : ",
    ):
        text = text.removeprefix(prefix)
    if any(words in text for words in _NO_MEMORY):
        # A valid request the host cannot hold (an unbounded axis, a huge batch): a limit, not
        # a malformed request, and not a fault of the server's own.
        return LimitExceeded(
            f"the model ran out of memory on this request ({text[:300]}): send fewer rows or "
            "shorter dynamic axes, or bound them in the model's config"
        )
    return InvalidInput(
        f"the model cannot run on this request's shapes or values: {text[:400]}; check them "
        "against the model's metadata"
    )
