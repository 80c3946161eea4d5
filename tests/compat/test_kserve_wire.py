"""Wire compatibility with Triton's protos, and coexistence with tritonclient in one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor
from serverutil import ServerThread
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from ferry.proto.kserve.v2 import grpc_service_pb2, model_config_pb2

OURS = "ferry.kserve.v2."
THEIRS = "inference."


def _relative(full_name: str, package: str) -> str:
    assert full_name.startswith(package), full_name
    return full_name[len(package) :]


def _messages(file: FileDescriptor) -> list[Descriptor]:
    found: list[Descriptor] = []
    pending = list(file.message_types_by_name.values())
    while pending:
        message = pending.pop()
        if message.GetOptions().map_entry:
            continue  # compared through the map field that owns it
        found.append(message)
        pending.extend(message.nested_types)
    return found


def _triton_message(name: str) -> Descriptor:
    for file in (triton_service.DESCRIPTOR, triton_config.DESCRIPTOR):
        try:
            return file.pool.FindMessageTypeByName(THEIRS + name)
        except KeyError:
            continue
    raise AssertionError(f"Triton has no message {name}")


def _shape(field: FieldDescriptor, package: str) -> tuple[object, ...]:
    """What travels on the wire for a field: its number, wire type, cardinality, and what its
    message or enum type is called (relative to the package), recursively for map entries."""
    type_name = ""
    if field.message_type is not None:
        if field.message_type.GetOptions().map_entry:
            entry = field.message_type
            type_name = "map<" + ",".join(repr(_shape(f, package)) for f in entry.fields) + ">"
        else:
            type_name = _relative(field.message_type.full_name, package)
    elif field.enum_type is not None:
        type_name = _relative(field.enum_type.full_name, package)
    return (field.number, field.type, field.is_repeated, field.is_packed, type_name)


@pytest.mark.parametrize("file", [grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])
def test_every_field_matches_tritons_number_and_type(file: FileDescriptor) -> None:
    messages = _messages(file)
    assert messages
    for ours in messages:
        name = _relative(ours.full_name, OURS)
        theirs = _triton_message(name)
        for field in ours.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{name}.{field.name} is not in Triton's {name}"
            assert _shape(field, OURS) == _shape(other, THEIRS), f"{name}.{field.name}"


def _enums(file: FileDescriptor) -> list[EnumDescriptor]:
    enums = list(file.enum_types_by_name.values())
    for message in _messages(file):
        enums.extend(message.enum_types)
    return enums


def test_every_enum_value_matches_tritons() -> None:
    for ours in _enums(model_config_pb2.DESCRIPTOR):
        theirs = triton_config.DESCRIPTOR.pool.FindEnumTypeByName(
            THEIRS + _relative(ours.full_name, OURS)
        )
        for value in ours.values:
            assert theirs.values_by_name[value.name].number == value.number, value.name


COEXIST = """
import sys

import grpc
import numpy as np
import tritonclient.grpc as tg

import ferry.client
from ferry.proto.kserve.v2 import grpc_service_pb2 as ours
from ferry.server.grpc import kserve

target = sys.argv[1]
x = np.arange(4, dtype=np.float32).reshape(1, 4)
tensor = tg.InferInput("input", [1, 4], "FP32")
tensor.set_data_from_numpy(x)
with tg.InferenceServerClient(target) as client:
    assert (client.infer("id_fp32", [tensor]).as_numpy("output") == x).all()
# Ferry's own messages on the same method path, in the same process.
with grpc.insecure_channel(target) as channel:
    live = channel.unary_unary(
        f"/{kserve.SERVICE}/ServerLive",
        request_serializer=ours.ServerLiveRequest.SerializeToString,
        response_deserializer=ours.ServerLiveResponse.FromString,
    )(ours.ServerLiveRequest(), timeout=30)
assert live.live
print("coexist-ok")
"""


def test_ferry_and_tritonclient_in_one_process(kserve_server: ServerThread) -> None:
    """tritonclient's messages live in `package inference`; ours in ferry.kserve.v2. A clash
    would raise "duplicate symbol" when the second of the two is imported, so one order proves
    it. A fresh interpreter, since this one has imported both long ago."""
    done = subprocess.run(
        [sys.executable, "-c", COEXIST, kserve_server.target],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "coexist-ok" in done.stdout
