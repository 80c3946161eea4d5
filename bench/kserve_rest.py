"""The KServe 0.21 REST reference of bench/http_serving.py: a KServe ModelServer serving the same
ONNX MLP with onnxruntime, as a KServe user would write it (a custom ``Model``).

Run by bench/http_serving.py with the interpreter of a separate KServe environment
(``--kserve-python``), never imported by Ferry:

    python3 -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve==0.21.0 onnxruntime
    /tmp/kserve-venv/bin/python bench/kserve_rest.py MODEL.onnx HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import sys
from typing import Any

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxMLP(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.ready = True

    async def predict(
        self, payload: InferRequest, headers: Any = None, response_headers: Any = None
    ) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        (y,) = self.session.run(None, {"input": x})
        out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        response_id = payload.id or ""  # KServe refuses a response without an id
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=response_id)


if __name__ == "__main__":
    path, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ModelServer(http_port=http_port, grpc_port=grpc_port, enable_latency_logging=False).start(
        [OnnxMLP("mlp", path)]
    )
