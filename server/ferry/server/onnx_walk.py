"""Every message of an ONNX model, walked by the protobuf schema, and the tensors among them that
name external data.

Shared by the conversion's checks (``convert.onnx_safety``: an upload reads no bytes that did not
travel with it) and the runtime (``runtime.shared_weights``: a model whose tensors name files
beside it is opened from its own folder), which may not import the conversion. Tensors hide in
many places — initializers, sparse initializers, every tensor-valued attribute kind of any node,
subgraphs of If/Loop/Scan at any depth, local functions and their default attributes, training
graphs — and every onnx release may add one, so the walk is driven by the schema rather than a
list of known places: it enters every message field whose type can hold what it looks for.

Torch-free and onnx-free at import: the messages are recognised by their descriptor's name, and
only message-typed fields are read, so a tensor's ``raw_data`` is never copied out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

TENSOR = "onnx.TensorProto"
NODE = "onnx.NodeProto"
EXTERNAL = 1  # onnx.TensorProto.DataLocation.EXTERNAL
TENSORS = frozenset({TENSOR})
NODES = frozenset({NODE})


class Step:
    """One hop from the model to a message: the field it sits in (and its index when the field
    is repeated). Kept as a chain so that a location is spelt out only when it is reported."""

    __slots__ = ("field", "index", "message", "parent")

    def __init__(self, parent: Step | None, field: str, index: int | None, message: Any) -> None:
        self.parent = parent
        self.field = field
        self.index = index
        self.message = message


def walk(root: Any, kinds: frozenset[str] | None = None) -> Iterator[Step]:
    """Every message under ``root`` (root included), in file order, through every message field,
    each with its location; with ``kinds`` (message type names: ``TENSORS``, ``NODES``), only
    the messages of those types (see ``messages``, which finds them faster, without locations)."""
    plans = _plans(kinds)
    stack = [Step(None, "", None, root)]
    while stack:
        step = stack.pop()
        message = step.message
        wanted, fields = plans.get(message.DESCRIPTOR) or _plan(message.DESCRIPTOR, kinds)
        if wanted:
            yield step
        children: list[Step] = []
        for name, repeated, kind in fields:
            if repeated:
                items = getattr(message, name)
                if not items:
                    continue
                inner_wanted, inner = plans.get(kind) or _plan(kind, kinds)
                # An item neither wanted nor holding anything to enter (a node without
                # attributes, looking for tensors) gets no step: most items of a large graph.
                children.extend(
                    [
                        Step(step, name, i, item)
                        for i, item in enumerate(items)
                        if inner_wanted or _enters(item, inner)
                    ]
                )
            elif message.HasField(name):
                children.append(Step(step, name, None, getattr(message, name)))
        if children:
            children.reverse()
            stack.extend(children)


def messages(root: Any, kinds: frozenset[str]) -> Iterator[Any]:
    """The messages of ``kinds`` under ``root`` (root included), in no set order, without their
    locations: the checks' first pass, whose second (``walk``) runs only when one is refused and
    must be named. A field is entered only when its type, by the schema, can hold one of
    ``kinds`` at some depth (a node's attributes, not a value's type and shape), and an item
    only when it holds something there. An upload of 1.5M nodes took 27 s to check, the RPC
    waiting: a location was made for every message, and every field of each was tried."""
    plans = _plans(kinds)
    wanted, _ = plans.get(root.DESCRIPTOR) or _plan(root.DESCRIPTOR, kinds)
    if wanted:
        yield root
    stack = [root]  # messages whose fields are still to be entered
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        message = pop()
        _, fields = plans.get(message.DESCRIPTOR) or _plan(message.DESCRIPTOR, kinds)
        for name, repeated, kind in fields:
            inner_wanted, inner = plans.get(kind) or _plan(kind, kinds)
            if repeated:
                items = getattr(message, name)
                if not items:
                    continue
                if inner_wanted:
                    yield from items
                if inner:
                    extend([item for item in items if _enters(item, inner)])
            elif message.HasField(name):
                item = getattr(message, name)
                if inner_wanted:
                    yield item
                if inner:
                    push(item)


def _enters(message: Any, fields: list[tuple[str, bool, Any]]) -> bool:
    """Whether ``message`` has anything in ``fields`` (its plan's fields to enter)."""
    for name, repeated, _ in fields:
        if len(getattr(message, name)) if repeated else message.HasField(name):
            return True
    return False


def names_external_data(tensor: Any) -> bool:
    return tensor.data_location == EXTERNAL or len(tensor.external_data) > 0


def external_tensors(model: Any) -> Iterator[Step]:
    """The step to every tensor of ``model`` (a ModelProto, or any onnx message) that names
    external data, wherever it sits (graph, subgraphs, functions, attributes, sparse parts)."""
    if not any(names_external_data(t) for t in messages(model, TENSORS)):
        return
    for step in walk(model, TENSORS):
        if names_external_data(step.message):
            yield step


# kinds -> message descriptor -> (is one of kinds, the (name, repeated) fields to enter).
_PLANS: dict[frozenset[str] | None, dict[Any, tuple[bool, list[tuple[str, bool, Any]]]]] = {}


def _plans(kinds: frozenset[str] | None) -> dict[Any, tuple[bool, list[tuple[str, bool, Any]]]]:
    return _PLANS.setdefault(kinds, {})


def _plan(
    descriptor: Any, kinds: frozenset[str] | None
) -> tuple[bool, list[tuple[str, bool, Any]]]:
    """What a message of type ``descriptor`` is to a walk for ``kinds`` (None: every message),
    read from the schema once per type: whether it is wanted, and the message-typed fields
    whose type can hold a wanted message at some depth (all of them for None), as
    (name, repeated, their type).

    onnx has no map fields; one added later would need its values walked, so it fails loudly
    here rather than being skipped."""
    fields = [
        (field.name, bool(field.is_repeated), field.message_type)
        for field in _message_fields(descriptor)
        if kinds is None or _holds(field.message_type, kinds, set())
    ]
    plan = (kinds is None or descriptor.full_name in kinds, fields)
    _plans(kinds)[descriptor] = plan
    return plan


def _message_fields(descriptor: Any) -> list[Any]:
    fields = []
    for field in descriptor.fields:
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            raise NotImplementedError(f"map field {descriptor.full_name}.{field.name}")
        fields.append(field)
    return fields


def _holds(descriptor: Any, kinds: frozenset[str], seen: set[str]) -> bool:
    """Whether a message of type ``descriptor``, or one under it at any depth, can be of
    ``kinds`` (the schema is recursive: a graph's node's attribute holds graphs)."""
    if descriptor.full_name in kinds:
        return True
    seen.add(descriptor.full_name)
    return any(
        _holds(field.message_type, kinds, seen)
        for field in _message_fields(descriptor)
        if field.message_type.full_name not in seen
    )
