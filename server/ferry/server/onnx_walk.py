"""Every message of an ONNX model, walked by the protobuf schema, and the tensors among them that
name external data.

Shared by the conversion's checks (``convert.onnx_safety``: an upload reads no bytes that did not
travel with it) and the runtime (``runtime.shared_weights``: a model whose tensors name files
beside it is opened from its own folder), which may not import the conversion. Tensors hide in
many places — initializers, sparse initializers, every tensor-valued attribute kind of any node,
subgraphs of If/Loop/Scan at any depth, local functions and their default attributes, training
graphs — and every onnx release may add one, so the walk visits every message field of every
message rather than a list of known places.

Torch-free and onnx-free at import: the messages are recognised by their descriptor's name, and
only message-typed fields are read, so a tensor's ``raw_data`` is never copied out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

TENSOR = "onnx.TensorProto"
EXTERNAL = 1  # onnx.TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class Step:
    """One hop from the model to a message: the field it sits in (and its index when the field
    is repeated). Kept as a chain so that a location is spelt out only when it is reported."""

    parent: Step | None
    field: str
    index: int | None
    message: Any


def walk(root: Any) -> Iterator[Step]:
    """Every message under ``root`` (root included), in file order, through every message field."""
    stack = [Step(None, "", None, root)]
    while stack:
        step = stack.pop()
        yield step
        children: list[Step] = []
        for name, repeated in _message_fields(step.message.DESCRIPTOR):
            if repeated:
                children.extend(
                    Step(step, name, i, item) for i, item in enumerate(getattr(step.message, name))
                )
            elif step.message.HasField(name):
                children.append(Step(step, name, None, getattr(step.message, name)))
        stack.extend(reversed(children))


def external_tensors(model: Any) -> Iterator[Step]:
    """The step to every tensor of ``model`` (a ModelProto, or any onnx message) that names
    external data, wherever it sits (graph, subgraphs, functions, attributes, sparse parts)."""
    for step in walk(model):
        tensor = step.message
        if tensor.DESCRIPTOR.full_name == TENSOR and (
            tensor.data_location == EXTERNAL or len(tensor.external_data)
        ):
            yield step


_FIELDS: dict[str, list[tuple[str, bool]]] = {}


def _message_fields(descriptor: Any) -> list[tuple[str, bool]]:
    """(name, repeated) of each message-typed field; the schema is read once per message type.

    onnx has no map fields; one added later would need its values walked, so it fails loudly
    here rather than being skipped."""
    fields = _FIELDS.get(descriptor.full_name)
    if fields is None:
        fields = []
        for field in descriptor.fields:
            if field.message_type is None:
                continue
            if field.message_type.GetOptions().map_entry:
                raise NotImplementedError(f"map field {descriptor.full_name}.{field.name}")
            fields.append((field.name, bool(field.is_repeated)))
        _FIELDS[descriptor.full_name] = fields
    return fields
