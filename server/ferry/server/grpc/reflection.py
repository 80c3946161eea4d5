"""Server reflection that can describe ``inference.GRPCInferenceService`` under its standard name.

Ferry compiles the Open Inference Protocol's messages under ``ferry.kserve.v2`` (so a process can
import Ferry and tritonclient together, see ``kserve.py``), but clients call the service as
``inference.GRPCInferenceService``. Reflection answers from a descriptor pool, and the default pool
has no ``inference`` package, so ``grpcurl describe`` and dynamic invocation failed. This module
builds a private pool for reflection only: every file the served services need, copied from the
default pool, plus the OIP files again with their package renamed to ``inference`` (and their type
references and file names with it). The wire is the same: only names change, never field numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc import aio
from grpc_reflection.v1alpha import reflection

from ferry.proto.kserve.v2 import grpc_service_pb2
from ferry.server.grpc.kserve import METHODS

OIP_PACKAGE = "inference"
OIP_SERVICE = f"{OIP_PACKAGE}.GRPCInferenceService"
_OURS = grpc_service_pb2.DESCRIPTOR.package  # ferry.kserve.v2
# Triton's own file names for the renamed files, so a client that already holds Triton's
# descriptors (by file name) finds the same ones.
_TRITON_FILES = {
    "ferry/proto/kserve/v2/grpc_service.proto": "grpc_service.proto",
    "ferry/proto/kserve/v2/model_config.proto": "model_config.proto",
}


def _proto(fd: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    out = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(out)
    return out


def _renamed(fd: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    """The file as Triton declares it: package ``inference``, type names to match, and (in
    grpc_service.proto) the service with the methods Ferry implements, as ``kserve.METHODS``
    lists them."""
    proto = _proto(fd)
    if fd.name == grpc_service_pb2.DESCRIPTOR.name:
        service = proto.service.add(name=OIP_SERVICE.rsplit(".", 1)[1])
        for method, (request, response, streaming) in METHODS.items():
            service.method.add(
                name=method,
                input_type=f".{_OURS}.{request}",
                output_type=f".{_OURS}.{response}",
                client_streaming=streaming,
                server_streaming=streaming,
            )
    proto.name = _TRITON_FILES.get(proto.name, proto.name)
    proto.package = OIP_PACKAGE
    deps = [_TRITON_FILES.get(d, d) for d in proto.dependency]
    del proto.dependency[:]
    proto.dependency.extend(deps)
    old, new = f".{_OURS}.", f".{OIP_PACKAGE}."

    def fix_messages(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for f in message.field:
                if f.type_name.startswith(old):
                    f.type_name = new + f.type_name[len(old) :]
            fix_messages(message.nested_type)

    fix_messages(proto.message_type)
    for svc in proto.service:
        for rpc in svc.method:
            rpc.input_type = rpc.input_type.replace(old, new, 1)
            rpc.output_type = rpc.output_type.replace(old, new, 1)
    return proto


def _add(pool: descriptor_pool.DescriptorPool, fd: FileDescriptor, seen: set[str]) -> None:
    """Add ``fd`` after its dependencies (the C++ pool resolves names when a file is added)."""
    if fd.name in seen:
        return
    seen.add(fd.name)
    for dep in fd.dependencies:
        _add(pool, dep, seen)
    pool.Add(_proto(fd))
    if fd.package == _OURS:
        pool.Add(_renamed(fd))


def build_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A pool holding every file the named services need, plus the OIP under ``inference``."""
    default = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    seen: set[str] = set()
    for name in service_names:
        if name == OIP_SERVICE:
            fd = grpc_service_pb2.DESCRIPTOR
        else:
            fd = default.FindServiceByName(name).file
        _add(pool, fd, seen)
    return pool


def enable(server: aio.Server, service_names: list[str]) -> None:
    """Reflection for ``service_names`` (and reflection itself), OIP under its standard name."""
    names = [*service_names, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=build_pool(names))
