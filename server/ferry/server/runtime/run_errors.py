"""What an onnxruntime run raises, in Ferry's terms."""

from __future__ import annotations

import onnxruntime as ort

from ferry.server.errors import InvalidInput

# What onnxruntime raises when a run refuses its input's values (an index past a Gather's
# table, a Reshape to a size the data does not have): the request's fault, not the server's.
REFUSED_INPUT: type[Exception] = ort.capi.onnxruntime_pybind11_state.InvalidArgument


def refused_input(exc: Exception) -> InvalidInput:
    """onnxruntime's refusal of a request's values as the client's INVALID_ARGUMENT (it was
    INTERNAL, "see the server log"), with onnxruntime's words: they name the node and the
    bound."""
    text = " ".join(str(exc).split())
    text = text.removeprefix("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ")
    return InvalidInput(f"the model cannot run on this request's values: {text[:400]}")
