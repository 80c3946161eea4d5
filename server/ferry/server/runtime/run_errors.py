"""What an onnxruntime run raises, in Ferry's terms."""

from __future__ import annotations

import onnxruntime as ort

from ferry.server.errors import InvalidInput

# What onnxruntime raises when a run refuses its input's values (an index past a Gather's
# table) or a kernel fails on them (FAIL: a Reshape to a size the data does not have, a
# sequence length a graph exported at one length cannot take): the request's shapes or values,
# since the version loaded, passed its probe and serves others. It was INTERNAL.
_STATE = ort.capi.onnxruntime_pybind11_state
REFUSED_INPUT: tuple[type[Exception], ...] = (_STATE.InvalidArgument, _STATE.Fail)


def refused_input(exc: Exception) -> InvalidInput:
    """onnxruntime's refusal of a request's values as the client's INVALID_ARGUMENT (it was
    INTERNAL, "see the server log"), with onnxruntime's words: they name the node and the
    bound."""
    text = " ".join(str(exc).split())
    for prefix in (
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ",
        "[ONNXRuntimeError] : 1 : FAIL : ",
    ):
        text = text.removeprefix(prefix)
    return InvalidInput(
        f"the model cannot run on this request's shapes or values: {text[:400]}; check them "
        "against the model's metadata"
    )
