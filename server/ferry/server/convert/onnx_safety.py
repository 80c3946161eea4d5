"""The one rule for an uploaded ONNX file: a model reads no bytes that did not travel with it.

onnxruntime resolves a tensor's external data relative to the model file, and uploads sit side by
side in one folder, so a tensor naming ``<another upload id>.safetensors`` would be converted,
published and served with another user's bytes. Tensors hide in many places — initializers,
sparse initializers, every tensor-valued attribute kind of any node, subgraphs of If/Loop/Scan at
any depth, local functions and their default attributes, training graphs — and every onnx release
may add one. So the walk is driven by the protobuf schema, not by a list of known places: it
visits every message field of every message and judges every ``TensorProto`` it meets. Both sides
call it (``check_source``): the server when an upload arrives (``uploads``) and the child again
before it reads a tensor (``worker/load``). The walk itself is ``ferry.server.onnx_walk``'s,
shared with the runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ferry.server.errors import InvalidArgument
from ferry.server.onnx_walk import (  # used here, and by callers
    NODES,
    TENSOR,
    Step,
    external_tensors,
    messages,
    walk,
)

# Domains onnxruntime's CPU provider implements; custom-op libraries are never registered.
SAFE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# Operators of the served domains that name a file a provider reads beside the model. EPContext
# (a provider's compiled context: TensorRT, OpenVINO, QNN...) reads its engine from the path in
# ep_cache_context (embed_mode 0) or deserializes the blob it embeds: in an upload, that path
# resolves beside it, among other users' uploads. A local function of that name is no excuse.
FILE_OPS = {
    ("com.microsoft", "EPContext"): "a provider's precompiled context, whose ep_cache_context "
    "names an engine file read from beside the model (or embeds the engine itself)",
}
_MAX_SHOWN = 100  # characters of a client-chosen name quoted back


@dataclass(frozen=True)
class ExternalRef:
    """A tensor that would read bytes from outside the file."""

    where: str
    location: str  # the external_data "location" entry, "" when none is given
    offset: str = ""  # the "offset" and "length" entries as written ("" when absent)
    length: str = ""
    nbytes: int | None = None  # what the tensor's dims and type need; None when unknown


def external_refs(model: Any) -> Iterator[ExternalRef]:
    """What each tensor that names external data reads, and where the tensor sits."""
    for step in external_tensors(model):
        yield _ref(step)


def _ref(step: Step) -> ExternalRef:
    tensor = step.message
    entries = {e.key: e.value for e in tensor.external_data}
    return ExternalRef(
        describe(step),
        entries.get("location", ""),
        entries.get("offset", ""),
        entries.get("length", ""),
        tensor_nbytes(tensor),
    )


# The external_data keys onnx writes and onnxruntime reads; onnxruntime refuses any other.
ENTRY_KEYS = ("location", "offset", "length", "checksum")
_NO_EXTERNAL_TYPES = {0: "UNDEFINED", 8: "STRING"}
_RESAVE = "save the model again with onnx.save_model(model, path, save_as_external_data=True)"


def _check_entries(step: Step) -> None:
    """The entries must mean one thing to every reader. This check read the last of a key
    given twice and took an empty value for an absent one (offset 0), onnx reads the last and
    fails on an empty offset, onnxruntime refuses both: the check judged an offset no reader
    reads, and the upload was accepted only to fail its conversion with onnxruntime's "model
    format error!" (FAILED_PRECONDITION, blaming spec.inputs). A key twice, an empty value, a
    key no reader knows, a type that cannot be external, are refused here, naming them."""
    tensor, where = step.message, describe(step)
    seen: set[str] = set()
    for entry in tensor.external_data:
        key = _short(entry.key)
        if entry.key not in ENTRY_KEYS:
            raise InvalidArgument(
                f"{where}: external_data key {key!r} is not one of "
                f"{', '.join(ENTRY_KEYS)} (onnxruntime refuses it); {_RESAVE}"
            )
        if entry.key in seen:
            raise InvalidArgument(
                f"{where}: external_data gives {key!r} twice (readers disagree on which one "
                f"counts); {_RESAVE}"
            )
        if not entry.value:
            raise InvalidArgument(f"{where}: external_data {key!r} is empty; {_RESAVE}")
        seen.add(entry.key)
    kind = _NO_EXTERNAL_TYPES.get(tensor.data_type)
    if kind is not None:
        raise InvalidArgument(
            f"{where}: a tensor of type {kind} cannot keep its data in an external file "
            f"(onnxruntime refuses it); {_RESAVE}"
        )


def check_self_contained(model: Any) -> None:
    """Refuse a model any of whose tensors would read bytes from outside the file."""
    refs = external_refs(model)
    first = next(refs, None)
    if first is None:
        return
    more = sum(1 for _ in refs)
    named = f" (file {_short(first.location)!r})" if first.location else ""
    others = f" and {more} more tensor{'s' if more > 1 else ''}" if more else ""
    raise InvalidArgument(
        f"model reads external data from {first.where}{named}{others}: upload a self-contained "
        "file, a model may read no bytes that did not travel with it; save it with every tensor "
        "inside, e.g. onnx.save(model, path, save_as_external_data=False) (models under 2 GiB), "
        "or send model.onnx with its data files as one archive (format onnx_archive: the SDK "
        "does so for upload(name, folder), the CLI for `ferry upload NAME FOLDER`)"
    )


def check_confined(model: Any, files: Mapping[str, int]) -> int:
    """Every external-data reference of ``model`` must name one of ``files`` (the names that
    came in the model's archive, flat, mapped to their sizes) and lie inside it: offset and
    length within the file, and as many bytes as the tensor's dims and type need. Returns the
    number of references. A reference that could reach anything else (another upload, a path
    with ``..``, an absolute path, a file the archive did not carry) is refused, naming the
    tensor and the path."""
    count = 0
    for step in external_tensors(model):
        count += 1
        _check_entries(step)
        ref = _ref(step)
        shown = _short(ref.location)
        if ref.location not in files:
            why = (
                "it is not a plain file name of the archive (no folders, no absolute paths)"
                if not ref.location or "/" in ref.location or "\\" in ref.location
                else "the archive carries no such file"
            )
            raise InvalidArgument(
                f"{ref.where} reads external data from {shown!r}: {why}; a model may read only "
                "the files that travel with it, side by side with model.onnx"
            )
        size = files[ref.location]
        offset = _entry_int(ref, "offset", ref.offset, 0)
        length = _entry_int(ref, "length", ref.length, size - offset)
        if ref.nbytes is not None and length != ref.nbytes and ref.length:
            raise InvalidArgument(
                f"{ref.where} reads {length} bytes of {shown!r}, its dims and type need "
                f"{ref.nbytes}: the archive's model.onnx does not match its data"
            )
        if offset + length > size or (ref.nbytes is not None and offset + ref.nbytes > size):
            need = max(length, ref.nbytes or 0)
            raise InvalidArgument(
                f"{ref.where} reads bytes {offset}..{offset + need} of {shown!r}, a file of "
                f"{size} bytes: truncated data file, or model.onnx from another save"
            )
    return count


def _entry_int(ref: ExternalRef, key: str, text: str, default: int) -> int:
    if not text:
        return default
    # Decimal digits only: Python's int() also takes " 16", "+16", "1_6" and other scripts'
    # digits, which onnxruntime's parser refuses, so the check judged what no reader reads.
    if not (text.isascii() and text.isdigit()):
        raise InvalidArgument(
            f"{ref.where}: external data {key} {_short(text)!r} is not a non-negative integer "
            "(decimal digits only)"
        )
    return int(text)


# Bytes per element of each onnx.TensorProto data type with a fixed size (strings excluded).
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
                  14: 8, 15: 16, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1}  # fmt: skip


def tensor_nbytes(tensor: Any) -> int | None:
    """The bytes a tensor's dims and type need (None for strings and packed 4-bit types)."""
    per = _ELEMENT_BYTES.get(tensor.data_type)
    if per is None or any(d < 0 for d in tensor.dims):
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return count * per


def check_source(model: Any) -> None:
    """Both rules, as the server applies them to an upload and the child to every source it is
    given (it must hold for every file, whoever wrote the job): no external data, no node of a
    domain the server has no kernels for. Run before anything reads a tensor."""
    check_self_contained(model)
    check_domains(model)


def used_domains(model: Any) -> set[str]:
    """The domains of the nodes anywhere in ``model``: main graph, subgraphs at any depth, local
    functions, training graphs. The default domain is spelt ""."""
    return {"" if node.domain == "ai.onnx" else node.domain for node in messages(model, NODES)}


def check_domains(model: Any) -> None:
    """Refuse a node of a domain the server has no kernels for, unless a local function of the
    model defines it, and a node of an operator that reads a file (``FILE_OPS``) anywhere. Judged by the nodes, never by ``opset_import``: onnxruntime's optimizer
    declares every domain it knows (``ai.onnx.training``, ``com.microsoft.nchwc``...) in the
    files it writes, whether a node uses them or not, and such a file is perfectly servable."""
    # A first pass gathers the operators used, which are few however many nodes use them;
    # only a refused one is looked for again, its node named.
    local = {(f.domain, f.name) for f in model.functions}
    if not any(
        _refused(op, local) for op in {(n.domain, n.op_type) for n in messages(model, NODES)}
    ):
        return
    for step in walk(model, NODES):
        node = step.message
        if (node.domain, node.op_type) in FILE_OPS:
            raise InvalidArgument(
                f"the ONNX file holds a {_short(node.domain)}::{_short(node.op_type)} node "
                f"({describe(step)}): {FILE_OPS[(node.domain, node.op_type)]}; a model may "
                "read no bytes that did not travel with it and run no precompiled engine: "
                "upload the original model, before a provider compiled it"
            )
        if node.domain in SAFE_DOMAINS:
            continue
        if (node.domain, node.op_type) not in local:
            raise InvalidArgument(
                f"the ONNX file uses operator {_short(node.domain)}::{_short(node.op_type)} "
                f"({describe(step)}), a custom-op domain this server does not register; only "
                f"{', '.join(repr(d) for d in sorted(SAFE_DOMAINS))} are served: re-export the "
                "model with standard operators"
            )


def _refused(op: tuple[str, str], local: set[tuple[str, str]]) -> bool:
    """What ``check_domains`` refuses: an operator (domain, type) that reads a file, or one
    of a domain the server has no kernels for that no local function defines."""
    return op in FILE_OPS or (op[0] not in SAFE_DOMAINS and op not in local)


def unused_opset_imports(model: Any) -> list[str]:
    """The domains ``model`` declares in ``opset_import`` but no node uses (the default domain
    is always kept: an empty graph still names its opset)."""
    used = used_domains(model)
    return [
        o.domain
        for o in model.opset_import
        if o.domain not in ("", "ai.onnx") and o.domain not in used
    ]


def describe(step: Step) -> str:
    """``function 'local::F' > node 'c' (Constant) > attribute 'sparse_value' > values``."""
    parts: list[str] = []
    current: Step | None = step
    while current is not None and current.parent is not None:
        parts.append(_label(current))
        current = current.parent
    return " > ".join(reversed(parts)) or "the model"


def _label(step: Step) -> str:
    message, kind = step.message, step.message.DESCRIPTOR.full_name
    index = f" #{step.index}" if step.index is not None else ""
    name = _short(str(getattr(message, "name", "")))
    if kind == "onnx.NodeProto":
        who = f"{name!r}" if name else f"#{step.index}"
        return f"node {who} ({_short(message.op_type)})"
    if kind == "onnx.FunctionProto":
        return f"function '{_short(message.domain)}::{name}'"
    if kind == "onnx.AttributeProto":
        what = "default attribute" if step.field == "attribute_proto" else "attribute"
        return f"{what} {name!r}"
    if kind == "onnx.GraphProto":
        where = "graph" if step.field in ("graph", "g") else f"{step.field}{index}"
        return f"{where} {name!r}" if name else where
    if kind == TENSOR and step.field in _TENSOR_SLOTS:
        slot = _TENSOR_SLOTS[step.field] + (index if step.field == "tensors" else "")
        return f"{slot} {name!r}" if name else slot
    return f"{step.field}{index}"


_TENSOR_SLOTS = {"initializer": "initializer", "t": "tensor", "tensors": "tensors"}


def _short(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
